"""One downstream evaluation over one or several feature folders (the engine of `mstar-hf evaluate`).

Every feature folder is evaluated on the same slides, folds and seeds, so their predictions are paired
case by case: the first folder is the reference and each other one gets paired case-bootstrap p-values.
Scores are per case (patient) by default (`evaluation.report`); the headline figure is the mean +- std
over folds, or a fixed test split's value with its case-bootstrap CI, and a split notice says where the
split comes from, its sizes in cases, and warns about tiny test sides or missing classes.
Writes `results.json`, `predictions_<name>.csv` and the plots into `out_dir`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..evaluation.bootstrap import DEFAULT_BOOTSTRAP, bootstrap_ci, paired_bootstrap
from ..evaluation.cohort import align_tasks, load_task
from .mil import FeatureStore, MILSettings, load_pretrained_aggregator, primary_metric, run_cross_validation
from ..evaluation.report import (
    compare,
    format_table,
    scored,
    split_notice,
    summarize,
    write_json,
    write_predictions_csv,
)
from ..evaluation.splits import make_folds

logger = logging.getLogger(__name__)

EVAL_TASKS = ("classification", "survival", "linear-probe", "few-shot")


@dataclass
class EvaluationConfig:
    manifest: str
    out_dir: str
    task: str = "classification"
    features: list[str] | None = None  # feature folders (None: the manifest's features_path as is)
    names: list[str] | None = None
    label: str = "label"
    time_column: str = "time"
    event_column: str = "event"
    folds: int = 5
    splits: str = "auto"  # auto | manifest | kfold
    split_from_first_slide: bool = False  # a case with slides on two sides of the split column takes its first's
    score_level: str = "case"  # "case": one score per patient (mean over its slides); "slide"
    val_fraction: float = 0.2
    num_bootstrap: int = DEFAULT_BOOTSTRAP
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    draws: int = 10
    C: float = 1.0
    heatmaps: int = 0
    skip_missing: bool = False
    cpu: bool = False
    progress: bool = True
    mil: MILSettings = field(default_factory=MILSettings)


def _names(config: EvaluationConfig) -> list[str]:
    if not config.features:
        return config.names[:1] if config.names else ["features"]
    if config.names:
        if len(config.names) != len(config.features):
            raise ValueError(f"--names gives {len(config.names)} names for {len(config.features)} feature folders.")
        names = list(config.names)
    else:
        names = [os.path.basename(os.path.normpath(f)) or f"features_{i}" for i, f in enumerate(config.features)]
    if len(set(names)) < len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return names


def run_evaluation(config: EvaluationConfig) -> dict:
    """Runs the evaluation; returns the results dict written to `out_dir/results.json` (its "table" is the
    printed table)."""
    from ..evaluation import plots

    if config.task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {EVAL_TASKS}, got {config.task!r}.")
    started = time.time()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "survival" if config.task == "survival" else "classification"
    names = _names(config)
    dirs = config.features or [None]
    tasks = []
    for d in dirs:
        class_names = tasks[0].class_names if tasks else None
        tasks.append(load_task(config.manifest, kind, label_column=config.label, features_dir=d,
                               time_column=config.time_column, event_column=config.event_column,
                               skip_missing=config.skip_missing, class_names=class_names))
    if len(tasks) > 1:
        tasks = align_tasks(tasks)
    ref = tasks[0]
    use_splits = {"auto": None, "manifest": True, "kfold": False}[config.splits]
    if config.task == "few-shot":
        # few-shot needs no folds: supports come from the train (+ val) split and queries from the test split
        # when the manifest has them, else from all slides (queries: the cases outside each support set)
        fixed = use_splits is True or (use_splits is None and all(s is not None for s in ref.splits))
        folds = make_folds(ref, val_fraction=0.0, use_manifest_splits=True,
                           split_from_first_slide=config.split_from_first_slide) if fixed else []
    else:
        folds = make_folds(ref, folds=config.folds, seed=config.mil.seed, val_fraction=config.val_fraction,
                           use_manifest_splits=use_splits, split_from_first_slide=config.split_from_first_slide)
    notice = split_notice(ref, folds)
    for line in notice["warnings"]:
        logger.warning(line)
    settings = config.mil
    # one pretrained aggregator, loaded once, initialises every fold's head (and gives probe embeddings)
    aggregator = load_pretrained_aggregator(settings.aggregator) if settings.init == "mstar+" else None
    primary = primary_metric(kind)
    results: dict = {
        "task": config.task, "manifest": ref.manifest, "label": config.label if kind == "classification" else None,
        "classes": ref.class_names, "n_slides": len(ref), "n_cases": len(set(ref.case_ids)),
        "excluded": ref.excluded, "folds": [f.summary() for f in folds], "primary_metric": primary,
        "score_level": config.score_level, "split_source": notice["source"], "split_sizes": notice["sizes"],
        "warnings": notice["warnings"], "notice": notice["text"],
        "reference": names[0], "settings": {**asdict(config), "mil": asdict(config.mil)}, "feature_sets": {},
        "comparisons": [], "plots": [],
    }
    if kind == "classification":
        results["class_counts"] = dict(zip(ref.class_names, np.bincount(ref.labels, minlength=ref.num_classes).tolist()))
    else:
        results["n_events"] = int(ref.events.sum())

    table_rows = []
    if config.task == "few-shot":
        _few_shot(config, tasks, names, folds, aggregator, results, table_rows, out_dir)
    else:
        outputs = {}
        for name, data in zip(names, tasks):
            store = FeatureStore(data)
            if config.task == "linear-probe":
                from ..evaluation.probes import linear_probe, slide_embeddings

                emb = slide_embeddings(data, store, aggregator, progress=config.progress)
                rows, fold_ids, preds, records = linear_probe(data, folds, emb, C=config.C, seed=settings.seed)
                attention = []
            else:
                from accelerate import Accelerator

                accelerator = Accelerator(cpu=config.cpu)
                cv = run_cross_validation(data, folds, settings, accelerator, store, aggregator=aggregator,
                                          attention_slides=config.heatmaps, progress=config.progress)
                rows, fold_ids, preds, records, attention = cv.rows, cv.fold, cv.preds, cv.folds, cv.attention
            summary = summarize(data, rows, preds, records, num_bootstrap=config.num_bootstrap, seed=settings.seed,
                                fold=fold_ids, level=config.score_level)
            summary["features_dir"] = data.features_dir
            summary["feature_dim"] = data.feature_dim
            csv_path = write_predictions_csv(out_dir / f"predictions_{name}.csv", data, rows, preds, fold_ids)
            summary["predictions_csv"] = csv_path
            results["feature_sets"][name] = summary
            outputs[name] = (rows, preds, fold_ids, attention)
            table_rows.append({"name": name, **summary})
        # paired comparisons against the reference, on the same cases in the same order
        ref_rows, ref_preds = outputs[names[0]][:2]
        for name, row in zip(names[1:], table_rows[1:]):
            rows, preds = outputs[name][:2]
            if not np.array_equal(rows, ref_rows):
                raise RuntimeError("internal error: feature sets were scored on different slides.")
            comp = compare(ref, rows, ref_preds, preds, num_bootstrap=config.num_bootstrap, seed=settings.seed,
                           level=config.score_level)
            row["comparison"] = comp
            results["comparisons"].append({"a": names[0], "b": name, "metrics": comp})
        results["plots"] += _plots(kind, ref, names, outputs, out_dir, config, plots)

    metrics = ["macro_auc", "balanced_accuracy", "weighted_f1"] if kind == "classification" else ["c_index"]
    results["table"] = format_table(table_rows, metrics, reference=names[0], primary=primary,
                                    spread="draws" if config.task == "few-shot" else "folds")
    results["seconds"] = round(time.time() - started, 2)
    write_json(out_dir / "results.json", results)
    return results


def _plots(kind, ref, names, outputs, out_dir, config, plots) -> list[str]:
    written = []
    rows = outputs[names[0]][0]
    # the curves count what the metrics count: one point per case at case level (mean of its slides)
    per = {n: scored(ref, rows, outputs[n][1], outputs[n][2], config.score_level) for n in names}
    truth, _, fold_of, _ = per[names[0]]
    if kind == "classification":
        written.append(plots.plot_roc(truth[0], {n: per[n][1] for n in names}, ref.class_names,
                                      out_dir / "roc.png",
                                      title=f"{config.task}: {config.label} ({config.score_level} level)"))
    else:
        written.append(plots.plot_kaplan_meier(truth[0], truth[1], {n: per[n][1] for n in names},
                                               out_dir / "kaplan_meier.png", groups=fold_of))
    if config.heatmaps:
        (out_dir / "heatmaps").mkdir(exist_ok=True)
        for name in names:
            for amap in outputs[name][3]:
                slide_path = ref.slide_paths[amap["row"]]
                if not slide_path or not os.path.isfile(slide_path) or amap["coords"] is None:
                    logger.warning("no heatmap for %s: slide file or coords missing", amap["slide_id"])
                    continue
                written.append(plots.plot_attention_heatmap(
                    slide_path, amap["coords"], amap["scores"], out_dir / "heatmaps" / f"{name}_{amap['slide_id']}.png",
                    patch_size_level0=amap["patch_size_level0"], title=f"{amap['slide_id']} ({name}): attention"))
    return written


def _few_shot(config, tasks, names, folds, aggregator, results, table_rows, out_dir):
    from ..evaluation import plots
    from ..evaluation.probes import few_shot, slide_embeddings

    pool = np.concatenate([folds[0].train, folds[0].val]) if folds else None
    queries = folds[0].test if folds else None
    keys = ["macro_auc", "balanced_accuracy", "weighted_f1", "accuracy"]

    def mean_fn(m):
        return dict(zip(keys, m.mean(axis=0)))

    per_draw = {}
    curves = {}
    for name, data in zip(names, tasks):
        emb = slide_embeddings(data, FeatureStore(data), aggregator, progress=config.progress)
        results["feature_sets"][name] = {"features_dir": data.features_dir, "feature_dim": int(emb.shape[1]), "shots": {}}
        for k in config.shots:
            try:
                out = few_shot(data, emb, k, draws=config.draws, seed=config.mil.seed, pool=pool, queries=queries)
            except ValueError as e:
                results["feature_sets"][name]["shots"][str(k)] = {"skipped": str(e)}
                logger.warning("%s: %s", name, e)
                continue
            matrix = np.stack([out["per_draw"][m] for m in keys], axis=1)  # [draws, metrics]
            per_draw[(name, k)] = matrix
            summary = {"n_draws": config.draws, "metrics": bootstrap_ci(mean_fn, matrix, num_samples=config.num_bootstrap,
                                                                         seed=config.mil.seed),
                       "fold_mean": dict(zip(keys, np.nanmean(matrix, 0).tolist())),
                       "fold_std": dict(zip(keys, np.nanstd(matrix, 0).tolist())),
                       "n_query": [d["n_query"] for d in out["draws"]],
                       "n_query_cases": [d["n_query_cases"] for d in out["draws"]]}
            results["feature_sets"][name]["shots"][str(k)] = summary
            curves.setdefault(name, {})[k] = summary["metrics"]["macro_auc"]
            row = {"name": f"{name} ({k}-shot)", "is_reference": name == names[0], "_order": (k, names.index(name)),
                   **summary}
            if name != names[0] and (names[0], k) in per_draw:
                row["comparison"] = paired_bootstrap(lambda m: mean_fn(m), (), per_draw[(names[0], k)], matrix,
                                                     num_samples=config.num_bootstrap, seed=config.mil.seed)
                results["comparisons"].append({"a": names[0], "b": name, "shots": k, "metrics": row["comparison"]})
            table_rows.append(row)
    table_rows.sort(key=lambda r: r["_order"])
    if curves:
        results["plots"].append(plots.plot_few_shot(curves, "macro_auc", out_dir / "few_shot.png",
                                                    title=f"few-shot nearest prototype: {config.label}"))


__all__ = ["EVAL_TASKS", "EvaluationConfig", "run_evaluation"]
