"""The demo's output folder: refuse what is not ours, resume what was interrupted, never serve stale results.

A demo folder carries `demo_state.json`: the settings it was made with and the stages that finished.
Re-running with the same settings skips finished stages (training stages that were cut short resume
from their last checkpoint); `results.json` and `summary.md` are removed before any work, so a run
that dies again leaves no results that look new. A folder with other content, or a demo made with
other settings, is refused unless `overwrite=True`, which empties it first. The exceptions are settings
that only say how much of one stage to run (`RESUMABLE_CHANGES`): changing them reopens that stage,
which reuses what it finished (a demo run with three control shuffles gets seven more for
`--control-shuffles 10`, not a new demo).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

STATE_FILE = "demo_state.json"
STATE_VERSION = 1
# Written at the end of a run: removed first on every (re-)run.
RESULT_FILES = ("results.json", "summary.md")
# setting -> the stage a change of it reopens (every other setting must match the folder's)
RESUMABLE_CHANGES = {"shuffled_control": "stage1_control", "shuffled_control_repeats": "stage1_control"}


class DemoFolderError(ValueError):
    """The output folder cannot be used as it is (the message names it and says what to do)."""


def _canonical(settings: dict) -> dict:
    # tuples become lists, as they will after a JSON round trip
    return json.loads(json.dumps(settings, default=str))


def _guard_deletion(out: Path) -> None:
    """--overwrite empties a folder: never one that holds the working directory or a home folder."""
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve() or resolved.parent == resolved:
        raise DemoFolderError(
            f"--out {out}: refusing to empty {resolved} (it is the working directory, one of its parents, a home "
            "folder or the file-system root); choose a dedicated folder such as demo_out.")


class DemoFolder:
    """State of one demo output folder. Use `DemoFolder.open(...)`, then `done` / `mark` per stage."""

    def __init__(self, path: Path, settings: dict, finished: list[str], resumed: list[str],
                 reopened: list[str] | None = None):
        self.path, self.settings, self.finished, self.resumed = path, settings, finished, resumed
        self.reopened = reopened or []  # finished stages run again because a RESUMABLE_CHANGES setting changed
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    @classmethod
    def open(cls, out_dir: str | os.PathLike, settings: dict, overwrite: bool = False) -> "DemoFolder":
        out = Path(out_dir)
        settings = _canonical(settings)
        if out.exists() and not out.is_dir():
            raise DemoFolderError(f"--out {out}: is a file, not a folder.")
        state_path = out / STATE_FILE
        finished: list[str] = []
        reopened: list[str] = []
        if out.is_dir() and any(out.iterdir()):
            state = None
            if state_path.is_file():
                try:
                    state = json.loads(state_path.read_text())
                except (OSError, ValueError):
                    state = None
            if overwrite:
                _guard_deletion(out)
                for child in out.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            elif state is None:
                raise DemoFolderError(
                    f"--out {out}: the folder is not empty and is not a demo folder (no readable {STATE_FILE}); "
                    "choose another folder or pass --overwrite to empty it.")
            else:
                # another state version: no settings to compare, so every setting differs
                old = _canonical(state.get("settings", {})) if state.get("version") == STATE_VERSION else {}
                changed = sorted(k for k in old.keys() | settings.keys() if old.get(k) != settings.get(k))
                fixed = [k for k in changed if k not in RESUMABLE_CHANGES]
                if not old or fixed:
                    differences = ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} here" for k in fixed)
                    raise DemoFolderError(
                        f"--out {out}: holds a demo made with other settings ({differences or state.get('settings')}); "
                        "pass --overwrite to replace it, or choose another folder.")
                finished = list(state.get("finished", []))
                reopened = [s for s in dict.fromkeys(RESUMABLE_CHANGES[k] for k in changed) if s in finished]
                finished = [s for s in finished if s not in reopened]
        out.mkdir(parents=True, exist_ok=True)
        # whatever happens next, no results from an earlier run may pass for this run's
        for name in RESULT_FILES:
            (out / name).unlink(missing_ok=True)
        folder = cls(out, settings, finished, resumed=list(finished), reopened=reopened)
        folder._write()
        return folder

    def done(self, stage: str) -> bool:
        return stage in self.finished

    def mark(self, stage: str) -> None:
        """Records that `stage` finished and its outputs are complete on disk."""
        if stage not in self.finished:
            self.finished.append(stage)
        self._write()

    def _write(self) -> None:
        state = {"version": STATE_VERSION, "settings": self.settings, "finished": self.finished,
                 "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self.path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.path / STATE_FILE)


__all__ = ["DemoFolder", "DemoFolderError", "RESULT_FILES", "RESUMABLE_CHANGES", "STATE_FILE"]
