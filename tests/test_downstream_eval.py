"""Downstream evaluation end to end on tiny synthetic feature cohorts (h5 files written directly).

Two feature folders hold the same file names: `strong/` has a class signal (a class direction added to
some patches) and a planted survival risk (patch features 1-2 shifted by twice the case's log-hazard); `noise/`
has neither. Heads must learn from `strong/` and the comparison must find it better than `noise/`.
"""

import csv
import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from mstar_hf.cli import main as cli_main
from mstar_hf.evaluation.cohort import load_task
from mstar_hf.training_utils.mil import FeatureStore, MILSettings, predict, run_cross_validation, train_fold
from mstar_hf.evaluation.splits import make_folds

ROOT = Path(__file__).resolve().parents[1]
DIM = 16
FAST = dict(hidden_size=32, attention_dim=16, learning_rate=2e-3, epochs=10, patience=5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # bags of ~30 patches are far too small for intra-op threads; on a shared 2-core box the thread
    # hand-offs cost more than the arithmetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_cohort(root: Path, per_class=(12, 12, 12), seed=0, slide_path=None, edit=None) -> Path:
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(per_class), DIM))
    directions[:, 1:3] = 0  # features 1-2 carry the survival risk
    directions *= 3.0 / np.linalg.norm(directions, axis=1, keepdims=True)
    rows, k = [], 0
    for c, count in enumerate(per_class):
        for _ in range(count):
            n = int(rng.integers(16, 33))
            coords = np.stack([np.arange(n) % 8, np.arange(n) // 8], 1) * 256
            risk = rng.normal()
            strong = rng.normal(size=(n, DIM))
            strong[rng.random(n) < 0.4] += directions[c]
            strong[:, 1:3] += 2 * risk
            for name, feats in (("strong", strong), ("noise", rng.normal(size=(n, DIM)))):
                (root / name).mkdir(parents=True, exist_ok=True)
                with h5py.File(root / name / f"s{k:03d}.h5", "w") as f:
                    f["features"] = feats.astype(np.float32)
                    f["coords"] = coords
            rows.append({"case_id": f"case{k:03d}", "slide_id": f"s{k:03d}", "cancer_type": "BRCA",
                         "features_path": f"strong/s{k:03d}.h5", "slide_path": slide_path or "",
                         "label": f"type{c}", "time": f"{10 * np.exp(-risk + 0.2 * rng.normal()):.4f}",
                         "event": int(rng.random() < 0.75)})
            k += 1
    if edit:
        edit(rows)
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"))


def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def pooled_metric(data, cv, key):
    from mstar_hf.evaluation.report import summarize

    return summarize(data, cv.rows, cv.preds, num_bootstrap=50)["metrics"][key]["value"]


def test_both_heads_learn_classification(cohort):
    data = load_task(cohort, "classification")
    assert data.class_names == ["type0", "type1", "type2"] and data.feature_dim == DIM
    folds = make_folds(data, folds=3, seed=0)
    assert sorted(np.concatenate([f.test for f in folds]).tolist()) == list(range(len(data)))
    abmil = run_cross_validation(data, folds, MILSettings(head="abmil", **FAST), accelerator(), progress=False)
    assert pooled_metric(data, abmil, "macro_auc") > 0.85
    assert [r["epochs_run"] for r in abmil.folds] and all(r["early_stopping_on"] == "metric" for r in abmil.folds)
    folds2 = make_folds(data, folds=2, seed=0)
    transmil = run_cross_validation(data, folds2, MILSettings(head="transmil", transmil_size="tiny", **FAST),
                                    accelerator(), progress=False)
    assert pooled_metric(data, transmil, "macro_auc") > 0.75


def test_survival_with_planted_risk(cohort):
    data = load_task(cohort, "survival")
    folds = make_folds(data, folds=3, seed=0)
    cv = run_cross_validation(data, folds, MILSettings(head="abmil", num_time_bins=4, **FAST),
                              accelerator(), progress=False)
    assert pooled_metric(data, cv, "c_index") > 0.7
    assert all(len(r["time_bins"]) == 5 for r in cv.folds)


def test_cli_compares_two_feature_folders(tmp_path, capsys, real_slide):
    manifest = write_cohort(tmp_path / "c", slide_path=str(real_slide))
    out = tmp_path / "out"
    rc = cli_main(["evaluate", "--manifest", str(manifest), "--features", str(tmp_path / "c" / "strong"),
                   str(tmp_path / "c" / "noise"), "--task", "classification", "--label", "label", "--folds", "3",
                   "--epochs", "10", "--patience", "5", "--hidden-size", "32", "--attention-dim", "16", "--lr", "2e-3",
                   "--heatmaps", "1", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "p vs strong (macro_auc, pooled, case bootstrap)" in printed and "reference" in printed
    # the notice names the split source and sizes in cases; the headline is mean +- std over the 3 folds
    assert "splits: 3-fold stratified group k-fold on case_id (seed 0); 3 fold(s)" in printed
    assert "test 12 cases / 12 slides per fold" in printed and "(< 20)" in printed
    assert "macro_auc (mean+-std, 3 folds)" in printed and "pooled out-of-fold macro_auc [95% CI]" in printed
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("features  macro_auc"))
    assert lines[header + 2].startswith("strong") and lines[header + 3].startswith("noise")
    results = json.loads((out / "results.json").read_text())
    strong = results["feature_sets"]["strong"]["metrics"]["macro_auc"]
    noise = results["feature_sets"]["noise"]["metrics"]["macro_auc"]
    assert strong["value"] > 0.85 and strong["ci_low"] <= strong["value"] <= strong["ci_high"]
    assert noise["value"] < strong["value"]
    comparison = results["comparisons"][0]
    assert (comparison["a"], comparison["b"]) == ("strong", "noise")
    assert comparison["metrics"]["macro_auc"]["p_value"] < 0.05
    assert comparison["metrics"]["macro_auc"]["num_valid"] == 1000
    assert len(results["feature_sets"]["strong"]["folds"]) == 3
    primary = results["feature_sets"]["strong"]["primary"]["macro_auc"]
    fold_aucs = [f["test_metrics"]["macro_auc"] for f in results["feature_sets"]["strong"]["folds"]]
    assert primary["value"] == pytest.approx(np.mean(fold_aucs)) and primary["std"] == pytest.approx(np.std(fold_aucs))
    assert results["split_source"].startswith("3-fold") and results["score_level"] == "case"
    for name in ("roc.png", "predictions_strong.csv", "predictions_noise.csv"):
        assert (out / name).is_file(), name
    # --heatmaps 1: one attention heatmap over the (real) slide per feature folder
    assert len(list((out / "heatmaps").glob("strong_s*.png"))) == 1 and len(list((out / "heatmaps").glob("noise_s*.png"))) == 1
    with open(out / "predictions_strong.csv") as f:
        assert len(list(csv.DictReader(f))) == 36


def test_cli_linear_probe_and_few_shot(cohort, tmp_path, capsys):
    base = ["evaluate", "--manifest", str(cohort), "--features", str(cohort.parent / "strong"),
            str(cohort.parent / "noise"), "--quiet", "--bootstrap", "300"]
    assert cli_main(base + ["--task", "linear-probe", "--folds", "3", "--out", str(tmp_path / "lp")]) == 0
    probe = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert probe["feature_sets"]["strong"]["metrics"]["macro_auc"]["value"] > 0.9
    assert probe["comparisons"][0]["metrics"]["macro_auc"]["p_value"] < 0.05
    assert cli_main(base + ["--task", "few-shot", "--shots", "1", "4", "--draws", "6", "--out", str(tmp_path / "fs")]) == 0
    few = json.loads((tmp_path / "fs" / "results.json").read_text())
    four = few["feature_sets"]["strong"]["shots"]["4"]
    assert four["n_draws"] == 6 and four["metrics"]["macro_auc"]["value"] > 0.8
    assert few["feature_sets"]["noise"]["shots"]["4"]["metrics"]["macro_auc"]["value"] < four["metrics"]["macro_auc"]["value"]
    assert {c["shots"] for c in few["comparisons"]} == {1, 4}
    assert (tmp_path / "fs" / "few_shot.png").is_file()
    assert "strong (4-shot)" in capsys.readouterr().out

    # the manifest's fixed splits: supports from train, queries = the test slides; one probe "fold"
    def splits(rows):
        for k, r in enumerate(rows):
            r["split"] = ("train", "train", "val", "test")[k % 4]

    m = write_cohort(tmp_path / "split", edit=splits)
    base = ["evaluate", "--manifest", str(m), "--features", str(tmp_path / "split" / "strong"), "--quiet",
            "--bootstrap", "100"]
    assert cli_main(base + ["--task", "few-shot", "--shots", "2", "--draws", "3", "--out", str(tmp_path / "fs2")]) == 0
    few = json.loads((tmp_path / "fs2" / "results.json").read_text())
    assert few["feature_sets"]["strong"]["shots"]["2"]["n_query"] == [9, 9, 9]
    assert cli_main(base + ["--task", "linear-probe", "--out", str(tmp_path / "lp2")]) == 0
    probe = json.loads((tmp_path / "lp2" / "results.json").read_text())
    assert probe["folds"] == [{"fold": 0, "n_train": 18, "n_val": 9, "n_test": 9, "absent_test_classes": [],
                               "absent_val_classes": [], "source": f"manifest {str(m)!r} (split column)",
                               "n_train_cases": 18, "n_val_cases": 9, "n_test_cases": 9}]


def test_bad_input_errors_and_documented_handling(tmp_path, caplog, capsys):
    def one_class(rows):
        for r in rows:
            r["label"] = "only"

    m = write_cohort(tmp_path / "one", per_class=(4, 4), edit=one_class)
    with pytest.raises(ValueError, match="single class 'only'"):
        load_task(m, "classification")

    # a rare class (2 cases, 3 folds): the test fold without it is scored on the classes it has
    m = write_cohort(tmp_path / "rare", per_class=(8, 8, 2))
    data = load_task(m, "classification")
    with caplog.at_level(logging.WARNING):
        folds = make_folds(data, folds=3, seed=0)
    assert "fewer cases than folds" in caplog.text
    assert [f.absent_test_classes for f in folds].count(["type2"]) == 1
    from mstar_hf.evaluation.probes import linear_probe, slide_embeddings

    rows, _, preds, records = linear_probe(data, folds, slide_embeddings(data, FeatureStore(data)))
    assert all(np.isfinite(r["test_metrics"]["macro_auc"]) for r in records)

    # a class with a single case cannot be both trained on and tested
    m = write_cohort(tmp_path / "single", per_class=(6, 6, 1))
    with pytest.raises(ValueError, match=r"class\(es\) \['type2'\] have no training case"):
        make_folds(load_task(m, "classification"), folds=3)
    with pytest.raises(ValueError, match=r"folds \(20\) larger than the data: the task has 13 cases"):
        make_folds(load_task(m, "classification"), folds=20)

    def bad_times(rows):
        rows[3]["time"] = "0"
        rows[5]["event"] = ""

    m = write_cohort(tmp_path / "surv", per_class=(6, 6), edit=bad_times)
    with pytest.raises(ValueError, match=r"times must be finite and > 0; cases 'case003'"):
        load_task(m, "survival")

    def missing_event(rows):
        rows[5]["event"] = ""

    m = write_cohort(tmp_path / "surv2", per_class=(6, 6), edit=missing_event)
    data = load_task(m, "survival")
    assert len(data) == 11 and data.excluded == [{"slide_id": "s005", "case_id": "case005", "reason": "empty 'event'"}]

    m = write_cohort(tmp_path / "files", per_class=(4, 4))
    os.remove(tmp_path / "files" / "noise" / "s002.h5")
    with pytest.raises(FileNotFoundError, match=r"s002 \(.*noise/s002.h5\)"):
        load_task(m, "classification", features_dir=tmp_path / "files" / "noise")
    data = load_task(m, "classification", features_dir=tmp_path / "files" / "noise", skip_missing=True)
    assert len(data) == 7 and data.excluded[0]["reason"].startswith("features file missing")

    # the CLI reports the problem and exits 1
    rc = cli_main(["evaluate", "--manifest", str(tmp_path / "one" / "manifest.csv"), "--task", "classification",
                   "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 1 and "single class" in capsys.readouterr().err


def load_finetune():
    """The body of `training/finetune.py` (the package module its thin wrapper calls)."""
    from mstar_hf.training_utils import finetune

    return finetune


def test_finetune_script_saves_folds_and_resumes(cohort, tmp_path):
    finetune = load_finetune()
    out = tmp_path / "run"
    args = ["--manifest", str(cohort), "--features_dir", str(cohort.parent / "strong"), "--task", "classification",
            "--hidden_size", "32", "--attention_dim", "16", "--learning_rate", "2e-3", "--num_epochs", "5",
            "--folds", "2", "--output_dir", str(out), "--with_tracking", "false", "--quiet", "--num_bootstrap", "200"]
    assert finetune.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["fold_mean"]["macro_auc"] > 0.8 and len(results["folds"]) == 2
    assert results["metrics"]["macro_auc"]["num_valid"] == 200
    # results.json and the model-index (eval_results.json) carry the same headline: the mean over the 2 folds
    assert results["primary"]["macro_auc"]["value"] == pytest.approx(results["fold_mean"]["macro_auc"])
    index = {e["metric"]: e for e in json.loads((out / "eval_results.json").read_text())}
    assert index["macro_auc"]["value"] == pytest.approx(results["primary"]["macro_auc"]["value"])
    assert "mean +- std over 2 folds" in index["macro_auc"]["name"]
    assert index["macro_auc_pooled"]["value"] == pytest.approx(results["metrics"]["macro_auc"]["value"])
    assert (out / "roc.png").is_file() and (out / "fold_0" / "loss.png").is_file()
    assert not list((out / "fold_0").glob("checkpoint-*"))  # finished folds keep only the best model
    # the saved fold model reproduces the fold's test predictions
    record = json.loads((out / "fold_0" / "fold_result.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(out / "fold_0").eval()
    data = load_task(cohort, "classification", features_dir=cohort.parent / "strong")
    test_rows = [data.slide_ids.index(s) for s in record["slide_ids"]]
    preds = predict(model, data, test_rows, FeatureStore(data))
    assert np.allclose(preds["probs"], record["predictions"]["probs"], atol=1e-6)

    # resume after fold 1 was lost: fold 0 is read back, not retrained
    stamp = (out / "fold_0" / "model.safetensors").stat().st_mtime_ns
    os.remove(out / "fold_1" / "fold_result.json")
    assert finetune.main(args + ["--resume_from_checkpoint", "latest"]) == 0
    assert (out / "fold_0" / "model.safetensors").stat().st_mtime_ns == stamp
    again = json.loads((out / "results.json").read_text())
    assert again["folds"][0]["test_metrics"] == results["folds"][0]["test_metrics"]
    assert (out / "fold_1" / "fold_result.json").is_file()


def test_interrupted_fold_resumes_to_the_same_weights(cohort, tmp_path):
    from mstar_hf.training_utils.mil import build_model

    data = load_task(cohort, "classification")
    fold = make_folds(data, folds=3, seed=0)[0]
    settings = MILSettings(head="abmil", lr_scheduler_type="constant", **{**FAST, "epochs": 4, "patience": 50})
    store = FeatureStore(data)

    def fresh():
        torch.manual_seed(0)
        return build_model(data, settings, fold.train)

    full, _ = train_fold(fresh(), data, fold, settings, accelerator(), store, fold_dir=tmp_path / "a", progress=False)
    steps = len(fold.train)
    cut = MILSettings(**{**settings.__dict__, "max_train_steps": 2 * steps})
    train_fold(fresh(), data, fold, cut, accelerator(), store, fold_dir=tmp_path / "b", progress=False)
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-2"]
    resumed, run = train_fold(fresh(), data, fold, settings, accelerator(), store, fold_dir=tmp_path / "b",
                              resume=True, progress=False)
    assert [h["epoch"] for h in run.history] == [0, 1, 2, 3]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_attention_heatmap_over_the_real_slide(real_slide, tmp_path):
    from mstar_hf.evaluation.plots import attention_percentiles, patch_size_from_coords, plot_attention_heatmap

    coords = np.stack(np.meshgrid(np.arange(6) * 256, np.arange(8) * 256), -1).reshape(-1, 2)
    scores = np.random.default_rng(0).random(len(coords))
    path = plot_attention_heatmap(real_slide, coords, scores, tmp_path / "heat.png", title="test")
    assert os.path.getsize(path) > 10_000
    assert patch_size_from_coords(coords) == 256
    pct = attention_percentiles(scores)
    assert pct[np.argmax(scores)] == 1.0 and pct[np.argmin(scores)] == 0.0
    assert np.array_equal(np.argsort(pct), np.argsort(scores))
    with pytest.raises(ValueError, match="coords must be"):
        plot_attention_heatmap(real_slide, coords[:5], scores, tmp_path / "bad.png")
