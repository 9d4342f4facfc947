"""Training and scoring MIL heads (ABMIL / TransMIL) on patch features, fold by fold, with Accelerate.

The recipe of the paper's downstream experiments: Adam (weight decay 1e-5), a cosine schedule, one
bag per step, up to 50 epochs, early stopping after 10 epochs without improvement of the validation
metric (macro-AUC or C-index; ties go to the lower validation loss), and the best epoch's weights are
the fold's model.

A bag is one slide (`bag_level="slide"`, the default; a case's prediction is then the mean over its
slides) or all slides of a case concatenated (`bag_level="case"`, as TCGA MIL work commonly does; each
slide of the case carries the case bag's prediction). Scores are per case either way
(`evaluation.report`), and survival time bins count cases, not slides. Used by `mstar-hf evaluate` and
`training/finetune.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..evaluation.cohort import TaskData
from ..evaluation.splits import Fold

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 << 30


@dataclass
class MILSettings:
    """Head and optimisation settings of MIL training (the flags of `mstar-hf evaluate` / finetune.py)."""

    head: str = "abmil"
    gated_attention: bool = True
    hidden_size: int = 512
    attention_dim: int = 128
    dropout: float = 0.25
    transmil_size: str = "base"  # preset of a from-scratch TransMIL head: base (the paper's), small, tiny
    init: str = "scratch"  # "scratch" or "mstar+" (TransMIL initialised from `aggregator`)
    aggregator: str | None = None
    learning_rate: float = 2e-4
    weight_decay: float = 1e-5
    lr_scheduler_type: str = "cosine"
    epochs: int = 50
    patience: int = 10
    min_epochs: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0
    max_train_steps: int = 0  # cap on optimizer steps per fold (0: the epochs decide)
    max_patches: int | None = None  # patches sampled per slide and epoch in training (None: all)
    early_stopping: str = "auto"  # "auto" (metric when the validation set allows it, else loss), "metric", "loss"
    num_time_bins: int = 4
    survival_loss_alpha: float = 0.0
    bag_level: str = "slide"  # "slide": one bag per slide; "case": one bag per case (all its slides' patches)
    seed: int = 0


@dataclass
class FoldRun:
    fold: int
    best_epoch: int
    epochs_run: int
    early_stopping_on: str
    best_val_metric: float | None
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


class FeatureStore:
    """Reads a slide's feature matrix from its h5; keeps them in memory when `cache` is on (the default
    when the task's features fit in `DEFAULT_CACHE_BYTES`), since every epoch reads every slide."""

    def __init__(self, data: TaskData, cache: bool | None = None):
        self.dim = data.feature_dim
        total = int(data.num_patches.sum()) * data.feature_dim * 4
        self.cache = total <= DEFAULT_CACHE_BYTES if cache is None else cache
        self._arrays: dict[str, np.ndarray] = {}
        self._coords: dict[str, tuple] = {}

    def get(self, path: str, case_id: str | None = None) -> np.ndarray:
        from ..data.features import read_slide_features

        if path in self._arrays:
            return self._arrays[path]
        features, _ = read_slide_features(path, case_id=case_id, expected_dim=self.dim)
        if self.cache:
            self._arrays[path] = features
        return features

    def coords(self, path: str) -> tuple[np.ndarray | None, float | None]:
        """(level-0 coords [n, 2] or None, the file's `patch_size_level0` attribute or None)."""
        import h5py

        if path not in self._coords:
            with h5py.File(path, "r") as f:
                coords = np.asarray(f["coords"][()], dtype=np.int64) if "coords" in f else None
                size = f.attrs.get("patch_size_level0")
            self._coords[path] = (coords, None if size is None else float(size))
        return self._coords[path]


def case_bags(data: TaskData, rows) -> list[np.ndarray]:
    """`rows` grouped into one bag per case (cases in order of first appearance)."""
    from ..data.cases import case_groups

    rows = np.asarray(rows, dtype=np.int64)
    _, inverse = case_groups([data.case_ids[i] for i in rows])
    return [rows[inverse == g] for g in range(int(inverse.max()) + 1)] if len(rows) else []


class BagDataset(Dataset):
    """One item per slide, or with `by_case` per case (the patches of all its slides, in row order):
    `patch_features` [n, D] plus its targets (a case's slides share them, which `evaluation.report`
    checks). In training with `max_patches`, a bag with more patches gets a fresh seeded sample each
    epoch."""

    def __init__(self, data: TaskData, rows, store: FeatureStore, time_bins=None, max_patches: int | None = None,
                 seed: int = 0, train: bool = False, by_case: bool = False):
        self.data, self.rows, self.store = data, np.asarray(rows, dtype=np.int64), store
        self.bags = case_bags(data, self.rows) if by_case else [self.rows[j:j + 1] for j in range(len(self.rows))]
        self.max_patches, self.seed, self.train = max_patches, seed, train
        self.epoch = 0
        self.bins = None
        if data.task == "survival" and time_bins is not None:
            from ..modeling.modeling_mstar_downstream import discretize_times

            self.bins = discretize_times(torch.as_tensor(data.times), time_bins).numpy()

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.bags)

    def __getitem__(self, j):
        bag = self.bags[j]
        i = int(bag[0])
        features = [self.store.get(self.data.feature_paths[r], self.data.case_ids[r]) for r in bag]
        features = features[0] if len(features) == 1 else np.concatenate(features)
        if self.train and self.max_patches and len(features) > self.max_patches:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            features = features[np.sort(rng.choice(len(features), self.max_patches, replace=False))]
        item = {"patch_features": torch.from_numpy(np.ascontiguousarray(features)), "row": i}
        if self.data.task == "classification":
            item["labels"] = int(self.data.labels[i])
        else:
            item["events"] = int(self.data.events[i])
            item["times"] = float(self.data.times[i])
            if self.bins is not None:
                item["labels"] = int(self.bins[i])
        return item


def collate_bags(items: list[dict]) -> dict:
    """Pads bags to the longest one: `patch_features` [B, N, D], `attention_mask` [B, N], targets [B]."""
    from ..data.bags import pad_bags

    batch = pad_bags([it["patch_features"] for it in items], mask_key="attention_mask")
    batch["rows"] = torch.tensor([it["row"] for it in items])
    for key, dtype in (("labels", torch.long), ("events", torch.long), ("times", torch.float32)):
        if key in items[0]:
            batch[key] = torch.tensor([it[key] for it in items], dtype=dtype)
    return batch


class EpochSampler(Sampler):
    """A fresh seeded permutation each epoch (`set_epoch`), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------


def load_pretrained_aggregator(path_or_model):
    """The mSTAR slide aggregator of a checkpoint (an aggregator folder or a full mSTAR model)."""
    from transformers import AutoModel

    from ..modeling import MStarSlideAggregator

    model = path_or_model
    if isinstance(model, (str, os.PathLike)):
        if not os.path.exists(model) and not str(model).count("/") == 1:
            raise FileNotFoundError(f"--init mstar+: aggregator checkpoint {os.fspath(model)!r} not found.")
        model = AutoModel.from_pretrained(os.fspath(model), dtype=torch.float32)
    if not isinstance(model, MStarSlideAggregator):
        model = getattr(model, "aggregator", None)
    if not isinstance(model, MStarSlideAggregator):
        raise ValueError(f"{path_or_model!r} holds no mSTAR slide aggregator (expected an 'mstar_aggregator' or "
                         "'mstar' checkpoint).")
    return model.eval()


def build_model(data: TaskData, settings: MILSettings, train_rows, aggregator=None):
    """A fresh head for one fold (survival time bins come from the fold's training cases)."""
    from ..modeling import (
        MStarForSlideClassification,
        MStarForSurvivalPrediction,
        MStarSlideClassificationConfig,
        MStarSurvivalConfig,
    )
    from ..modeling.modeling_mstar_downstream import compute_time_bins

    if data.task == "classification":
        model_class, config_class = MStarForSlideClassification, MStarSlideClassificationConfig
        kwargs = {"num_labels": data.num_classes, "id2label": dict(enumerate(data.class_names)),
                  "label2id": {n: i for i, n in enumerate(data.class_names)}}
    else:
        from ..data.cases import first_row_per_case

        model_class, config_class = MStarForSurvivalPrediction, MStarSurvivalConfig
        # bins count cases: a patient with three slides is one survival time, not three
        rows = first_row_per_case(data.case_ids, train_rows)
        kwargs = {"num_time_bins": settings.num_time_bins, "survival_loss_alpha": settings.survival_loss_alpha,
                  "time_bins": compute_time_bins(data.times[rows], data.events[rows], settings.num_time_bins)}
    if settings.init == "mstar+":
        if settings.head != "transmil":
            raise ValueError("--init mstar+ initialises the TransMIL head from the pretrained aggregator; use --head transmil.")
        aggregator = aggregator if aggregator is not None else load_pretrained_aggregator(settings.aggregator)
        if aggregator.config.input_dim != data.feature_dim:
            raise ValueError(f"the pretrained aggregator takes {aggregator.config.input_dim}-d patch features but the "
                             f"features of {data.features_dir or data.manifest} are {data.feature_dim}-d.")
        return model_class.from_aggregator(aggregator, **kwargs)
    if settings.init != "scratch":
        raise ValueError(f"init must be 'scratch' or 'mstar+', got {settings.init!r}.")
    extra = {}
    if settings.head == "transmil":
        from ..presets import aggregator_config

        extra["aggregator_config"] = aggregator_config(settings.transmil_size, input_dim=data.feature_dim).to_dict()
    config = config_class(
        head=settings.head, input_dim=data.feature_dim, hidden_size=settings.hidden_size,
        attention_dim=settings.attention_dim, gated_attention=settings.gated_attention, dropout=settings.dropout,
        **extra, **kwargs,
    )
    return model_class(config)


# ----------------------------------------------------------------------------------------------------------
# prediction and scoring
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model, data: TaskData, rows, store: FeatureStore, device=None, by_case: bool = False) -> dict:
    """Predictions for `rows`: classification `probs` [n, C]; survival `risk` [n], `hazards`, `survival`
    [n, K]; and the mean `loss` (over bags). With `by_case`, one bag per case and every slide of the case
    gets its bag's prediction. Every process scores all rows (MIL scoring is cheap next to training)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    time_bins = getattr(model.config, "time_bins", None)
    dataset = BagDataset(data, rows, store, time_bins=time_bins, by_case=by_case)
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate_bags)
    out: dict[str, list] = {}
    losses = []
    for batch in loader:
        batch.pop("rows")
        if data.task == "survival":
            batch.pop("times")
        result = model(**{k: v.to(device) for k, v in batch.items()})
        if result.loss is not None:
            losses.append(float(result.loss))
        if data.task == "classification":
            out.setdefault("probs", []).append(torch.softmax(result.logits.float(), -1).cpu())
        else:
            for key in ("risk", "hazards", "survival"):
                out.setdefault(key, []).append(getattr(result, key).float().cpu())
    model.train(was_training)
    preds = {k: torch.cat(v).numpy().astype(np.float64) for k, v in out.items()}
    if by_case:  # bag order -> row order: each slide takes its case bag's prediction
        position = {int(r): b for b, bag in enumerate(dataset.bags) for r in bag}
        take = np.array([position[int(r)] for r in dataset.rows], dtype=np.int64)
        preds = {k: v[take] for k, v in preds.items()}
    preds["loss"] = float(np.mean(losses)) if losses else math.nan
    return preds


def score(data: TaskData, rows, preds: dict) -> dict[str, float]:
    """Metrics of `preds` for `rows`, one score per case (the mean prediction of the case's slides)."""
    from ..evaluation.report import score_cases

    return score_cases(data, rows, preds, level="case")


def primary_metric(task: str) -> str:
    return "macro_auc" if task == "classification" else "c_index"


@torch.no_grad()
def attention_maps(model, data: TaskData, rows, store: FeatureStore) -> list[dict]:
    """Per slide: `coords` [n, 2], `patch_size_level0` and the head's `attention_scores` [n] (for heatmaps)."""
    model.eval()
    device = next(model.parameters()).device
    maps = []
    for i in rows:
        i = int(i)
        features = store.get(data.feature_paths[i], data.case_ids[i])
        out = model(torch.from_numpy(features)[None].to(device))
        coords, patch_size = store.coords(data.feature_paths[i])
        maps.append({"row": i, "slide_id": data.slide_ids[i], "coords": coords, "patch_size_level0": patch_size,
                     "scores": out.attention_scores[0].float().cpu().numpy()})
    return maps


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------


def _can_score(data: TaskData, rows) -> bool:
    rows = np.asarray(rows)
    if len({data.case_ids[i] for i in rows}) < 2:  # scores are per case
        return False
    if data.task == "classification":
        return len(np.unique(data.labels[rows])) >= 2
    return bool(data.events[rows].any())


def _better(metric, loss, best_metric, best_loss, on: str) -> bool:
    if on == "loss":
        return best_loss is None or loss < best_loss - 1e-9
    if best_metric is None or metric > best_metric + 1e-9:
        return True
    return abs(metric - best_metric) <= 1e-9 and loss < best_loss - 1e-9


def train_fold(
    model,
    data: TaskData,
    fold: Fold,
    settings: MILSettings,
    accelerator,
    store: FeatureStore,
    fold_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
):
    """Trains `model` on `fold.train` with early stopping on `fold.val`; returns (best model, FoldRun).

    With `fold_dir`, the fold is checkpointed every epoch (`save_state`, latest only), the best weights
    are kept in `fold_dir/best`, and `resume=True` continues from the latest checkpoint there.
    """
    from tqdm.auto import tqdm

    from .common import LossLog, find_checkpoint, save_checkpoint
    from .loop import build_scheduler, optimizer_step

    time_bins = getattr(model.config, "time_bins", None)
    if settings.bag_level not in ("slide", "case"):
        raise ValueError(f"bag_level must be 'slide' or 'case', got {settings.bag_level!r}.")
    by_case = settings.bag_level == "case"
    train_set = BagDataset(data, fold.train, store, time_bins=time_bins, max_patches=settings.max_patches,
                           seed=settings.seed + fold.index, train=True, by_case=by_case)
    sampler = EpochSampler(len(train_set), settings.seed + fold.index)
    loader = DataLoader(train_set, batch_size=settings.batch_size, sampler=sampler, collate_fn=collate_bags)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / settings.gradient_accumulation_steps)
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_train_steps:
        total_steps = min(total_steps, settings.max_train_steps)
    scheduler = build_scheduler(settings.lr_scheduler_type, optimizer, 0, total_steps, accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    has_val = len(fold.val) > 0
    on = settings.early_stopping
    if on == "auto":
        on = "metric" if _can_score(data, fold.val) else "loss"
    elif on == "metric" and has_val and not _can_score(data, fold.val):
        raise ValueError(f"fold {fold.index}: the validation set cannot be scored ({len(fold.val)} slides, one class "
                         "or no event); use --early-stopping loss or a larger --val-fraction.")
    state = {"epoch": 0, "best_metric": None, "best_loss": None, "best_epoch": -1, "bad_epochs": 0, "step": 0,
             "history": []}
    best_state = None
    fold_dir = Path(fold_dir) if fold_dir is not None else None
    resume_step = None
    if fold_dir is not None and resume:
        checkpoint = find_checkpoint("latest", str(fold_dir))
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            state.update(json.loads((checkpoint / "trainer_state.json").read_text()))
            resume_step = state["epoch"]
            if (fold_dir / "best" / "model.safetensors").is_file():
                from safetensors.torch import load_file

                best_state = load_file(str(fold_dir / "best" / "model.safetensors"))
            logger.info("fold %d: resumed at epoch %d from %s", fold.index, state["epoch"], checkpoint)
    loss_log = LossLog(str(fold_dir), enabled=fold_dir is not None and accelerator.is_main_process,
                       resume_step=resume_step) if fold_dir is not None else None

    bar = tqdm(range(state["epoch"], settings.epochs), desc=f"fold {fold.index}", leave=False,
               disable=not progress or not accelerator.is_local_main_process)
    for epoch in bar:
        model.train()
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        running, count = 0.0, 0
        for batch in loader:
            if settings.max_train_steps and state["step"] >= settings.max_train_steps:
                break
            batch.pop("rows")
            if data.task == "survival":
                batch.pop("times")  # bins are precomputed in `labels`
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                optimizer_step(accelerator, model, optimizer, scheduler, loss, settings.max_grad_norm)
                if accelerator.sync_gradients:
                    state["step"] += 1
            running += float(loss.detach())
            count += 1
        record = {"epoch": epoch, "train_loss": running / max(count, 1), "lr": scheduler.get_last_lr()[0]}
        improved = not has_val
        if has_val:
            preds = predict(unwrapped, data, fold.val, store, by_case=by_case)
            metric = score(data, fold.val, preds)[primary_metric(data.task)] if on == "metric" else math.nan
            record.update(val_loss=preds["loss"], val_metric=metric)
            improved = _better(metric, preds["loss"], state["best_metric"], state["best_loss"], on)
            if improved:
                state.update(best_metric=None if on == "loss" else metric, best_loss=preds["loss"], best_epoch=epoch,
                             bad_epochs=0)
            else:
                state["bad_epochs"] += 1
        if improved:
            state["best_epoch"] = epoch
            best_state = {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}
            if fold_dir is not None and accelerator.is_main_process:
                unwrapped.save_pretrained(fold_dir / "best")
        state["history"].append(record)
        state["epoch"] = epoch + 1
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("train_loss", "val_loss", "val_metric")})
        if loss_log is not None:
            loss_log.log(epoch + 1, **{k: v for k, v in record.items() if k in ("train_loss", "val_loss")})
        if accelerator.trackers:
            accelerator.log({f"fold_{fold.index}/{k}": v for k, v in record.items() if k != "epoch"}, step=epoch)
        if fold_dir is not None:
            checkpoint = save_checkpoint(accelerator, str(fold_dir), epoch + 1, extra={k: v for k, v in state.items()})
            if accelerator.is_main_process:
                for old in fold_dir.glob("checkpoint-*"):
                    if old != checkpoint:
                        shutil.rmtree(old, ignore_errors=True)
        stop_steps = settings.max_train_steps and state["step"] >= settings.max_train_steps
        if stop_steps or (has_val and state["bad_epochs"] >= settings.patience and epoch + 1 >= settings.min_epochs):
            break
    bar.close()
    if best_state is not None:
        unwrapped.load_state_dict(best_state)
    if loss_log is not None and accelerator.is_main_process:
        loss_log.plot(fold_dir / "loss.png", title=f"fold {fold.index}: loss per epoch")
    run = FoldRun(fold=fold.index, best_epoch=state["best_epoch"], epochs_run=state["epoch"], early_stopping_on=on,
                  best_val_metric=state["best_metric"], history=state["history"])
    accelerator.free_memory()
    return unwrapped, run


# ----------------------------------------------------------------------------------------------------------
# cross-validation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CVResult:
    """Out-of-fold test predictions (`rows` into the task, `fold` per row) and per-fold records."""

    rows: np.ndarray
    fold: np.ndarray
    preds: dict[str, np.ndarray]
    folds: list[dict]
    attention: list[dict] = field(default_factory=list)


def run_cross_validation(
    data: TaskData,
    folds: list[Fold],
    settings: MILSettings,
    accelerator,
    store: FeatureStore | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    attention_slides: int = 0,
    progress: bool = True,
    aggregator=None,
) -> CVResult:
    """Trains and tests one head per fold. With `output_dir`, each fold's best model is saved with
    `save_pretrained` in `output_dir/fold_K` together with `fold_result.json`; with `resume`, finished
    folds are read back instead of retrained and an unfinished one continues from its checkpoint.
    `aggregator`: an already loaded pretrained aggregator for `init="mstar+"` (else `settings.aggregator` is
    loaded once here)."""
    from accelerate.utils import set_seed

    store = store or FeatureStore(data)
    if settings.init == "mstar+" and aggregator is None:
        aggregator = load_pretrained_aggregator(settings.aggregator)
    rows, fold_ids, records, attention = [], [], [], []
    preds: dict[str, list] = {}
    for fold in folds:
        fold_dir = Path(output_dir) / f"fold_{fold.index}" if output_dir is not None else None
        done = fold_dir / "fold_result.json" if fold_dir is not None else None
        if resume and done is not None and done.is_file():
            saved = json.loads(done.read_text())
            fold_preds = {k: np.asarray(v, dtype=np.float64) for k, v in saved.pop("predictions").items()}
            logger.info("fold %d: finished earlier, read from %s", fold.index, done)
            model = None
        else:
            set_seed(settings.seed + fold.index)
            model = build_model(data, settings, fold.train, aggregator=aggregator).to(accelerator.device)
            model, run = train_fold(model, data, fold, settings, accelerator, store, fold_dir=fold_dir, resume=resume,
                                    progress=progress)
            fold_preds = predict(model, data, fold.test, store, by_case=settings.bag_level == "case")
            saved = {**fold.summary(), **asdict(run), "test_loss": fold_preds["loss"],
                     "test_metrics": score(data, fold.test, fold_preds), "slide_ids": [data.slide_ids[i] for i in fold.test]}
            if data.task == "survival":
                saved["time_bins"] = list(model.config.time_bins)
            if fold_dir is not None and accelerator.is_main_process:
                model.save_pretrained(fold_dir)
                shutil.rmtree(fold_dir / "best", ignore_errors=True)
                for old in fold_dir.glob("checkpoint-*"):
                    shutil.rmtree(old, ignore_errors=True)
                payload = {**saved, "predictions": {k: np.asarray(v).tolist() for k, v in fold_preds.items() if k != "loss"}}
                tmp = fold_dir / "fold_result.json.tmp"
                tmp.write_text(json.dumps(payload, indent=2, default=float))
                os.replace(tmp, done)
            accelerator.wait_for_everyone()
        records.append(saved)
        rows.append(np.asarray(fold.test))
        fold_ids.append(np.full(len(fold.test), fold.index))
        for key, value in fold_preds.items():
            if key != "loss":
                preds.setdefault(key, []).append(np.asarray(value))
        if attention_slides > len(attention) and model is not None:
            attention += attention_maps(model, data, fold.test[: attention_slides - len(attention)], store)
    return CVResult(rows=np.concatenate(rows), fold=np.concatenate(fold_ids),
                    preds={k: np.concatenate(v) for k, v in preds.items()}, folds=records, attention=attention)


__all__ = [
    "BagDataset",
    "CVResult",
    "EpochSampler",
    "FeatureStore",
    "FoldRun",
    "MILSettings",
    "attention_maps",
    "build_model",
    "case_bags",
    "collate_bags",
    "load_pretrained_aggregator",
    "predict",
    "primary_metric",
    "run_cross_validation",
    "score",
]
