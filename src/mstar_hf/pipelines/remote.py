"""The pipeline code that travels with a saved model, so `pipeline(task, model=folder_or_repo,
trust_remote_code=True)` works where mstar_hf is not installed.

transformers' custom-pipeline mechanism reads `custom_pipelines` in config.json (`{task: {"impl":
"zero_shot.WSIZeroShotPipeline", "pt": ["AutoModel"], "type": "multimodal"}}`) and imports `zero_shot.py`
from the folder as remote code; every relative import of a remote file (`from .inputs import ...`) must be
a file of that folder too, and its absolute imports outside `try` blocks must be installed. So the pipeline
files import each other and the slide-reading files of `mstar_hf.wsi` (which only import each other)
relatively, in a `try` whose other branch is the installed package, and everything is copied flat next
to the modelling files.

`add_custom_pipelines(folder)` is the one call that makes a saved folder carry its pipelines: the
training entry points, `save_pretrained` of the top-level models (`auto.py`), the pipelines' own
`save_pretrained` and `mstar-hf push` (through `custom_pipeline_files`, without touching the folder) use it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Where the relative imports of travelling files are found, in order (file names are unique across them).
SEARCH_DIRS = (_HERE, _HERE.parent / "wsi")

# task -> (module, class, transformers Auto class of the model)
PIPELINES = {
    "wsi-zero-shot": ("zero_shot", "WSIZeroShotPipeline", "AutoModel"),
    "wsi-feature-extraction": ("feature_extraction", "WSIFeatureExtractionPipeline", "AutoModel"),
    "wsi-report-generation": ("report_generation", "WSIReportGenerationPipeline", "AutoModelForImageTextToText"),
}
# the pipelines each top-level model serves, by config model_type
TASKS_BY_MODEL_TYPE = {
    "mstar": ("wsi-zero-shot", "wsi-feature-extraction"),
    "mstar_report_generation": ("wsi-report-generation",),
}
# as transformers' get_relative_imports reads them
_RELATIVE = (re.compile(r"^\s*import\s+\.(\S+)\s*$", re.MULTILINE),
             re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE))


def _find(name: str) -> Path:
    hits = [d / f"{name}.py" for d in SEARCH_DIRS if (d / f"{name}.py").is_file()]
    if len(hits) != 1:
        raise RuntimeError(f"pipeline code: relative import {name!r} resolves to {len(hits)} files in "
                           f"{[str(d) for d in SEARCH_DIRS]}; it must be exactly one (files travel flat).")
    return hits[0]


def code_files(tasks) -> dict[str, Path]:
    """`{file name: source path}` of every file the pipelines of `tasks` import relatively (transitively)."""
    files: dict[str, Path] = {}
    todo = [PIPELINES[task][0] for task in tasks]
    while todo:
        name = todo.pop()
        if f"{name}.py" in files:
            continue
        path = _find(name)
        files[f"{name}.py"] = path
        text = path.read_text(encoding="utf-8")
        todo += [m for pattern in _RELATIVE for m in pattern.findall(text)]
    return files


def custom_pipelines_entry(tasks) -> dict:
    """The `custom_pipelines` value of config.json for `tasks` (the layout `Pipeline.save_pretrained` writes)."""
    return {task: {"impl": f"{PIPELINES[task][0]}.{PIPELINES[task][1]}", "pt": [PIPELINES[task][2]],
                   "type": "multimodal"} for task in tasks}


def tasks_for(folder) -> tuple[str, ...]:
    """The pipelines a saved folder serves, from its config.json `model_type` (none for other models)."""
    config = _read_config(Path(folder))
    return TASKS_BY_MODEL_TYPE.get(config.get("model_type"), ())


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; save the model with save_pretrained first.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object.")
    return config


def custom_pipeline_files(folder, tasks=None) -> dict[str, bytes]:
    """What `add_custom_pipelines` writes, as `{file name: content}`, without writing it: config.json with
    `custom_pipelines` (other pipelines it names are kept) and the pipeline code. Empty when the folder's
    model serves no pipeline."""
    folder = Path(folder)
    tasks = tuple(tasks) if tasks is not None else tasks_for(folder)
    unknown = [t for t in tasks if t not in PIPELINES]
    if unknown:
        raise ValueError(f"unknown pipeline task(s) {unknown}; known: {sorted(PIPELINES)}.")
    if not tasks:
        return {}
    config = _read_config(folder)
    config["custom_pipelines"] = {**(config.get("custom_pipelines") or {}), **custom_pipelines_entry(tasks)}
    out = {name: path.read_bytes() for name, path in sorted(code_files(tasks).items())}
    out["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return out


def add_custom_pipelines(folder, tasks=None) -> list[str]:
    """Make a `save_pretrained` folder serve its pipelines without mstar_hf installed.

    Writes `custom_pipelines` into config.json and copies the pipeline code (pipelines + slide reading)
    next to the modelling code. `tasks` defaults to what the model serves (`TASKS_BY_MODEL_TYPE`: an
    `MStarModel` folder gets wsi-zero-shot and wsi-feature-extraction, a report generator
    wsi-report-generation, other models nothing). Returns the names of the files written.

    Note: a folder with `custom_pipelines` needs `trust_remote_code=True` in `pipeline(task, model=folder)`,
    as transformers asks for every custom pipeline, also where mstar_hf is installed; passing the model
    object (`pipeline(task, model=AutoModel.from_pretrained(folder), processor=...)`) does not.
    """
    folder = Path(folder)
    files = custom_pipeline_files(folder, tasks)
    for name, content in files.items():
        target = folder / name
        if target.is_file() and target.read_bytes() == content:
            continue
        tmp = target.with_name(f".{name}.tmp{os.getpid()}")
        tmp.write_bytes(content)
        os.replace(tmp, target)
    return sorted(files)


__all__ = ["add_custom_pipelines", "custom_pipeline_files", "custom_pipelines_entry", "code_files", "tasks_for",
           "PIPELINES", "TASKS_BY_MODEL_TYPE"]
