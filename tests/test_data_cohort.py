"""The synthetic multimodal cohort: files, real pyramidal slides, type-dependent slides / reports /
RNA, missing modalities, determinism, the `mstar-hf make-cohort` CLI, and loading it."""

import json
import re
import time

import numpy as np
import openslide
import pandas as pd
import pytest

from mstar_hf.cli import main as cli_main
from mstar_hf.data.manifest import load_cohort
from mstar_hf.data.rna import GeneExpressionProcessor, read_expression_file, read_gene_vocab
from mstar_hf.data.synthetic_cohort import SPIKE_IN_GENES, make_synthetic_cohort
from mstar_hf.data.text import class_prompts, zero_shot_prompts

TYPES, CASES = 3, 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    start = time.time()
    manifest = make_synthetic_cohort(out, num_types=TYPES, cases_per_type=CASES, seed=0, slide_size=(1024, 1024),
                                     num_genes=64, missing_report_frac=0.2, missing_rna_frac=0.2)
    return out, manifest, pd.read_csv(manifest, keep_default_na=False), time.time() - start


def test_files_and_manifest(cohort):
    out, manifest, frame, elapsed = cohort
    assert elapsed < 30  # 18 slides of 1024^2 take a few seconds
    assert len(frame) == TYPES * CASES and frame["case_id"].is_unique
    assert {"case_id", "slide_id", "cancer_type", "features_path", "slide_path", "report", "rna_path", "label",
            "time", "event", "split"} <= set(frame.columns)
    assert (frame["label"] == frame["cancer_type"]).all()
    assert frame["cancer_type"].value_counts().tolist() == [CASES] * TYPES
    for _, row in frame.iterrows():
        assert (out / row["slide_path"]).is_file()
        assert row["features_path"] == f"features/{row['slide_id']}.h5"  # where `mstar-hf extract` writes
        if row["rna_path"]:
            assert (out / row["rna_path"]).is_file()
    assert (out / "features").is_dir() and (out / "gene_vocab.json").is_file()
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["cancer_types"] == sorted(frame["cancer_type"].unique())
    assert set(meta["class_prompts"]) == set(meta["cancer_types"])
    # Stratified split: every type in every split.
    for split in ("train", "val", "test"):
        assert frame[frame["split"] == split]["cancer_type"].nunique() == TYPES
    assert frame["time"].gt(0).all() and set(frame["event"]) <= {0, 1}


def test_slides_are_pyramids_whose_look_depends_on_type(cohort):
    out, _, frame, _ = cohort
    colours = []
    for _, row in frame.iterrows():
        slide = openslide.OpenSlide(str(out / row["slide_path"]))
        assert slide.level_count >= 2 and slide.dimensions == (1024, 1024)
        assert abs(float(slide.properties["openslide.mpp-x"]) - 0.5) < 1e-6
        thumb = np.asarray(slide.read_region((0, 0), slide.level_count - 1,
                                             slide.level_dimensions[-1]).convert("RGB"), dtype=np.float64)
        tissue = thumb[thumb.min(axis=2) < 225]  # not background
        assert len(tissue) > 0.2 * thumb.shape[0] * thumb.shape[1]
        colours.append(tissue.mean(axis=0))
    colours = np.stack(colours)
    # The stain is drawn per slide from one pool: leave-one-out nearest centroid on mean tissue colour
    # does not recover the type (tests/test_cohort_difficulty.py measures it on more slides) ...
    types = frame["cancer_type"].to_numpy()
    hits = 0
    for i in range(len(types)):
        keep = np.arange(len(types)) != i
        cents = {t: colours[keep & (types == t)].mean(0) for t in set(types)}
        hits += min(cents, key=lambda t: np.linalg.norm(colours[i] - cents[t])) == types[i]
    assert hits / len(types) <= 0.6
    # ... while the tissue-pattern mix, which the painter records per slide, follows the type
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["painter"] == "stain_pool" and set(meta["slides"]) == set(frame["slide_id"])
    for t, morph in meta["type_morphology"].items():
        dominant = int(np.argmax(morph["mix"]))
        shares = {u: np.mean([list(meta["slides"][s]["pattern_share"].values())[dominant]
                              for s in frame[frame["cancer_type"] == u]["slide_id"]]) for u in set(types)}
        assert max(shares, key=shares.get) == t, (t, shares)


def test_reports_depend_on_type_and_share_vocabulary(cohort):
    _, _, frame, _ = cohort
    prompts = class_prompts(sorted(frame["cancer_type"].unique()))
    present = frame[frame["report"] != ""]
    words = {}
    for _, row in present.iterrows():
        text = row["report"].lower()
        assert any(s.lower() in text for s in prompts[row["cancer_type"]]), row["report"]
        others = [s for t, syn in prompts.items() if t != row["cancer_type"] for s in syn]
        assert not any(s.lower() in text for s in others)
        words.setdefault(row["cancer_type"], set()).update(re.findall(r"[a-z]+", text))
    shared = set.intersection(*words.values())
    assert {"tumor"} <= shared and len(shared) >= 5
    assert len(set(present["report"])) == len(present)  # varied wording


def test_rna_marker_genes_depend_on_type(cohort):
    out, _, frame, _ = cohort
    meta = json.loads((out / "cohort.json").read_text())
    vocab = read_gene_vocab(out / "gene_vocab.json")
    proc = GeneExpressionProcessor(vocab)
    means = {}
    partial = 0
    for _, row in frame[frame["rna_path"] != ""].iterrows():
        profile = read_expression_file(out / row["rna_path"], case_id=row["case_id"])
        assert set(SPIKE_IN_GENES) <= set(profile.index)  # extra genes, dropped by the processor
        values, mask = proc.align(profile, case_id=row["case_id"])
        partial += int(not mask.all())
        for t, genes in meta["marker_genes"].items():
            idx = [vocab.index(g) for g in genes]
            means.setdefault((row["cancer_type"], t), []).append(values[idx].mean())
    for own in meta["marker_genes"]:
        for other in meta["marker_genes"]:
            if own != other:
                # A type's own marker block is clearly up compared with another type's cases.
                assert np.mean(means[(own, own)]) > np.mean(means[(other, own)]) + 1.0
    assert partial >= 1  # some profiles lack vocabulary genes (masked)


def test_missing_modalities(cohort):
    out, _, frame, _ = cohort
    no_report = frame["report"] == ""
    no_rna = frame["rna_path"] == ""
    assert no_report.sum() == round(0.2 * len(frame)) and no_rna.sum() == round(0.2 * len(frame))
    assert not (no_report & no_rna).any()  # every case keeps at least two modalities
    meta = json.loads((out / "cohort.json").read_text())
    assert sorted(frame[no_report]["case_id"]) == meta["cases_without_report"]


def test_loads_as_cohort_before_extraction(cohort):
    _, manifest, _, _ = cohort
    with pytest.raises(FileNotFoundError, match="mstar-hf extract"):
        load_cohort(manifest)
    ds = load_cohort(manifest, check_files=False)
    assert len(ds) == TYPES * CASES and sum(r is None for r in ds["report"]) == round(0.2 * len(ds))


def test_cli_and_determinism(tmp_path, capsys):
    args = ["make-cohort", "--out", str(tmp_path / "a"), "--types", "2", "--cases", "2", "--seed", "3",
            "--slide-size", "512x768", "--genes", "16", "--quiet"]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.strip().endswith("manifest.csv")
    again = make_synthetic_cohort(tmp_path / "b", num_types=2, cases_per_type=2, seed=3, slide_size=(512, 768),
                                  num_genes=16)
    assert (tmp_path / "a" / "manifest.csv").read_text() == open(again).read()
    for name in ("SYN-0001.csv", "SYN-0004.csv"):
        a, b = tmp_path / "a" / "rna" / name, tmp_path / "b" / "rna" / name
        assert a.exists() == b.exists() and (not a.exists() or a.read_text() == b.read_text())
    slide = openslide.OpenSlide(str(tmp_path / "a" / "slides" / "SYN-0001-01.tiff"))
    assert slide.dimensions == (768, 512)  # (width, height)
    assert cli_main(["make-cohort", "--out", str(tmp_path / "c"), "--types", "11", "--quiet"]) == 1
    assert "num_types" in capsys.readouterr().err


def test_zero_shot_prompts():
    prompts = zero_shot_prompts(3)
    assert set(prompts) == {"adenocarcinoma", "squamous_cell_carcinoma", "clear_cell_carcinoma"}
    assert "an H&E image of squamous cell carcinoma." in prompts["squamous_cell_carcinoma"]
    assert all("CLASSNAME" not in p for ps in prompts.values() for p in ps)
