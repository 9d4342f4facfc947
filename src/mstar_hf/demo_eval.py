"""The demo's held-out measurements beyond the pipelines: how hard the cohort is, and what Stage 2 changed.

* `difficulty_baselines`: what needs no learning, on the same held-out cases: nearest centroid on a
  slide's mean RGB (over its tissue patches), and the mean-pooled features of the initial encoder (Stage 2's
  start, pretrained on other slides) and of an untrained (random) one, with a linear probe and few-shot
  prototypes (k = 1, 2, 4).
* `encoder_comparison`: the paper's downstream protocols (linear probe, few-shot prototypes, ABMIL) on the
  features of the initial and of the Stage 2 encoder, with bootstrap CIs over cases and a paired
  bootstrap of the difference.
* `teacher_ceiling`: the same mean-pooled protocols on what Stage 2 distils (the frozen Stage 1
  aggregator's patch tokens, and its slide embedding): a student that matched its teacher exactly would
  reach this, so a Stage 2 gain far above the teacher's own gain over the initial features cannot happen.
* `collapse_report`: whether the initial features and Stage 1's slide embeddings are spread out or
  nearly collinear (mean pairwise cosine).
* `distillation_report`: Stage 2's own target, measured so a bias cannot pass: the frozen Stage 1
  aggregator's patch tokens of held-out slides (the teacher) against the Stage 2 student's projected
  features, as centred cosine, R^2 and patch retrieval@1, beside predicting the mean training target and
  beside the best linear map of the *initial* encoder's features (ridge, fitted on training patches).
* `stage2_bounds`: what part of the teacher's gain a patch encoder can reach at all: the teacher with and
  without slide context, the linear (ridge) student, and Stage 2's encoder and projection, all downstream.

The metric code is in `evaluation.encoder_probes`; this module only gathers features and models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .evaluation import encoder_probes as probes

FEW_SHOT_K = (1, 2, 4)


def features_path(case: dict, features_dir: str | Path | None = None) -> str:
    """The case's feature file, or its namesake in `features_dir` (e.g. the Stage 2 encoder's features)."""
    return case["features_path"] if features_dir is None else str(Path(features_dir) / f"{case['slide_id']}.h5")


def load_bags(cases: list[dict], features_dir=None, read_coords: bool = False):
    """Per case, the [n, D] patch features (and [n, 2] level-0 coords)."""
    from .data import read_slide_features

    out = [read_slide_features(features_path(c, features_dir), c["case_id"], read_coords=read_coords) for c in cases]
    return out if read_coords else [f for f, _ in out]


def patch_mean_rgb(cases: list[dict]) -> np.ndarray:
    """[n_cases, 3]: each slide's mean RGB over the tissue patches its features were extracted from."""
    import h5py
    import openslide

    out = []
    for case in cases:
        path = case["features_path"]
        with h5py.File(path, "r") as f:
            coords = f["coords"][:]
            size = int(f["coords"].attrs.get("patch_size_level0", 256))
        slide = openslide.OpenSlide(case["slide_path"])
        try:
            means = [np.asarray(slide.read_region((int(x), int(y)), 0, (size, size)).convert("RGB"), np.float64)
                     .reshape(-1, 3).mean(axis=0) for x, y in coords]
        finally:
            slide.close()
        if not means:
            raise ValueError(f"case {case['case_id']}: no patches in {path}.")
        out.append(np.mean(means, axis=0))
    return np.stack(out)


def _row(labels, correct, seed):
    return probes.summarise(labels, correct, num_samples=1000, seed=seed)


def _mean_pooled(bags) -> np.ndarray:
    return np.stack([np.asarray(b).mean(axis=0) for b in bags])


def _slide_vector_protocols(x_tr, y_tr, x_te, y_te, seed) -> dict[str, np.ndarray]:
    """Per-case correctness of the linear probe and the few-shot prototypes (k in FEW_SHOT_K) on slide vectors."""
    out = {"linear_probe": probes.linear_probe(x_tr, y_tr, x_te, y_te, seed=seed)}
    for k in FEW_SHOT_K:
        out[f"few_shot_k{k}"] = probes.few_shot_prototypes(x_tr, y_tr, x_te, y_te, k, seed=seed)
    return out


def difficulty_baselines(train_cases, test_cases, train_bags, test_bags, seed: int = 0,
                         untrained_bags: tuple[list, list] | None = None) -> dict:
    """Balanced accuracy (+ CI over cases) of the no-learning baselines on the held-out cases: slide mean RGB,
    the initial encoder's mean-pooled features (`*_bags`) and, given `untrained_bags = (train, test)`, those
    of a randomly initialised encoder of the same architecture."""
    y_tr = np.asarray([c["cancer_type"] for c in train_cases])
    y_te = np.asarray([c["cancer_type"] for c in test_cases])
    rgb_tr, rgb_te = patch_mean_rgb(train_cases), patch_mean_rgb(test_cases)
    out = {"chance": 1.0 / len(set(y_tr.tolist())),
           "mean_rgb_nearest_centroid": _row(y_te, probes.nearest_centroid(rgb_tr, y_tr, rgb_te, y_te), seed)}
    encoders = {"initial_encoder": (train_bags, test_bags)}
    if untrained_bags is not None:
        encoders["untrained_encoder"] = untrained_bags
    for name, (tr, te) in encoders.items():
        for protocol, correct in _slide_vector_protocols(_mean_pooled(tr), y_tr, _mean_pooled(te), y_te, seed).items():
            out[f"{name}_{protocol}"] = _row(y_te, correct, seed)
    return out


def encoder_comparison(train_cases, test_cases, bags: dict[str, tuple[list, list]], seed: int = 0,
                       abmil_epochs: int = 30) -> dict:
    """`bags = {"initial": (train_bags, test_bags), "stage2": (...)}`: every protocol on both, and the
    paired difference stage2 - initial (bootstrap over held-out cases)."""
    y_tr = np.asarray([c["cancer_type"] for c in train_cases])
    y_te = np.asarray([c["cancer_type"] for c in test_cases])
    correct: dict[str, dict[str, np.ndarray]] = {}
    for name, (tr, te) in bags.items():
        c = _slide_vector_protocols(_mean_pooled(tr), y_tr, _mean_pooled(te), y_te, seed)
        c["abmil"] = probes.abmil_probe(tr, y_tr, te, y_te, epochs=abmil_epochs, seed=seed)
        correct[name] = c
    out = {}
    names = list(bags)
    for protocol in correct[names[0]]:
        row = {name: _row(y_te, correct[name][protocol], seed) for name in names}
        if len(names) == 2:
            d = probes.compare_encoders(y_te, correct[names[0]][protocol], correct[names[1]][protocol], seed=seed)
            row["difference"] = {k: d[k] for k in ("delta", "ci_low", "ci_high", "p_value")}
        out[protocol] = row
    return out


@torch.no_grad()
def teacher_ceiling(stage1_dir, train_cases, test_cases, init_bags: tuple[list, list], seed: int = 0) -> dict:
    """Linear probe and few-shot prototypes (k in FEW_SHOT_K) on the teacher's outputs for the initial
    features `init_bags = (train, test)`: mean-pooled aggregator patch tokens (Stage 2's target) and the
    aggregator's slide embedding, each with the paired difference to the initial features' mean."""
    from .modeling import MStarModel

    y_tr = np.asarray([c["cancer_type"] for c in train_cases])
    y_te = np.asarray([c["cancer_type"] for c in test_cases])
    aggregator = MStarModel.from_pretrained(str(stage1_dir), dtype=torch.float32).eval().aggregator

    def pooled(bags):
        tokens, slides = [], []
        for b in bags:
            out = aggregator(torch.as_tensor(b, dtype=torch.float32)[None])
            tokens.append(out.patch_embeds[0].double().numpy().mean(axis=0))  # as `_mean_pooled` does
            slides.append(out.slide_embeds[0].double().numpy())
        return np.stack(tokens), np.stack(slides)

    (tok_tr, cls_tr), (tok_te, cls_te) = pooled(init_bags[0]), pooled(init_bags[1])
    base = _slide_vector_protocols(_mean_pooled(init_bags[0]), y_tr, _mean_pooled(init_bags[1]), y_te, seed)
    out = {}
    for name, (x_tr, x_te) in (("patch_tokens", (tok_tr, tok_te)), ("slide_embedding", (cls_tr, cls_te))):
        correct = _slide_vector_protocols(x_tr, y_tr, x_te, y_te, seed)
        out[name] = {}
        for protocol, c in correct.items():
            d = probes.compare_encoders(y_te, base[protocol], c, seed=seed)
            out[name][protocol] = {**_row(y_te, c, seed),
                                   "difference": {k: d[k] for k in ("delta", "ci_low", "ci_high", "p_value")}}
    return out


@torch.no_grad()
def _teacher_and_inputs(aggregator, bags, target: str = "final"):
    from .training_utils.stage2_step import teacher_tokens

    return [teacher_tokens(aggregator, torch.as_tensor(b, dtype=torch.float32)[None], target=target)[0].double().numpy()
            for b in bags]


def ridge_to_teacher(x_tr, t_tr, ridge: float = 1.0):
    """The best linear map of patch features `x_tr` [n, D] onto their teacher targets `t_tr` [n, H]: closed-form
    ridge on training patches, fitted to the unit-normalised targets (the space the metrics and the cosine loss
    live in). Returns the map, features [m, D] -> predictions [m, H] (float64)."""
    x_tr = np.asarray(x_tr, np.float64)
    x_mu, mu = x_tr.mean(axis=0), probes.unit_mean(t_tr)
    a = (x_tr - x_mu).T @ (x_tr - x_mu) + ridge * np.eye(x_tr.shape[1])
    u_tr = t_tr / np.linalg.norm(t_tr, axis=1, keepdims=True).clip(min=1e-12)
    w = np.linalg.solve(a, (x_tr - x_mu).T @ (u_tr - mu))
    return lambda x: (np.asarray(x, np.float64) - x_mu) @ w + mu


@torch.no_grad()
def distillation_report(stage1_dir, stage2_model_dir, init_bags: tuple[list, list], stage2_bags: tuple[list, list],
                        ridge: float = 1.0, teacher_target: str = "final") -> dict:
    """Stage 2's target (`teacher_target`: the tokens that Stage 2 run regressed onto) on held-out patches;
    see the module docstring. `*_bags = (train, test)`."""
    from .modeling import MStarModel

    teacher = MStarModel.from_pretrained(str(stage1_dir), dtype=torch.float32).eval()
    student = MStarModel.from_pretrained(str(stage2_model_dir), dtype=torch.float32).eval()
    t_tr = np.concatenate(_teacher_and_inputs(teacher.aggregator, init_bags[0], teacher_target))
    t_te = np.concatenate(_teacher_and_inputs(teacher.aggregator, init_bags[1], teacher_target))
    mu = probes.unit_mean(t_tr)
    s_te = np.concatenate(stage2_bags[1])
    pred_student = student.get_patch_features(patch_features=torch.as_tensor(s_te, dtype=torch.float32),
                                              space="aggregator").pooler_output.double().numpy()
    pred_before = teacher.get_patch_features(patch_features=torch.as_tensor(np.concatenate(init_bags[1]),
                                             dtype=torch.float32), space="aggregator").pooler_output.double().numpy()
    # the best linear student on the frozen initial features
    pred_ridge = ridge_to_teacher(np.concatenate(init_bags[0]), t_tr, ridge)(np.concatenate(init_bags[1]))
    return {
        "teacher": f"frozen Stage 1 aggregator's patch tokens ({teacher_target}) on the initial encoder's features",
        "stage2_student": probes.distillation_metrics(pred_student, t_te, mu),
        "before_stage2": probes.distillation_metrics(pred_before, t_te, mu),
        "mean_target": probes.distillation_metrics(np.tile(mu, (len(t_te), 1)), t_te, mu),
        "ridge_on_initial_features": probes.distillation_metrics(pred_ridge, t_te, mu),
    }


@torch.no_grad()
def stage2_bounds(stage1_dir, stage2_model_dir, train_cases, test_cases, init_bags: tuple[list, list],
                  stage2_bags: tuple[list, list], seed: int = 0, ridge: float = 1.0) -> dict:
    """How much of the teacher's downstream gain a patch encoder can reach: the mean-pooled protocols
    (linear probe, few-shot k in FEW_SHOT_K) on, each with the paired difference to the initial features,

    - `teacher_whole_slide`: the teacher's patch tokens with the whole slide as context (Stage 2's target,
      = `teacher_ceiling`'s `patch_tokens`);
    - `teacher_patch_alone`: the same aggregator on each patch as a bag of one: what the teacher knows
      that a single patch carries, which is all a patch encoder sees;
    - `ridge_on_initial_features`: the best linear map of the initial features onto the teacher's targets
      (`ridge_to_teacher`, fitted on training patches): a context-free linear student;
    - `stage2_encoder`, `stage2_projection`: the Stage 2 encoder's features, and their projection into the
      aggregator's space (what Stage 2's loss compares with the teacher).

    The gap between the first two is slide context no single patch holds; Stage 2 cannot distil it.
    `*_bags = (train, test)` per case [n, D]."""
    from .modeling import MStarModel

    y_tr = np.asarray([c["cancer_type"] for c in train_cases])
    y_te = np.asarray([c["cancer_type"] for c in test_cases])
    teacher = MStarModel.from_pretrained(str(stage1_dir), dtype=torch.float32).eval()
    student = MStarModel.from_pretrained(str(stage2_model_dir), dtype=torch.float32).eval()
    whole = tuple(_teacher_and_inputs(teacher.aggregator, bags) for bags in init_bags)
    # each patch its own slide: a batch of n bags of one
    alone = tuple([teacher.aggregator(torch.as_tensor(b, dtype=torch.float32)[:, None]).patch_embeds[:, 0]
                   .double().numpy() for b in bags] for bags in init_bags)
    ridge_map = ridge_to_teacher(np.concatenate(init_bags[0]), np.concatenate(whole[0]), ridge)
    linear = tuple([ridge_map(b) for b in bags] for bags in init_bags)
    projected = tuple([student.get_patch_features(patch_features=torch.as_tensor(b, dtype=torch.float32),
                                                  space="aggregator").pooler_output.double().numpy() for b in bags]
                      for bags in stage2_bags)
    rows = {"initial_encoder": init_bags, "teacher_whole_slide": whole, "teacher_patch_alone": alone,
            "ridge_on_initial_features": linear, "stage2_encoder": stage2_bags, "stage2_projection": projected}
    correct = {name: _slide_vector_protocols(_mean_pooled(tr), y_tr, _mean_pooled(te), y_te, seed)
               for name, (tr, te) in rows.items()}
    out = {}
    for name, protocols in correct.items():
        out[name] = {}
        for protocol, c in protocols.items():
            out[name][protocol] = _row(y_te, c, seed)
            if name != "initial_encoder":
                d = probes.compare_encoders(y_te, correct["initial_encoder"][protocol], c, seed=seed)
                out[name][protocol]["difference"] = {k: d[k] for k in ("delta", "ci_low", "ci_high", "p_value")}
    return out


@torch.no_grad()
def collapse_report(stage1_dir, train_bags: list, test_bags: list) -> dict:
    """How spread out the spaces are (`encoder_probes.mean_pairwise_cosine`, near 1 = collapsed): the
    initial encoder's patch features (training slides) and Stage 1's projected slide embeddings of the
    held-out slides. A random patch encoder's features can be nearly collinear; then so are the slide
    embeddings built on them, and zero-shot picks the same class for every slide."""
    from .modeling import MStarModel

    model = MStarModel.from_pretrained(str(stage1_dir), dtype=torch.float32).eval()
    slides = torch.cat([model.get_slide_features(torch.as_tensor(b, dtype=torch.float32)[None]).pooler_output
                        for b in test_bags])
    return {"initial_patch_features": probes.mean_pairwise_cosine(np.concatenate(train_bags)),
            "stage1_slide_embeddings": probes.mean_pairwise_cosine(slides.double().numpy())}


def balanced_permutation(groups, rng: np.random.Generator, partner_groups=None) -> np.ndarray:
    """A permutation `perm` (row i's partner is row `perm[i]`) under which every group's rows get partners
    spread over the partner groups as evenly as the sizes allow (n_t * m_u / N each, rounded up in random
    cells), and no row is its own partner where that can be avoided. A plain random permutation
    leaves chance correlations between the paired types: on the demo's 48 training cases one drew 21
    same-type report pairs where 16 is chance.

    `partner_groups` (default: `groups`) is the group of each row *as a partner*: the control gives a
    missing report its own group, else the empty reports of one type land unevenly and the real
    reports a slide type gets are skewed (6 / 3 / 4 of 13 on a demo shuffle where 4.3 each is even)."""
    groups = np.asarray(groups)
    partner_groups = groups if partner_groups is None else np.asarray(partner_groups)
    if partner_groups.shape != groups.shape:
        raise ValueError(f"partner_groups has {partner_groups.shape[0]} rows, groups {groups.shape[0]}.")
    kinds = sorted(set(groups.tolist()))
    partner_kinds = sorted(set(partner_groups.tolist()))
    index = {k: np.flatnonzero(groups == k) for k in kinds}
    partner_index = {k: np.flatnonzero(partner_groups == k) for k in partner_kinds}
    n = np.asarray([len(index[k]) for k in kinds])
    m = np.asarray([len(partner_index[k]) for k in partner_kinds])
    counts = np.floor(np.outer(n, m) / n.sum()).astype(int)
    rows_left, cols_left = n - counts.sum(1), m - counts.sum(0)
    bumped = np.zeros_like(counts, dtype=bool)
    while rows_left.sum():
        cells = [(t, u) for t in np.flatnonzero(rows_left) for u in np.flatnonzero(cols_left)]
        # a random cell not yet rounded up (preferring the diagonal or avoiding it would bias the pairs:
        # with 2 cases per type, all-off-diagonal pairs teach Stage 1 "this type goes with the others")
        fresh = [cell for cell in cells if not bumped[cell]] or cells
        t, u = fresh[rng.integers(len(fresh))]
        counts[t, u] += 1
        bumped[t, u] = True
        rows_left[t] -= 1
        cols_left[u] -= 1
    perm = np.empty(len(groups), dtype=int)
    partners = {k: list(rng.permutation(partner_index[k])) for k in partner_kinds}
    for t, k in enumerate(kinds):
        rows = rng.permutation(index[k])
        start = 0
        for u, other in enumerate(partner_kinds):
            for row in rows[start:start + counts[t, u]]:
                perm[row] = partners[other].pop()
            start += counts[t, u]
    # a row that drew itself swaps partners with another row whose partner is of the same partner group
    # (the counts stay; neither row can end up with itself)
    for i in np.flatnonzero(perm == np.arange(len(perm))):
        if perm[i] != i:
            continue
        same = [j for j in np.flatnonzero(partner_groups[perm] == partner_groups[i]) if j != i]
        if same:
            j = same[rng.integers(len(same))]
            perm[i], perm[j] = perm[j], perm[i]
    return perm


def shuffled_pairing_manifest(manifest: str | Path, out_path: str | Path, seed: int = 0,
                              splits: tuple[str, ...] = ("train",), balance_column: str | None = "cancer_type") -> Path:
    """A copy of `manifest` where the reports and the RNA profiles of the cases in `splits` are permuted
    (each by its own permutation without fixed points where possible), so a slide's partners come from random
    other cases: the control for Stage 1. With `balance_column` (when the manifest has it) the permutations
    are `balanced_permutation`s over its values (a case missing the modality counted apart), so the
    shuffled pairs carry no type by chance either.
    Labels stay with the slides; held-out cases keep their true data."""
    import pandas as pd

    frame = pd.read_csv(manifest, keep_default_na=False)
    if "split" not in frame.columns:
        raise ValueError(f"{manifest}: no 'split' column; the control shuffles within the training split.")
    rows = np.flatnonzero(frame["split"].isin(splits).to_numpy())
    if len(rows) < 2:
        raise ValueError(f"{manifest}: fewer than 2 cases in splits {splits}; nothing to shuffle.")
    rng = np.random.default_rng([seed, 99])
    balance = balance_column if balance_column in frame.columns else None
    for column in ("report", "rna_path"):
        if balance:
            # a case without this modality is a partner of its own kind ("" is never a type)
            types = frame[balance].astype(str).to_numpy()[rows]
            present = frame[column].astype(str).str.strip().to_numpy()[rows] != ""
            perm = balanced_permutation(types, rng, partner_groups=np.where(present, types, ""))
        else:
            perm = rng.permutation(len(rows))
            for _ in range(100):  # a derangement: no case keeps its own partner
                if not (perm == np.arange(len(rows))).any():
                    break
                perm = rng.permutation(len(rows))
        frame.loc[rows, column] = frame[column].to_numpy()[rows[perm]]
    # relative paths in the manifest resolve against its folder: keep the copy beside it
    out_path = Path(out_path)
    frame.to_csv(out_path, index=False)
    return out_path


__all__ = ["FEW_SHOT_K", "balanced_permutation", "collapse_report", "difficulty_baselines", "distillation_report", "encoder_comparison", "features_path",
           "load_bags", "patch_mean_rgb", "shuffled_pairing_manifest", "teacher_ceiling"]
