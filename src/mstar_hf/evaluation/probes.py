"""Slide-embedding probes: linear probe (logistic regression, scikit-learn) and few-shot nearest prototype.

Slide embeddings are the mean of a slide's patch features, or, with a pretrained mSTAR aggregator,
its class token ("mSTAR+" slide embedding).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .cohort import TaskData
from .splits import Fold

logger = logging.getLogger(__name__)


@torch.no_grad()
def slide_embeddings(data: TaskData, store, aggregator=None, progress: bool = False) -> np.ndarray:
    """[n_slides, D] mean-pooled patch features, or [n_slides, H] aggregator slide embeddings."""
    from tqdm.auto import tqdm

    if aggregator is not None:
        if aggregator.config.input_dim != data.feature_dim:
            raise ValueError(f"the aggregator takes {aggregator.config.input_dim}-d features but "
                             f"{data.features_dir or data.manifest} has {data.feature_dim}-d ones.")
        aggregator.eval()
        device = next(aggregator.parameters()).device
    out = []
    for path, case in tqdm(list(zip(data.feature_paths, data.case_ids)), desc="slide embeddings", disable=not progress):
        features = store.get(path, case)
        if aggregator is None:
            out.append(features.astype(np.float64).mean(axis=0))
        else:
            out.append(aggregator(torch.from_numpy(features)[None].to(device)).slide_embeds[0].double().cpu().numpy())
    return np.stack(out)


def linear_probe(data: TaskData, folds: list[Fold], embeddings: np.ndarray, C: float = 1.0, max_iter: int = 2000,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict, list[dict]]:
    """Logistic regression on standardised slide embeddings, fitted on each fold's train + val slides and
    scored on its test slides (per-fold metrics per case). Returns (rows, fold per row, {"probs": [n, C]}, per-fold records)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .report import score_cases

    if data.task != "classification":
        raise ValueError("the linear probe is a classification task; use --task survival for survival.")
    rows, fold_ids, probs, records = [], [], [], []
    for fold in folds:
        train = np.concatenate([fold.train, fold.val])
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
        probe.fit(embeddings[train], data.labels[train])
        # classes missing from a training part were rejected by make_folds, so columns = all classes
        p = np.zeros((len(fold.test), data.num_classes))
        p[:, probe.classes_] = probe.predict_proba(embeddings[fold.test])
        rows.append(fold.test)
        fold_ids.append(np.full(len(fold.test), fold.index))
        probs.append(p)
        records.append({**fold.summary(), "test_metrics": score_cases(data, fold.test, {"probs": p})})
    return np.concatenate(rows), np.concatenate(fold_ids), {"probs": np.concatenate(probs)}, records


def few_shot_draws(data: TaskData, shots: int, draws: int, seed: int = 0, pool=None, queries=None) -> list[dict]:
    """`draws` random support sets of `shots` cases per class (one slide each) from `pool` (default: all
    slides). The queries of a draw are `queries` (default: the pool slides of cases outside the support).
    The draws depend only on the labels, cases and seed, so every feature set gets the same ones."""
    pool = np.arange(len(data)) if pool is None else np.asarray(pool)
    rng = np.random.default_rng([seed, shots])
    cases_by_class: dict[int, dict[str, int]] = {}
    for i in pool:
        cases_by_class.setdefault(int(data.labels[i]), {}).setdefault(data.case_ids[i], int(i))
    short = {data.class_names[c]: len(v) for c, v in cases_by_class.items() if len(v) < shots}
    missing = [data.class_names[c] for c in range(data.num_classes) if c not in cases_by_class]
    if short or missing:
        raise ValueError(f"{shots}-shot: not enough cases per class in the support pool "
                         f"({short or ''}{' missing: ' + str(missing) if missing else ''}).")
    out = []
    for _ in range(draws):
        support = []
        for c in range(data.num_classes):
            cases = sorted(cases_by_class[c])
            picked = rng.choice(len(cases), size=shots, replace=False)
            support += [cases_by_class[c][cases[k]] for k in picked]
        support = np.asarray(sorted(support))
        if queries is None:
            used = {data.case_ids[i] for i in support}
            query = np.asarray([i for i in pool if data.case_ids[i] not in used])
        else:
            query = np.asarray(queries)
        out.append({"support": support, "query": query})
    return out


def few_shot_predict(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, support, query,
                     temperature: float = 0.07) -> np.ndarray:
    """Nearest-prototype class probabilities [n_query, C]: a prototype is the mean L2-normalised support
    embedding of a class; probabilities are a softmax of cosine similarities / temperature."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    protos = np.stack([x[support][labels[support] == c].mean(axis=0) for c in range(num_classes)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True).clip(min=1e-12)
    logits = x[query] @ protos.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def few_shot(data: TaskData, embeddings: np.ndarray, shots: int, draws: int = 10, seed: int = 0, pool=None,
             queries=None) -> dict:
    """Per draw: the metrics of nearest-prototype classification of the queries, one score per query case
    (the mean probabilities of its slides). Returns {"draws": [{"metrics", "n_query" (slides),
    "n_query_cases"}], "per_draw": {metric: [draws]}}."""
    from .report import score_cases

    if data.task != "classification":
        raise ValueError("few-shot is a classification task.")
    results = []
    for draw in few_shot_draws(data, shots, draws, seed=seed, pool=pool, queries=queries):
        probs = few_shot_predict(embeddings, data.labels, data.num_classes, draw["support"], draw["query"])
        results.append({"metrics": score_cases(data, draw["query"], {"probs": probs}),
                        "n_query": int(len(draw["query"])),
                        "n_query_cases": len({data.case_ids[i] for i in draw["query"]})})
    keys = results[0]["metrics"].keys()
    return {"draws": results, "per_draw": {k: np.array([r["metrics"][k] for r in results]) for k in keys}}


__all__ = ["few_shot", "few_shot_draws", "few_shot_predict", "linear_probe", "slide_embeddings"]
