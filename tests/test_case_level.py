"""Patients, not slides: case-level splits, scores, bootstrap CIs and reporting on a multi-slide cohort
(tests/case_fixtures.py: 30 cases, 46 slides, cases with 2-3 slides, a manifest split column that leaks)."""

import csv
import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from case_fixtures import write_multislide_cohort
from mstar_hf.cli import main as cli_main
from mstar_hf.data.cases import aggregate_by_case, check_case_disjoint, check_case_splits, first_row_per_case
from mstar_hf.evaluation.bootstrap import _members, _resamples, bootstrap_ci, paired_bootstrap
from mstar_hf.evaluation.cohort import load_task
from mstar_hf.evaluation.report import case_level, format_table, split_notice, summarize
from mstar_hf.evaluation.splits import make_folds

LEAKING = ["case00", "case03", "case06"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_multislide_cohort(tmp_path_factory.mktemp("multislide"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write_multislide_cohort(tmp_path_factory.mktemp("clean"), leak=())


def sides(data, fold):
    """Cases per part of a fold."""
    return {name: {data.case_ids[i] for i in rows} for name, rows in
            (("train", fold.train), ("val", fold.val), ("test", fold.test))}


def test_fixture_has_multi_slide_cases(cohort):
    data = load_task(cohort, "classification")
    counts = pd.Series(data.case_ids).value_counts()
    assert len(data) == 46 and len(counts) == 30 and set(counts) == {1, 2, 3}


def test_case_split_validator():
    cases = ["a", "a", "b", "c", "c", "c"]
    splits = ["train", "test", "train", "val", "val", None]
    with pytest.raises(ValueError, match=r"manifest 'm.csv': 1 case\(s\) .*'a' \(train / test\)") as e:
        check_case_splits(cases, splits, source="manifest 'm.csv'")
    assert "'c'" not in str(e.value)  # an empty split is no side
    taken = check_case_splits(cases, splits, source="x", take_first=True)
    assert taken == ["train", "train", "train", "val", "val", None]
    assert check_case_splits(["a", "a"], ["test", "test"], source="x") == ["test", "test"]
    check_case_disjoint(cases, {"train": [0, 1, 2], "test": [3, 4, 5]}, source="y")
    with pytest.raises(ValueError, match=r"fold 3: 1 case\(s\) are on more than one side: 'a' \(train / test\)"):
        check_case_disjoint(cases, {"train": [0, 2], "test": [1, 3]}, source="fold 3")


def test_leaky_manifest_refused_with_cases_named(cohort, caplog):
    data = load_task(cohort, "classification")
    for use in (None, True):  # the default ("auto": every slide has a split) and the explicit manifest splits
        with pytest.raises(ValueError, match=r"3 case\(s\) have slides on more than one side") as e:
            make_folds(data, use_manifest_splits=use)
        for case in LEAKING:
            assert repr(case) in str(e.value)
        assert "case05" not in str(e.value) and str(cohort) in str(e.value)
    # the explicit flag: each case takes its first slide's split, with a warning naming them
    with caplog.at_level(logging.WARNING):
        (fold,) = make_folds(data, split_from_first_slide=True)
    assert all(c in caplog.text for c in LEAKING)
    parts = sides(data, fold)
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["val"])
    assert not (parts["val"] & parts["test"])
    assert "case00" in parts["test"] and "case03" in parts["train"] and "case06" in parts["val"]
    assert fold.summary()["n_test_cases"] == 6 and fold.summary()["n_test"] == 14  # cases 0 and 15: 3 slides, 5-25: 2
    # the few-shot path (manifest splits, no validation) is validated the same way
    with pytest.raises(ValueError, match="case00"):
        make_folds(data, val_fraction=0.0, use_manifest_splits=True)


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_no_case_on_two_sides_in_any_kfold(cohort, task):
    data = load_task(cohort, task)
    for seed in range(5):
        for k in (3, 5):
            folds = make_folds(data, folds=k, seed=seed, val_fraction=0.25, use_manifest_splits=False)
            tested = [c for f in folds for c in sides(data, f)["test"]]
            assert sorted(tested) == sorted(set(data.case_ids))  # every case tested exactly once
            for f in folds:
                parts = sides(data, f)
                assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"])
                assert not (parts["val"] & parts["test"]) and len(parts["val"]) > 0
                # a case's slides travel together
                assert sorted(np.concatenate([f.train, f.val, f.test]).tolist()) == list(range(len(data)))


def _per_case_frame(data, rows, values):
    frame = pd.DataFrame({"case": [data.case_ids[i] for i in rows]})
    values = np.asarray(values)
    cols = values.reshape(len(values), -1)
    for j in range(cols.shape[1]):
        frame[f"v{j}"] = cols[:, j]
    return frame.groupby("case", sort=False).mean()


def test_case_scores_equal_reference_implementations(cohort):
    from lifelines.utils import concordance_index
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    data = load_task(cohort, "survival")
    rows = np.arange(len(data))
    risk = -np.log(data.times) + rng.normal(scale=1.0, size=len(data))
    c = case_level(data, rows, {"risk": risk})
    # independent: pandas groupby mean per case, lifelines on the per-case risks
    per_case = _per_case_frame(data, rows, risk)
    truth = pd.DataFrame({"case": data.case_ids, "t": data.times, "e": data.events}).groupby("case", sort=False).first()
    assert c["case_ids"] == list(per_case.index)
    expected = concordance_index(truth["t"], -per_case["v0"], truth["e"])
    summary = summarize(data, rows, {"risk": risk}, num_bootstrap=200)
    assert summary["n"] == 30 and summary["n_slides"] == 46 and summary["level"] == "case"
    assert summary["metrics"]["c_index"]["value"] == pytest.approx(expected, abs=1e-12)
    # slide level is a different number (patients with more slides weigh more)
    slide = summarize(data, rows, {"risk": risk}, num_bootstrap=200, level="slide")
    assert slide["n"] == 46 and slide["metrics"]["c_index"]["value"] != pytest.approx(expected, abs=1e-6)

    cls = load_task(cohort, "classification")
    logits = rng.normal(size=(len(cls), 2)) + np.eye(2)[cls.labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    per_case = _per_case_frame(cls, rows, probs)
    labels = pd.Series(cls.labels, index=cls.case_ids).groupby(level=0, sort=False).first()
    got = summarize(cls, rows, {"probs": probs}, num_bootstrap=100)["metrics"]["macro_auc"]["value"]
    assert got == pytest.approx(roc_auc_score(labels.loc[per_case.index] == 1, per_case["v1"]), abs=1e-12)

    # a case whose slides disagree on the label cannot be scored per case: an error naming it
    bad = load_task(cohort, "classification")
    bad.labels = bad.labels.copy()
    bad.labels[1] = 1 - bad.labels[1]  # c00s1, second slide of case00
    with pytest.raises(ValueError, match=r"one label per case, but the slides of case\(s\) \['case00'\] disagree"):
        summarize(bad, rows, {"probs": probs}, num_bootstrap=10)


def test_case_bootstrap_equals_an_independent_one(cohort):
    from lifelines.utils import concordance_index

    data = load_task(cohort, "survival")
    rng = np.random.default_rng(2)
    rows = np.arange(len(data))
    risk = -np.log(data.times) + rng.normal(scale=1.5, size=len(data))
    ours = summarize(data, rows, {"risk": risk}, num_bootstrap=2000, seed=0)["metrics"]["c_index"]
    # independent: per-case frame, cases resampled with another generator, lifelines on each resample
    per_case = _per_case_frame(data, rows, risk)["v0"].to_numpy()
    truth = pd.DataFrame({"case": data.case_ids, "t": data.times, "e": data.events}).groupby("case", sort=False).first()
    t, e = truth["t"].to_numpy(), truth["e"].to_numpy()
    boot = np.random.default_rng(12345)
    values = []
    for _ in range(2000):
        idx = boot.integers(0, len(t), len(t))
        if e[idx].any():
            values.append(concordance_index(t[idx], -per_case[idx], e[idx]))
    low, high = np.percentile(values, [2.5, 97.5])
    # resampling noise of a 2000-sample percentile endpoint with 30 cases: ~0.01
    assert ours["ci_low"] == pytest.approx(low, abs=0.03) and ours["ci_high"] == pytest.approx(high, abs=0.03)
    assert ours["num_valid"] == 2000

    # slide-level scores with case groups: a cluster bootstrap (cases drawn, all their slides taken)
    groups = data.case_ids
    members = _members(groups, len(data))
    for idx in _resamples(len(data), 20, 0, members):
        drawn = pd.Series([groups[i] for i in idx]).value_counts()
        sizes = pd.Series(groups).value_counts()
        assert (drawn % sizes.loc[drawn.index] == 0).all()  # whole cases only
    clustered = bootstrap_ci(lambda tt, ee, rr: concordance_index(tt, -rr, ee), data.times, data.events, risk,
                             num_samples=300, groups=groups)["value"]
    assert clustered["num_valid"] == 300 and clustered["ci_low"] < clustered["value"] < clustered["ci_high"]
    # the paired test resamples cases too, and rejects nothing when both predictions are the same
    same = paired_bootstrap(lambda tt, ee, rr: concordance_index(tt, -rr, ee), (data.times, data.events), risk, risk,
                            num_samples=100, groups=groups)["value"]
    assert same["delta"] == 0 and same["p_value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 cases"):
        bootstrap_ci(np.mean, np.ones(3), groups=["a", "a", "a"])


def test_survival_bins_count_cases(cohort):
    from mstar_hf.modeling.modeling_mstar_downstream import compute_time_bins
    from mstar_hf.training_utils.mil import MILSettings, build_model

    data = load_task(cohort, "survival")
    train = np.arange(len(data))
    model = build_model(data, MILSettings(hidden_size=8, attention_dim=8, num_time_bins=4), train)
    firsts = first_row_per_case(data.case_ids, train)
    assert len(firsts) == 30
    expected = compute_time_bins(data.times[firsts], data.events[firsts], 4)
    assert np.allclose(model.config.time_bins, expected)
    # counting slides would give other bins on this cohort
    assert not np.allclose(compute_time_bins(data.times, data.events, 4), expected)


def test_primary_figures_notice_and_table(cohort, clean):
    data = load_task(clean, "classification")
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(len(data), 2)) + 1.5 * np.eye(2)[data.labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    folds = make_folds(data, folds=3, seed=0, use_manifest_splits=False)
    rows = np.concatenate([f.test for f in folds])
    fold_ids = np.concatenate([np.full(len(f.test), f.index) for f in folds])
    preds = {"probs": probs[rows]}
    summary = summarize(data, rows, preds, num_bootstrap=200, fold=fold_ids)
    per_fold = [summarize(data, f.test, {"probs": probs[f.test]}, num_bootstrap=10)["metrics"]["macro_auc"]["value"]
                for f in folds]
    primary = summary["primary"]["macro_auc"]
    assert summary["n_folds"] == 3 and primary["value"] == pytest.approx(np.mean(per_fold))
    assert primary["std"] == pytest.approx(np.std(per_fold)) and primary["kind"].startswith("mean +- std over 3 folds")
    assert summary["pooled_label"].startswith("pooled out-of-fold")
    table = format_table([{"name": "x", **summary}], ["macro_auc", "balanced_accuracy"], primary="macro_auc")
    assert "macro_auc (mean+-std, 3 folds)" in table and f"{np.mean(per_fold):.3f} +- {np.std(per_fold):.3f}" in table
    assert "pooled out-of-fold macro_auc [95% CI]" in table

    # one fixed test split: its value with the case-bootstrap CI, no +-
    (fold,) = make_folds(data, use_manifest_splits=True)
    one = summarize(data, fold.test, {"probs": probs[fold.test]}, num_bootstrap=200,
                    fold=np.zeros(len(fold.test), dtype=int))
    assert one["n_folds"] == 1 and one["primary"]["macro_auc"]["std"] is None
    assert one["primary"]["macro_auc"]["ci_low"] == one["metrics"]["macro_auc"]["ci_low"]
    table = format_table([{"name": "x", **one}], ["macro_auc"], primary="macro_auc")
    assert "+-" not in table and "macro_auc [95% CI]" in table and "pooled" not in table
    notice = split_notice(data, [fold])
    assert notice["source"].startswith("manifest") and "test 6 cases / 14 slides" in notice["text"]
    assert any("only 6 cases (< 20)" in w for w in notice["warnings"])
    fold.absent_test_classes = ["type1"]
    assert "warning: the test split has no case of class(es) ['type1']" in split_notice(data, [fold])["text"]


def test_aggregate_by_case():
    cases, values = aggregate_by_case(["b", "a", "b"], np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
    assert cases == ["b", "a"] and np.allclose(values, [[0.5, 0.5], [0.5, 0.5]])
    assert aggregate_by_case(["b", "a", "b"], np.array([3, 4, 5]), how="first")[1].tolist() == [3, 4]


def test_mil_case_bags_and_slide_bags(clean):
    from accelerate import Accelerator

    from mstar_hf.training_utils.mil import BagDataset, FeatureStore, MILSettings, run_cross_validation

    data = load_task(clean, "classification")
    store = FeatureStore(data)
    bags = BagDataset(data, np.arange(len(data)), store, by_case=True)
    assert len(bags) == 30
    item = bags[0]  # case00: 3 slides, all their patches in one bag
    assert len(item["patch_features"]) == sum(int(data.num_patches[i]) for i in range(3))
    folds = make_folds(data, folds=2, seed=0, val_fraction=0.25, use_manifest_splits=False)
    fast = dict(hidden_size=16, attention_dim=8, learning_rate=2e-3, epochs=4, patience=4)
    for level in ("case", "slide"):
        cv = run_cross_validation(data, folds, MILSettings(bag_level=level, **fast), Accelerator(cpu=True),
                                  store, progress=False)
        summary = summarize(data, cv.rows, cv.preds, cv.folds, num_bootstrap=100, fold=cv.fold)
        assert summary["n"] == 30 and summary["metrics"]["macro_auc"]["value"] > 0.7, level
        if level == "case":  # every slide of a case carries its case bag's prediction
            frame = pd.DataFrame(cv.preds["probs"], index=[data.case_ids[i] for i in cv.rows])
            assert (frame.groupby(level=0).std().fillna(0).to_numpy() < 1e-6).all()


def test_cli_on_the_multislide_cohort(cohort, tmp_path, capsys):
    base = ["evaluate", "--manifest", str(cohort), "--task", "linear-probe", "--quiet", "--bootstrap", "200"]
    assert cli_main(base + ["--out", str(tmp_path / "leak")]) == 1
    err = capsys.readouterr().err
    assert "have slides on more than one side" in err and all(c in err for c in LEAKING)
    assert cli_main(base + ["--split-from-first-slide", "--out", str(tmp_path / "ok")]) == 0
    printed = capsys.readouterr().out
    assert "splits: manifest" in printed and "test 6 cases / 14 slides" in printed and "(< 20)" in printed
    results = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert results["split_source"].startswith("manifest") and results["score_level"] == "case"
    assert results["warnings"] and results["n_cases"] == 30 and results["n_slides"] == 46
    fs = results["feature_sets"]["features"]
    assert fs["n"] == 6 and fs["primary"]["macro_auc"]["std"] is None
    # the CSV keeps one row per slide with its case
    with open(tmp_path / "ok" / "predictions_features.csv") as f:
        assert len({r["case_id"] for r in csv.DictReader(f)}) == 6
    # k-fold on the same cohort: the headline is mean +- std over the folds, pooled beside it
    assert cli_main(base + ["--splits", "kfold", "--folds", "3", "--out", str(tmp_path / "kf")]) == 0
    printed = capsys.readouterr().out
    assert "macro_auc (mean+-std, 3 folds)" in printed and "pooled out-of-fold macro_auc" in printed
    # survival MIL with case bags, k-fold: per-case C-index, fold mean +- std
    assert cli_main(["evaluate", "--manifest", str(cohort), "--task", "survival", "--splits", "kfold", "--folds", "2",
                     "--bag-level", "case", "--epochs", "3", "--hidden-size", "16", "--attention-dim", "8", "--quiet",
                     "--bootstrap", "100", "--out", str(tmp_path / "surv")]) == 0
    surv = json.loads((tmp_path / "surv" / "results.json").read_text())["feature_sets"]["features"]
    assert surv["n"] == 30 and surv["primary"]["c_index"]["kind"].startswith("mean +- std over 2 folds (case level)")
    assert (tmp_path / "surv" / "kaplan_meier.png").is_file()
    # few-shot: support cases are never queries (queries counted in cases)
    assert cli_main(["evaluate", "--manifest", str(cohort), "--task", "few-shot", "--splits", "kfold", "--shots", "2",
                     "--draws", "3", "--quiet", "--bootstrap", "50", "--out", str(tmp_path / "fs")]) == 0
    few = json.loads((tmp_path / "fs" / "results.json").read_text())
    two = few["feature_sets"]["features"]["shots"]["2"]
    assert two["n_query_cases"] == [30 - 2 * 2] * 3 and all(n > 26 for n in two["n_query"])
