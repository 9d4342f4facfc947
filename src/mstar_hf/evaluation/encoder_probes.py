"""Is one patch encoder better than another downstream? Held-out probes on patch features, with CIs.

The protocols the paper uses to compare patch encoders, run on a fixed train / held-out split of cases
(every feature set gets the same split and the same few-shot draws):

* `nearest_centroid`: class centroids of any slide-level vector (e.g. mean RGB: the colour baseline).
* `linear_probe`: logistic regression on standardised mean-pooled patch features.
* `few_shot_prototypes`: k support slides per class, nearest L2-normalised prototype (cosine), averaged
  over random draws of the support.
* `abmil_probe`: an attention-MIL head (Ilse et al. 2018, the paper's ABMIL layout scaled down)
  trained on the patch features of the training slides.

Every protocol returns per-case correctness (0/1, or the share of few-shot draws that got the case
right), so `balanced_accuracy_of` gives the balanced accuracy and `compare_encoders` a paired bootstrap
of the difference over cases (`evaluation.bootstrap`).

Stage 2's training target is measured by `distillation_metrics`: centred cosine, R^2 and patch
retrieval@1 of the student's predictions against the teacher's targets, each next to what predicting the
mean training target gives (a bias alone reaches a high plain cosine when the targets share a direction).
"""

from __future__ import annotations

import numpy as np
import torch

from .bootstrap import bootstrap_ci, paired_bootstrap


def balanced_accuracy_of(labels, correct) -> float:
    """Mean over classes of the mean per-case correctness (equals sklearn's balanced accuracy for 0/1
    correctness, and the draw-averaged balanced accuracy for few-shot shares)."""
    labels, correct = np.asarray(labels), np.asarray(correct, dtype=np.float64)
    classes = np.unique(labels)
    return float(np.mean([correct[labels == c].mean() for c in classes]))


def _check(train_x, train_y, test_x, test_y):
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [n, D] with the same D, got {train_x.shape} and {test_x.shape}.")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels differ in length.")
    missing = set(test_y.tolist()) - set(train_y.tolist())
    if missing:
        raise ValueError(f"held-out classes without training cases: {sorted(missing)}.")
    return train_x, train_y, test_x, test_y


def nearest_centroid(train_x, train_y, test_x, test_y) -> np.ndarray:
    """Per-case correctness of the nearest class centroid (Euclidean)."""
    train_x, train_y, test_x, test_y = _check(train_x, train_y, test_x, test_y)
    classes = np.unique(train_y)
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in classes])
    d = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)
    return (classes[d.argmin(axis=1)] == test_y).astype(np.float64)


def linear_probe(train_x, train_y, test_x, test_y, C: float = 1.0, seed: int = 0) -> np.ndarray:
    """Per-case correctness of logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, train_y, test_x, test_y = _check(train_x, train_y, test_x, test_y)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, random_state=seed))
    probe.fit(train_x, train_y)
    return (probe.predict(test_x) == test_y).astype(np.float64)


def few_shot_prototypes(train_x, train_y, test_x, test_y, shots: int, draws: int = 50, seed: int = 0) -> np.ndarray:
    """Per-case share of `draws` random k-shot support sets (from the training cases) under which the
    nearest L2-normalised class prototype is the case's class."""
    train_x, train_y, test_x, test_y = _check(train_x, train_y, test_x, test_y)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)

    classes = np.unique(train_y)
    members = {c: np.flatnonzero(train_y == c) for c in classes}
    short = {str(c): len(m) for c, m in members.items() if len(m) < shots}
    if short:
        raise ValueError(f"{shots}-shot: too few training cases per class: {short}.")
    x, q = unit(train_x), unit(test_x)
    rng = np.random.default_rng([seed, shots])
    correct = np.zeros(len(q))
    for _ in range(draws):
        protos = unit(np.stack([x[rng.choice(members[c], shots, replace=False)].mean(axis=0) for c in classes]))
        correct += classes[(q @ protos.T).argmax(axis=1)] == test_y
    return correct / draws


class _ABMIL(torch.nn.Module):
    """Attention MIL: Linear -> ReLU -> Dropout, attention Linear -> Tanh -> Linear(1), softmax over
    patches, classifier on the attention-weighted mean (the paper's ABMIL, widths scaled down)."""

    def __init__(self, dim: int, hidden: int, attention: int, num_classes: int):
        super().__init__()
        self.embed = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.25))
        self.attention = torch.nn.Sequential(torch.nn.Linear(hidden, attention), torch.nn.Tanh(),
                                             torch.nn.Linear(attention, 1))
        self.classifier = torch.nn.Linear(hidden, num_classes)

    def forward(self, x):  # x: [N, D]
        h = self.embed(x)
        a = torch.softmax(self.attention(h).squeeze(-1), dim=0)
        return self.classifier(a @ h)


def abmil_probe(train_bags, train_y, test_bags, test_y, epochs: int = 30, hidden: int = 64, attention: int = 32,
                lr: float = 1e-3, weight_decay: float = 1e-5, seed: int = 0) -> np.ndarray:
    """Per-case correctness of an ABMIL head trained (Adam, batch 1) on standardised patch features."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    classes = np.unique(train_y)
    if set(test_y.tolist()) - set(classes.tolist()):
        raise ValueError("held-out classes without training cases.")
    stacked = np.concatenate([np.asarray(b, np.float64) for b in train_bags])
    mean, std = stacked.mean(axis=0), stacked.std(axis=0) + 1e-6
    train = [torch.as_tensor((np.asarray(b) - mean) / std, dtype=torch.float32) for b in train_bags]
    test = [torch.as_tensor((np.asarray(b) - mean) / std, dtype=torch.float32) for b in test_bags]
    index = {c: i for i, c in enumerate(classes.tolist())}
    targets = torch.as_tensor([index[c] for c in train_y.tolist()])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _ABMIL(train[0].shape[1], hidden, attention, len(classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        model.train()
        for i in torch.randperm(len(train), generator=generator).tolist():
            loss = torch.nn.functional.cross_entropy(model(train[i])[None], targets[i:i + 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = np.asarray([classes[int(model(b).argmax())] for b in test])
    return (predicted == test_y).astype(np.float64)


def _balanced(labels, correct):
    return {"balanced_accuracy": balanced_accuracy_of(labels, correct)}


def summarise(labels, correct, num_samples: int = 1000, seed: int = 0) -> dict:
    """Balanced accuracy with its bootstrap CI over cases."""
    ci = bootstrap_ci(_balanced, labels, correct, num_samples=num_samples, seed=seed)["balanced_accuracy"]
    return {"balanced_accuracy": ci["value"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "n": len(labels)}


def compare_encoders(labels, correct_a, correct_b, num_samples: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap over cases of balanced accuracy, b - a (a: e.g. the initial encoder, b: Stage 2)."""
    out = paired_bootstrap(_balanced, (labels,), correct_a, correct_b, num_samples=num_samples, seed=seed)
    return out["balanced_accuracy"]


def unit_mean(vectors) -> np.ndarray:
    """Mean of the L2-normalised rows: the `train_target_mean` that `distillation_metrics` expects."""
    v = np.asarray(vectors, np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True).clip(min=1e-12)).mean(axis=0)


def distillation_metrics(pred, target, train_target_mean) -> dict:
    """How well predictions `pred` [n, H] match the teacher targets `target` [n, H] of held-out patches.

    The cosine loss fixes only directions, so everything is measured on L2-normalised vectors, centred
    on `train_target_mean` = `unit_mean(training targets)`:
    - `cosine`: mean plain cosine (what the loss sees); `mean_target_cosine`: the same for predicting the
      training mean for every patch (a bias alone; high when the targets share one direction).
    - `centred_cosine`: cosine of the centred unit vectors (about 0 for the mean predictor).
    - `r2`: 1 - SSE / SST of the unit vectors, SST around `train_target_mean`.
    - `retrieval@1`: share of patches whose own target is the nearest (centred cosine) of all held-out
      targets to their prediction; `chance@1` = 1 / n is what a constant prediction gets.
    """
    p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    mu = np.asarray(train_target_mean, np.float64)
    if p.shape != t.shape or p.ndim != 2 or mu.shape != (p.shape[1],):
        raise ValueError(f"pred and target must be [n, H] with a [H] mean, got {p.shape}, {t.shape}, {mu.shape}.")

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)

    pu, tu = unit(p), unit(t)
    pc, tc = pu - mu, tu - mu
    sims = unit(pc) @ unit(tc).T
    hits = sims.argmax(axis=1) == np.arange(len(p))
    return {
        "n": int(len(p)),
        "cosine": float((pu * tu).sum(1).mean()),
        "mean_target_cosine": float((unit(mu)[None] * tu).sum(1).mean()),
        "centred_cosine": float((unit(pc) * unit(tc)).sum(1).mean()),
        "r2": float(1 - ((pu - tu) ** 2).sum() / max(float((tc ** 2).sum()), 1e-12)),
        "retrieval@1": float(hits.mean()),
        "chance@1": 1.0 / len(p),
    }


def mean_pairwise_cosine(vectors, max_rows: int = 2000, seed: int = 0) -> float:
    """Mean cosine between distinct rows of `vectors` [n, D] (a seeded sample of at most `max_rows`): near 1
    means the vectors are nearly collinear, a collapsed space in which nearest-prototype and cosine
    comparisons see little but the shared direction."""
    v = np.asarray(vectors, np.float64)
    if v.ndim != 2 or len(v) < 2:
        raise ValueError(f"need [n >= 2, D] vectors, got shape {v.shape}.")
    if len(v) > max_rows:
        v = v[np.random.default_rng(seed).choice(len(v), max_rows, replace=False)]
    u = v / np.linalg.norm(v, axis=1, keepdims=True).clip(min=1e-12)
    sims = u @ u.T
    n = len(u)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


__all__ = ["abmil_probe", "balanced_accuracy_of", "compare_encoders", "distillation_metrics", "few_shot_prototypes",
           "linear_probe", "mean_pairwise_cosine", "nearest_centroid", "summarise", "unit_mean"]
