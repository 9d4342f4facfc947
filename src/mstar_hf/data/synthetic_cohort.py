"""A synthetic multimodal cohort: the ground truth for "does the implementation learn".

K cancer types x M cases. Every case gets

* a real pyramidal TIFF slide painted by `synthetic_tissue`: its stain is drawn from one pool shared
  by every type (the nuisance), its type shows only in the mix and arrangement of tissue patterns all
  types share and in nuclear size/shape, so a patch carries weak evidence and a slide strong evidence
  (`painter="type_colour"`: the earlier per-type colours, which give the type away);
* a pathology-style report whose diagnosis and findings depend on its type (several styles, varied
  wording, vocabulary shared across types; a few cases have none);
* an RNA-Seq profile (CSV gene,value, RSEM-like) with a type-specific block of up-regulated marker
  genes plus noise and dropout (a few cases have none; some profiles lack a few vocabulary genes and
  every profile carries a few spike-in genes outside the vocabulary);
* `label` (= the type), a type-dependent survival pair `time`/`event`, and a stratified `split`.

The modalities of a case share the latent type and nothing else: each is drawn from its own random
stream. Patch features are not extracted here: `features_path` points at `features/<slide_id>.h5`,
where `mstar-hf extract --slides <out>/slides --out <out>/features` writes them.

Layout of `out_dir`: manifest.csv, gene_vocab.json, cohort.json (types, class prompts, marker genes,
parameters), slides/<slide_id>.tiff, rna/<case_id>.csv, features/ (empty until extraction).
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import zip_longest

import numpy as np

from .text import cancer_type_specs, class_prompts, write_report

# Painter parameters per type (same order as text.CANCER_TYPES): base/stroma/nucleus colours,
# nuclei per 100x100 tissue px, nucleus radius range (px at 0.5 um/px), texture scale (px).
_APPEARANCE = [
    dict(base_color=(200, 120, 170), stroma_color=(235, 180, 205), nucleus_color=(75, 40, 120),
         nuclear_density=5.0, nucleus_radius=(3.0, 6.0), texture_scale=24.0),
    dict(base_color=(228, 118, 146), stroma_color=(246, 168, 182), nucleus_color=(60, 30, 90),
         nuclear_density=2.5, nucleus_radius=(5.0, 9.0), texture_scale=48.0),
    dict(base_color=(242, 218, 232), stroma_color=(222, 158, 194), nucleus_color=(95, 55, 135),
         nuclear_density=1.8, nucleus_radius=(2.0, 4.0), texture_scale=12.0),
    dict(base_color=(180, 110, 175), stroma_color=(220, 160, 210), nucleus_color=(70, 40, 130),
         nuclear_density=7.0, nucleus_radius=(3.0, 5.0), texture_scale=16.0),
    dict(base_color=(205, 135, 185), stroma_color=(230, 185, 210), nucleus_color=(55, 35, 110),
         nuclear_density=6.0, nucleus_radius=(4.0, 8.0), texture_scale=32.0),
    dict(base_color=(215, 110, 140), stroma_color=(240, 150, 170), nucleus_color=(85, 45, 110),
         nuclear_density=4.0, nucleus_radius=(4.0, 6.0), texture_scale=20.0),
    dict(base_color=(195, 130, 180), stroma_color=(240, 200, 220), nucleus_color=(70, 40, 120),
         nuclear_density=4.5, nucleus_radius=(3.0, 7.0), texture_scale=40.0),
    dict(base_color=(170, 100, 170), stroma_color=(215, 150, 200), nucleus_color=(50, 25, 100),
         nuclear_density=8.0, nucleus_radius=(3.0, 6.0), texture_scale=28.0),
    dict(base_color=(190, 120, 120), stroma_color=(230, 175, 180), nucleus_color=(60, 35, 60),
         nuclear_density=5.0, nucleus_radius=(4.0, 7.0), texture_scale=36.0),
    dict(base_color=(210, 160, 200), stroma_color=(235, 200, 225), nucleus_color=(45, 30, 110),
         nuclear_density=9.0, nucleus_radius=(2.0, 5.0), texture_scale=14.0),
]
# Median survival (months) per type: survival depends on the type only.
_MEDIAN_SURVIVAL = [48.0, 30.0, 84.0, 66.0, 24.0, 20.0, 110.0, 40.0, 60.0, 14.0]
SPIKE_IN_GENES = ["ERCC-00002", "ERCC-00003", "ERCC-00004"]
DEFAULT_SLIDE_SIZE = (2048, 2048)
PAINTERS = ("stain_pool", "type_colour")
# Streams: each modality of a case draws from its own generator, so they share only the type.
_SLIDE, _REPORT, _RNA, _SURVIVAL = 1, 2, 3, 4


def _stream(seed: int, case_index: int, modality: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(case_index), int(modality)])


def slide_paint_params(type_index: int, rng: np.random.Generator) -> dict:
    """`make_tissue_image` keyword arguments for a case of type `type_index`, with per-case jitter."""
    a = _APPEARANCE[type_index]

    def colour(c):
        return tuple(int(v) for v in np.clip(np.asarray(c) + rng.normal(0, 6, 3), 0, 255))

    r = float(rng.uniform(0.9, 1.1))
    return dict(
        tissue_fraction=float(rng.uniform(0.5, 0.7)),
        blob_scale=float(rng.uniform(0.12, 0.22)),
        base_color=colour(a["base_color"]),
        stroma_color=colour(a["stroma_color"]),
        nucleus_color=colour(a["nucleus_color"]),
        nuclear_density=a["nuclear_density"] * float(rng.uniform(0.85, 1.15)),
        nucleus_radius=(a["nucleus_radius"][0] * r, a["nucleus_radius"][1] * r),
        texture_scale=a["texture_scale"] * float(rng.uniform(0.8, 1.25)),
    )


def _write_slide(job: tuple) -> dict:
    path, height, width, seed, mpp, painter, params = job
    from mstar_hf.wsi.synthetic import make_tissue_image, write_pyramidal_tiff

    record = {}
    if painter == "stain_pool":
        from .synthetic_tissue import paint_tissue

        image, record = paint_tissue(height, width, params["type_index"], np.random.default_rng(seed))
    else:
        image = make_tissue_image(height, width, seed=seed, **params)
    write_pyramidal_tiff(path, image, mpp=mpp)
    return record


def _gene_program(num_genes: int, num_types: int, rng: np.random.Generator):
    """Gene names, background log1p means/sds and the marker block of each type."""
    genes = [f"SYNG{i:05d}" for i in range(num_genes)]
    mean = rng.uniform(0.5, 6.5, num_genes)
    sd = rng.uniform(0.25, 0.7, num_genes)
    block = max(2, min(32, num_genes // (2 * num_types)))
    order = rng.permutation(num_genes)  # marker genes are scattered over the vocabulary
    markers = [sorted(int(g) for g in order[k * block:(k + 1) * block]) for k in range(num_types)]
    return genes, mean, sd, markers


def _rna_profile(type_index: int, mean, sd, markers, rng: np.random.Generator) -> np.ndarray:
    x = mean + rng.normal(0, 1, len(mean)) * sd
    x[markers[type_index]] += rng.uniform(2.0, 3.0, len(markers[type_index]))
    x = np.maximum(x, 0.0)
    dropout = rng.random(len(x)) < np.clip(0.35 - 0.05 * x, 0.02, 0.35)
    x[dropout] = 0.0
    return np.round(np.expm1(x), 3)


def _stratified(rng: np.random.Generator, type_of_case: list[int], total: int) -> set[int]:
    """`total` positions of `type_of_case`, spread round-robin over the types."""
    groups = [rng.permutation([i for i, t in enumerate(type_of_case) if t == k]).tolist()
              for k in sorted(set(type_of_case))]
    groups = [groups[j] for j in rng.permutation(len(groups))]
    order = [c for tier in zip_longest(*groups) for c in tier if c is not None]
    return set(order[:total])


def _splits(rng, type_of_case, num_types, val_frac, test_frac) -> list[str]:
    split = ["train"] * len(type_of_case)
    for k in range(num_types):
        cases = rng.permutation([i for i, t in enumerate(type_of_case) if t == k]).tolist()
        n = len(cases)
        n_test = max(1, int(round(test_frac * n))) if n >= 3 and test_frac > 0 else 0
        n_val = max(1, int(round(val_frac * n))) if n >= 3 and val_frac > 0 else 0
        for i in cases[:n_test]:
            split[i] = "test"
        for i in cases[n_test:n_test + n_val]:
            split[i] = "val"
    return split


def make_synthetic_cohort(
    out_dir: str | os.PathLike,
    num_types: int = 3,
    cases_per_type: int = 16,
    seed: int = 0,
    slide_size: tuple[int, int] = DEFAULT_SLIDE_SIZE,
    mpp: float = 0.5,
    num_genes: int = 256,
    missing_report_frac: float = 0.1,
    missing_rna_frac: float = 0.1,
    partial_gene_frac: float = 0.2,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    num_workers: int | None = None,
    quiet: bool = True,
    painter: str = "stain_pool",
) -> str:
    """Write a synthetic multimodal cohort to `out_dir` and return the manifest path.

    Args:
        num_types: number of cancer types (the first `num_types` of `text.CANCER_TYPES`, at most 10).
        cases_per_type: cases per type (one slide each).
        seed: everything is a function of the seed (re-running gives identical reports, RNA and
            manifest; slides are identical pixels).
        slide_size: (height, width) of level 0 in pixels at `mpp` um/px (default 2048x2048 at 0.5,
            i.e. 20x: a few dozen 256-px tissue patches, 3 pyramid levels).
        num_genes: size of the gene vocabulary (each type gets a block of marker genes).
        missing_report_frac / missing_rna_frac: share of cases without a report / without RNA
            (disjoint sets, stratified by type, so every case keeps at least two modalities).
        partial_gene_frac: share of RNA profiles that lack 5% of the vocabulary genes (masked genes).
        val_frac / test_frac: stratified split sizes (at least one case per type when a type has >= 3).
        num_workers: threads painting slides (default: up to 2).
        quiet: no progress output.
        painter: "stain_pool" (default; `synthetic_tissue`): stain drawn per slide from one pool shared
            by all types, types differ in the mix and arrangement of shared tissue patterns and slightly
            in nuclear morphology, so the type must be learned. "type_colour": the earlier painter whose
            per-type base colours give the type away (mean RGB classifies slides); kept for tests that
            need a cohort any encoder separates.
    """
    import pandas as pd

    height, width = (int(slide_size[0]), int(slide_size[1]))
    if cases_per_type < 1:
        raise ValueError(f"cases_per_type must be >= 1, got {cases_per_type}.")
    if min(height, width) < 256:
        raise ValueError(f"slide_size must be at least 256x256 (one patch), got {slide_size}.")
    specs = cancer_type_specs(num_types)
    if num_genes < 4 * num_types:
        raise ValueError(f"num_genes must be >= 4 * num_types = {4 * num_types}, got {num_genes}.")
    for name, frac in (("missing_report_frac", missing_report_frac), ("missing_rna_frac", missing_rna_frac),
                       ("partial_gene_frac", partial_gene_frac), ("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0 <= frac <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {frac}.")
    if painter not in PAINTERS:
        raise ValueError(f"painter must be one of {PAINTERS}, got {painter!r}.")
    if missing_report_frac + missing_rna_frac > 1:
        raise ValueError("missing_report_frac + missing_rna_frac must be <= 1 (the sets are disjoint).")

    start = time.time()
    out_dir = os.path.abspath(os.fspath(out_dir))
    for sub in ("slides", "rna", "features"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    cohort_rng = np.random.default_rng([int(seed), 0])
    keys = [s["key"] for s in specs]
    type_of_case = [k for k in range(num_types) for _ in range(cases_per_type)]
    n_cases = len(type_of_case)
    case_ids = [f"SYN-{i + 1:04d}" for i in range(n_cases)]
    slide_ids = [f"{c}-01" for c in case_ids]

    genes, mean, sd, markers = _gene_program(num_genes, num_types, cohort_rng)
    no_report = _stratified(cohort_rng, type_of_case, int(round(missing_report_frac * n_cases)))
    rest = [i for i in range(n_cases) if i not in no_report]
    no_rna_pick = _stratified(cohort_rng, [type_of_case[i] for i in rest], int(round(missing_rna_frac * n_cases)))
    no_rna = {rest[j] for j in no_rna_pick}
    split = _splits(cohort_rng, type_of_case, num_types, val_frac, test_frac)

    # Slides (the slow part) in worker processes.
    jobs = []
    for i, k in enumerate(type_of_case):
        rng = _stream(seed, i, _SLIDE)
        params = slide_paint_params(k, rng) if painter == "type_colour" else {"type_index": k}
        jobs.append((os.path.join(out_dir, "slides", f"{slide_ids[i]}.tiff"), height, width,
                     int(rng.integers(2**31)), mpp, painter, params))
    # Threads, not processes: OpenCV, numpy and the TIFF encoder release the GIL for the bulk of
    # the work, and worker processes would each pay the package import (torch) and fork risks.
    workers = num_workers if num_workers is not None else min(2, os.cpu_count() or 1)
    paint_records = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, record in enumerate(pool.map(_write_slide, jobs), 1):
            paint_records.append(record)
            if not quiet and (done % 10 == 0 or done == len(jobs)):
                print(f"slides: {done}/{len(jobs)}", flush=True)

    rows = []
    for i, k in enumerate(type_of_case):
        case_id = case_ids[i]
        report = "" if i in no_report else write_report(keys[k], _stream(seed, i, _REPORT))
        rna_rel = ""
        if i not in no_rna:
            rng = _stream(seed, i, _RNA)
            values = _rna_profile(k, mean, sd, markers, rng)
            keep = np.ones(num_genes, dtype=bool)
            if rng.random() < partial_gene_frac:
                keep[rng.choice(num_genes, size=max(1, num_genes // 20), replace=False)] = False
            names = [g for g, kp in zip(genes, keep) if kp] + SPIKE_IN_GENES
            vals = np.concatenate([values[keep], np.round(rng.uniform(0, 50, len(SPIKE_IN_GENES)), 3)])
            rna_rel = f"rna/{case_id}.csv"
            pd.DataFrame({"gene": names, "value": vals}).to_csv(os.path.join(out_dir, rna_rel), index=False)
        srng = _stream(seed, i, _SURVIVAL)
        t_event = srng.exponential(_MEDIAN_SURVIVAL[k] / math.log(2))
        t_censor = srng.uniform(12.0, 150.0)
        rows.append({
            "case_id": case_id,
            "slide_id": slide_ids[i],
            "cancer_type": keys[k],
            "features_path": f"features/{slide_ids[i]}.h5",
            "slide_path": f"slides/{slide_ids[i]}.tiff",
            "report": report,
            "rna_path": rna_rel,
            "label": keys[k],
            "time": round(max(min(t_event, t_censor), 0.1), 1),
            "event": int(t_event <= t_censor),
            "split": split[i],
        })
    manifest = os.path.join(out_dir, "manifest.csv")
    pd.DataFrame(rows).to_csv(manifest, index=False)
    with open(os.path.join(out_dir, "gene_vocab.json"), "w", encoding="utf-8") as f:
        json.dump(genes, f)
    meta = {
        "num_types": num_types,
        "cases_per_type": cases_per_type,
        "seed": seed,
        "slide_size": [height, width],
        "mpp": mpp,
        "num_genes": num_genes,
        "painter": painter,
        "cancer_types": sorted(keys),
        "class_prompts": class_prompts(keys),
        "marker_genes": {keys[k]: [genes[g] for g in markers[k]] for k in range(num_types)},
        "spike_in_genes": SPIKE_IN_GENES,
        "cases_without_report": sorted(case_ids[i] for i in no_report),
        "cases_without_rna": sorted(case_ids[i] for i in no_rna),
        "manifest": "manifest.csv",
        "gene_vocab": "gene_vocab.json",
        "features_dir": "features",
        "extract_command": f"mstar-hf extract --slides {os.path.join(out_dir, 'slides')} "
                           f"--out {os.path.join(out_dir, 'features')}",
    }
    if painter == "stain_pool":
        # what each slide was painted with (stain, pattern shares): the latent truth, for analysis only
        from .synthetic_tissue import type_morphology

        meta["type_morphology"] = {keys[k]: {n: np.round(v, 3).tolist() if isinstance(v, np.ndarray) else v
                                             for n, v in type_morphology(k).items()} for k in range(num_types)}
        meta["slides"] = {slide_ids[i]: rec for i, rec in enumerate(paint_records)}
    with open(os.path.join(out_dir, "cohort.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    if not quiet:
        print(f"wrote {n_cases} cases ({num_types} types) to {out_dir} in {time.time() - start:.1f}s; "
              f"manifest {manifest}", flush=True)
    return manifest


__all__ = ["DEFAULT_SLIDE_SIZE", "PAINTERS", "SPIKE_IN_GENES", "make_synthetic_cohort", "slide_paint_params"]
