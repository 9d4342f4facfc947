"""Errors raised for bad slides. Every message names the file, so a batch log is readable on its own."""

from __future__ import annotations

import os


class SlideError(ValueError):
    """A slide cannot be used: unreadable, not a slide, corrupt, no tissue, too small, no resolution.

    Constructed as ``SlideError(path, problem)``; a single argument is taken as the full message so
    that the exception survives being re-raised from a DataLoader worker (which calls ``cls(msg)``).
    """

    def __init__(self, path_or_message, problem: str | None = None):
        if problem is None:
            self.path = None
            self.problem = str(path_or_message)
            message = self.problem
        else:
            self.path = os.fspath(path_or_message)
            self.problem = problem
            message = f"{self.path}: {problem}"
        super().__init__(message)


class MissingMppError(SlideError):
    """Neither microns-per-pixel nor objective power is known and no override was given."""


class NoTissueError(SlideError):
    """Segmentation found no tissue, or no patch reaches the minimum tissue fraction."""


class SlideTooSmallError(SlideError):
    """The slide is smaller than one patch at the target resolution."""
