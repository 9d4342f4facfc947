"""Zero-shot class prompts: what `pipeline("wsi-zero-shot")` accepts as `candidate_labels`, read into one form.

Accepted (every other value raises `TypeError` / `ValueError` naming the problem, never a guess):

* a list of class names: `["adenocarcinoma", "squamous cell carcinoma"]` (each name is its own prompt);
* a dict of synonyms: `{"LUAD": ["lung adenocarcinoma", "adenocarcinoma"], "LUSC": [...]}`;
* a prompt set in the CONCH / mSTAR layout, as the authors' prompt files hold it (the templates of the
  set replace the default templates):
  `{"0": {"classnames": {"LUAD": ["lung adenocarcinoma", ...], ...}, "templates": ["CLASSNAME.", ...]}}`,
  or the inner `{"classnames": ..., "templates": ...}` alone;
* the numbered-set layout: several such sets `{"0": {...}, "1": {...}, ...}` (MI-Zero's random template
  subsets); every set must name the same classes, and a class embedding is the mean of its per-set
  embeddings (an ensemble over the sets);
* a path to a `.json` file holding any of the above.

Templates carry a `CLASSNAME` slot (the authors' convention) or `{}` (transformers' `hypothesis_template`).

This file travels with saved models as remote code: it imports only the standard library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CLASSNAME = "CLASSNAME"

# The MI-Zero-style templates of `mstar_hf.data.text.ZERO_SHOT_TEMPLATES` (a test keeps the two equal; this
# copy lets the pipeline run where the package is not installed).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "CLASSNAME.",
    "an image of CLASSNAME.",
    "an H&E image of CLASSNAME.",
    "an H&E stained image of CLASSNAME.",
    "a histopathological image of CLASSNAME.",
    "a histopathology slide showing CLASSNAME.",
    "a photomicrograph showing CLASSNAME.",
    "presence of CLASSNAME tissue.",
    "an example of CLASSNAME.",
    "CLASSNAME is shown.",
    "a whole slide image of CLASSNAME.",
    "tissue section of CLASSNAME, H&E stain.",
)


@dataclass(frozen=True)
class ClassPrompts:
    """Classes and the prompts that embed them (hashable: the pipeline caches class embeddings by it).

    labels: the class names, in output order. sets: one or more prompt sets, each
    `(synonyms per label (same order as labels), templates or None for the defaults)`.
    """

    labels: tuple[str, ...]
    sets: tuple[tuple[tuple[tuple[str, ...], ...], tuple[str, ...] | None], ...]

    def with_templates(self, templates: tuple[str, ...] | None) -> "ClassPrompts":
        """The same classes with `templates` for every set that has none of its own."""
        return ClassPrompts(self.labels, tuple((syn, t if t is not None else templates) for syn, t in self.sets))

    def prompts(self, default_templates: Sequence[str]) -> list[list[list[str]]]:
        """`[set][class] -> [prompt texts]`: every template filled with every synonym."""
        out = []
        for synonyms, templates in self.sets:
            templates = templates if templates is not None else tuple(default_templates)
            out.append([[t.replace(CLASSNAME, s) for s in syns for t in templates] for syns in synonyms])
        return out


def check_templates(templates, where: str = "templates") -> tuple[str, ...] | None:
    """Templates with a `CLASSNAME` (or `{}`) slot; `{}` is rewritten to `CLASSNAME`. None stays None."""
    if templates is None:
        return None
    if isinstance(templates, str):
        templates = [templates]
    if not isinstance(templates, Sequence):
        raise TypeError(f"{where} must be a string or a list of strings, got {type(templates).__name__}.")
    templates = list(templates)
    if not templates:
        raise ValueError(f"{where} is empty: give at least one template with a {CLASSNAME} (or {{}}) slot.")
    out, bad = [], []
    for t in templates:
        if not isinstance(t, str):
            raise TypeError(f"{where} must hold strings, got {type(t).__name__} ({t!r}).")
        if CLASSNAME not in t and "{}" in t:
            t = t.replace("{}", CLASSNAME)
        (out if CLASSNAME in t else bad).append(t)
    if bad:
        raise ValueError(f"every template in {where} needs a {CLASSNAME} (or {{}}) slot, replaced by each class "
                         f"name; these have none: {bad}.")
    return tuple(out)


def _synonyms(label, synonyms, where: str) -> tuple[str, ...]:
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{where}: class label {label!r} must be a non-empty string.")
    if isinstance(synonyms, str):
        synonyms = [synonyms]
    if isinstance(synonyms, Mapping) or not isinstance(synonyms, Sequence):
        raise TypeError(f"{where}: the synonyms of {label!r} must be a string or a list of strings, got "
                        f"{type(synonyms).__name__}.")
    synonyms = list(synonyms)
    if not synonyms or not all(isinstance(s, str) and s.strip() for s in synonyms):
        raise ValueError(f"{where}: class {label!r} needs a non-empty list of non-empty synonyms, got {synonyms!r}.")
    return tuple(synonyms)


def _label_map(items, where: str) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    labels, synonyms, seen = [], [], set()
    for label, syns in items:
        syns = _synonyms(label, syns, where)
        if label in seen:
            raise ValueError(f"{where}: class label {label!r} is given twice.")
        seen.add(label)
        labels.append(label)
        synonyms.append(syns)
    if not labels:
        raise ValueError(f"{where} is empty: give at least one class name.")
    return tuple(labels), tuple(synonyms)


def _prompt_set(value, where: str):
    if not isinstance(value, Mapping) or "classnames" not in value:
        raise ValueError(f"{where}: a prompt set must be a dict with 'classnames' ({{label: [synonyms]}}) and "
                         f"optionally 'templates', got {_describe(value)}.")
    unknown = set(value) - {"classnames", "templates"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} in a prompt set (expected 'classnames', "
                         f"'templates').")
    classnames = value["classnames"]
    if not isinstance(classnames, Mapping):
        raise TypeError(f"{where}: 'classnames' must be a dict {{label: [synonyms]}}, got {_describe(classnames)}.")
    labels, synonyms = _label_map(classnames.items(), where)
    return labels, synonyms, check_templates(value.get("templates"), f"{where}: 'templates'")


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def _from_mapping(mapping: Mapping, where: str) -> ClassPrompts:
    if "classnames" in mapping:  # one set, unnumbered
        labels, synonyms, templates = _prompt_set(mapping, where)
        return ClassPrompts(labels, ((synonyms, templates),))
    values = list(mapping.values())
    if values and all(isinstance(v, Mapping) for v in values):  # numbered sets {"0": {...}, "1": {...}}
        sets, labels = [], None
        for key, value in mapping.items():
            set_labels, synonyms, templates = _prompt_set(value, f"{where}, prompt set {key!r}")
            if labels is None:
                labels = set_labels
            elif set(set_labels) != set(labels):
                raise ValueError(f"{where}: prompt set {key!r} names the classes {list(set_labels)}, the first set "
                                 f"{list(labels)}; every set must name the same classes.")
            order = {label: i for i, label in enumerate(set_labels)}
            sets.append((tuple(synonyms[order[label]] for label in labels), templates))
        return ClassPrompts(labels, tuple(sets))
    if any(isinstance(v, Mapping) for v in values):
        raise ValueError(f"{where}: mixes class synonyms and nested dicts; expected {{label: [synonyms]}} or "
                         f"prompt sets {{'0': {{'classnames': ..., 'templates': ...}}}}.")
    labels, synonyms = _label_map(mapping.items(), where)
    return ClassPrompts(labels, ((synonyms, None),))


def read_prompt_file(path) -> ClassPrompts:
    """A `.json` prompt file (any layout of the module docstring); errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such prompt file (expected a .json of class prompts).")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON prompt file ({e}).") from None
    if isinstance(data, Mapping):
        return _from_mapping(data, path)
    if isinstance(data, list):
        return parse_candidate_labels(data, where=path)
    raise ValueError(f"{path}: a prompt file must hold a dict or a list of class names, got {type(data).__name__}.")


def _looks_like_file(value: str) -> bool:
    return value.lower().endswith(".json") or (os.path.sep in value and os.path.isfile(value))


def parse_candidate_labels(candidate_labels, where: str = "candidate_labels") -> ClassPrompts:
    """Any accepted `candidate_labels` (module docstring) -> `ClassPrompts`; raises on anything else."""
    if isinstance(candidate_labels, ClassPrompts):
        return candidate_labels
    if candidate_labels is None:
        raise ValueError(f"{where} is required: a list of class names, {{label: [synonyms]}}, a CONCH/mSTAR "
                         "prompt dict or the path of a .json prompt file.")
    if isinstance(candidate_labels, os.PathLike) or (isinstance(candidate_labels, str)
                                                      and _looks_like_file(candidate_labels)):
        return read_prompt_file(candidate_labels)
    if isinstance(candidate_labels, str):
        candidate_labels = [candidate_labels]
    if isinstance(candidate_labels, Mapping):
        return _from_mapping(candidate_labels, where)
    if isinstance(candidate_labels, (bytes, bytearray)) or not isinstance(candidate_labels, Sequence):
        raise TypeError(f"{where} must be a list of class names, a dict {{label: [synonyms]}}, a CONCH/mSTAR prompt "
                        f"dict or a .json path; got {type(candidate_labels).__name__}.")
    for label in candidate_labels:
        if not isinstance(label, str):
            raise TypeError(f"{where} must hold class names (strings), got {_describe(label)}.")
    labels, synonyms = _label_map([(label, [label]) for label in candidate_labels], where)
    return ClassPrompts(labels, ((synonyms, None),))


__all__ = ["ClassPrompts", "parse_candidate_labels", "read_prompt_file", "check_templates", "DEFAULT_TEMPLATES",
           "CLASSNAME"]
