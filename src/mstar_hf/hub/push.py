"""Publish a saved mSTAR folder to the Hugging Face Hub in one commit.

Everything local is checked before the first request (repo id, weights, config model_type, model card),
so bad input never creates a repo. The upload is a single `HfApi.create_commit`: the Hub applies a commit
all-or-nothing, so when it fails nothing of this push is visible, and the error says so (including when
the repository itself was created before the commit failed).

Token and endpoint come from `huggingface_hub` itself (HF_TOKEN / `hf auth login`, HF_ENDPOINT).
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
from pathlib import Path

from .card import MSTAR_MODEL_TYPES, ModelCardError, read_model_type, render_model_card

# Paths (relative to the folder, POSIX) never uploaded: VCS/cache folders, intermediate checkpoints and
# optimizer/RNG state from training runs, logs. Weights, configs, processor files, code and cards remain.
DEFAULT_IGNORE_PATTERNS = (
    "checkpoint-*/*",
    "runs/*",
    "wandb/*",
    "__pycache__/*",
    "*/__pycache__/*",
    "*.pyc",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "*.lock",
    "*.incomplete",
)


class PushInputError(ValueError):
    """The folder, repo id or credentials are not fit to push; raised before any network call."""


class PushError(RuntimeError):
    """The Hub refused or failed the push.

    `published` is False when no file of this push is on the Hub (every failure before or during the commit);
    it is True only when a commit landed but lacks some of the files. `repo_exists` says whether the
    repository exists on the Hub (it may have been created by this push before the commit failed).
    """

    def __init__(self, message: str, *, repo_id: str, status_code: int | None = None, repo_exists: bool = False):
        super().__init__(message)
        self.repo_id = repo_id
        self.status_code = status_code
        self.repo_exists = repo_exists
        self.published = False


def _check_repo_id(repo_id) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise PushInputError(f"Invalid repo id {repo_id!r}: expected 'namespace/name' (or 'name' for your own namespace).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushInputError(f"Invalid repo id {repo_id!r}: {exc}") from exc


def _safetensors_ok(path: Path) -> str | None:
    """None when `path` has a readable safetensors header that fits the file, else the reason it does not."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "file is shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            return "header length exceeds the file size"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "header is not valid JSON"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    if ends and 8 + n + max(ends) > size:
        return f"truncated: tensors need {8 + n + max(ends)} bytes, file has {size}"
    return None


def _ignored(rel: str, patterns) -> bool:
    parts = rel.split("/")
    # Hidden files/folders (.git, .cache from hf downloads, .ipynb_checkpoints) are local state, not model.
    if any(p.startswith(".") for p in parts) and rel != ".gitattributes":
        return True
    return any(fnmatch.fnmatch(rel, pattern) for pattern in patterns)


def collect_folder(folder: str | os.PathLike, ignore_patterns=DEFAULT_IGNORE_PATTERNS) -> tuple[str, list[str]]:
    """Validate a saved mSTAR folder and list the files to upload (POSIX paths relative to `folder`).

    Returns (model_type, files). Raises PushInputError naming what is wrong: missing folder, no or
    unreadable `*.safetensors` weights, missing shards of a sharded checkpoint, a config.json that is not
    an mSTAR model.
    """
    root = Path(folder)
    if not root.is_dir():
        raise PushInputError(f"{folder} is not a folder: pass the directory written by `save_pretrained`.")
    try:
        model_type, _ = read_model_type(root)
    except ModelCardError as exc:
        raise PushInputError(str(exc)) from exc

    weights = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not weights:
        pickled = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" Found only pickled weights ({', '.join(pickled)}): re-save with `save_pretrained` "
                "(safetensors is the default)." if pickled else "")
        raise PushInputError(f"{folder} has no *.safetensors weights; refusing to publish a model without weights.{hint}")
    for index_path in root.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PushInputError(f"{index_path} is not a valid safetensors index: {exc}") from exc
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise PushInputError(f"{index_path.name} lists shards that are not in {folder}: {', '.join(missing)}")
    for path in weights:
        problem = _safetensors_ok(path)
        if problem:
            raise PushInputError(f"{path} is not a valid safetensors file ({problem}).")

    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not _ignored(rel, ignore_patterns):
            files.append(rel)
    return model_type, files


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _reason(exc: BaseException) -> str:
    status = _status(exc)
    if status == 401:
        return ("the Hub refused the token (HTTP 401): check HF_TOKEN, `hf auth login` or --token, and that "
                "the token has write access")
    if status == 403:
        return "the token may not write to this namespace (HTTP 403)"
    if status is not None:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the Hub answered HTTP {status} ({first_line})"
    return f"{type(exc).__name__}: {exc}"


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    card_kwargs: dict | None = None,
    ignore_patterns=DEFAULT_IGNORE_PATTERNS,
):
    """Upload a saved mSTAR model folder to the Hub as one commit and return its `CommitInfo`.

    The folder must hold `*.safetensors` weights and a `config.json` whose `model_type` is an mSTAR one;
    configs, processor files, custom pipeline / `auto_map` code and `training_args.json` /
    `eval_results.json` go along; an `MStarModel` or report-generator folder also gets its pipelines'
    code and `custom_pipelines` in config.json (`mstar_hf.pipelines.add_custom_pipelines`). If the folder has
    no README.md, a model card is rendered with `render_model_card(folder, repo_id, **card_kwargs)` and
    uploaded as README.md (the folder is not modified: both are added in the commit only). With `revision`, the branch is created from main if needed and the commit goes there.

    Raises:
        PushInputError: bad folder, repo id or missing token (before any network call).
        PushError: the Hub refused or failed; nothing of this push was published.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.utils import get_token

    _check_repo_id(repo_id)
    model_type, files = collect_folder(folder, ignore_patterns)
    card_kwargs = dict(card_kwargs or {})
    unknown = set(card_kwargs) - {"base_model", "datasets", "license", "tags", "patch_model"}
    if unknown:
        raise PushInputError(f"Unknown card_kwargs: {', '.join(sorted(unknown))}")
    render = "README.md" not in files
    if render:
        try:  # render once now so a bad eval_results.json / training_args.json fails before the repo exists
            render_model_card(folder, repo_id=repo_id, **card_kwargs)
        except ModelCardError as exc:
            raise PushInputError(str(exc)) from exc
    token = token or get_token()
    if not token:
        raise PushInputError("No Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass a token.")

    endpoint = constants.ENDPOINT
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except Exception as exc:
        raise PushError(f"Could not create or access the repository {repo_id} on {endpoint}: {_reason(exc)}. "
                        "Nothing was published.", repo_id=repo_id, status_code=_status(exc)) from exc
    full_id = repo_url.repo_id or repo_id

    def failed(stage: str, exc: BaseException) -> PushError:
        return PushError(
            f"Pushing {folder} to {full_id} failed while {stage}: {_reason(exc)}. The repository {full_id} exists "
            f"on {endpoint} (create_repo succeeded), but the commit was not made, so none of the files of this "
            "push were published.", repo_id=full_id, status_code=_status(exc), repo_exists=True)

    try:
        if private and not api.repo_info(full_id).private:
            raise PushError(f"{full_id} already exists on {endpoint} and is public; refusing a --private push into "
                            "it. Nothing was published.", repo_id=full_id, repo_exists=True)
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(full_id, branch=revision, exist_ok=True)
    except PushError:
        raise
    except Exception as exc:
        raise failed("preparing the target branch", exc) from exc

    root = Path(folder)
    from ..pipelines.remote import custom_pipeline_files

    # the pipelines' code and `custom_pipelines` in config.json, so the repo's pipelines load without mstar_hf
    # (added to the commit, the folder is not modified)
    pipeline_files = custom_pipeline_files(root)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(root / rel)) for rel in files
                  if rel not in pipeline_files]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
                   for name, content in pipeline_files.items()]
    if render:
        card = render_model_card(folder, repo_id=full_id, **card_kwargs)
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    uploaded = [op.path_in_repo for op in operations]
    try:
        info = api.create_commit(
            repo_id=full_id,
            operations=operations,
            commit_message=commit_message or f"Upload {model_type} model with mstar-hf",
            commit_description=f"{len(uploaded)} files pushed with `mstar-hf push`.",
            revision=revision,
        )
    except Exception as exc:
        raise failed("uploading and committing the files", exc) from exc

    # The commit is the unit of publication: confirm every file is in it (e.g. none dropped by a .gitignore).
    try:
        remote = set(api.list_repo_files(full_id, revision=info.oid))
    except Exception as exc:
        raise PushError(f"Commit {info.oid} was reported on {full_id}, but listing it failed ({_reason(exc)}); "
                        "check the repository before relying on it.", repo_id=full_id, status_code=_status(exc),
                        repo_exists=True) from exc
    missing = sorted(set(uploaded) - remote)
    if missing:
        error = PushError(f"Commit {info.oid} on {full_id} is missing {', '.join(missing)} (ignored by the Hub, "
                          "e.g. through a .gitignore): the published revision is incomplete.", repo_id=full_id,
                          repo_exists=True)
        error.published = True
        raise error
    return info


__all__ = ["push_folder", "collect_folder", "PushError", "PushInputError", "DEFAULT_IGNORE_PATTERNS", "MSTAR_MODEL_TYPES"]
