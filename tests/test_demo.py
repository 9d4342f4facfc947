"""The main job, `mstar-hf demo --quick`, end to end (the README's first command, small), including a
run killed mid-way and resumed, and the bad input of the issue (foreign --out, too few cases)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mstar_hf.cli import main as cli_main
from mstar_hf.demo import MIN_CASES_PER_TYPE, DemoSettings, run_demo
from mstar_hf.demo_state import STATE_FILE, DemoFolder, DemoFolderError

ROOT = Path(__file__).resolve().parents[1]
TRAINING_STAGES = ["cohort", "patch_encoder_init", "features", "stage1", "stage2", "features_stage2", "features_untrained",
                   "report_generator"]


def _finished(out: Path) -> list[str]:
    try:
        return json.loads((out / STATE_FILE).read_text())["finished"]
    except (OSError, ValueError, KeyError):
        return []


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, real_slide):
    """`mstar-hf demo --quick` killed (SIGKILL) right after Stage 1 finished, then run again to the end."""
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    log = out.parent / "first_run.log"  # a file, not a pipe: a full pipe would block the demo
    start = time.time()
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "mstar_hf.cli", "demo", "--quick", "--out", str(out), "--quiet"],
                                env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            while "stage1" not in _finished(out):
                if proc.poll() is not None:
                    pytest.fail(f"the demo exited ({proc.returncode}) before Stage 1 finished: "
                                f"{log.read_text(errors='replace')[-3000:]}")
                if time.time() - start > 900:
                    pytest.fail("Stage 1 of the quick demo did not finish within 15 minutes")
                time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    first_run_s = time.time() - start
    killed_state = _finished(out)
    assert not (out / "results.json").exists()
    assert cli_main(["demo", "--quick", "--out", str(out), "--slide", str(real_slide), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    return {"out": out, "results": results, "killed_state": killed_state, "first_run_s": first_run_s}


def test_quick_demo_trains_and_serves_mstar(quick_demo):
    out, results = quick_demo["out"], quick_demo["results"]
    print("\n" + (out / "summary.md").read_text())
    print(f"quick demo runtime: {quick_demo['first_run_s']:.0f} s until killed after Stage 1 + {results['total_s']:.0f} s "
          "resumed (goal <= 180 s in one go on 2 idle cores)")

    # the stand-in encoder went through this test process's cache (conftest's MSTAR_HF_CACHE, never the user's)
    encoder = results["initial_encoder"]
    assert encoder["cache"] in ("stored", "hit"), encoder
    assert encoder["cache_entry"].startswith(os.environ["MSTAR_HF_CACHE"]), encoder
    # every held-out measurement of issue #14 is there (whether it meets its goal is the next test)
    for key in ("difficulty", "zero_shot_declared", "stage2_downstream", "stage2_distillation", "stage2_teacher_ceiling"):
        assert results[key], key
    # the difficulty baselines include an encoder that learned nothing (random weights, same ViT)
    assert {"untrained_encoder_linear_probe", "untrained_encoder_few_shot_k1"} <= set(results["difficulty"])
    # the teacher's ceiling is paired with the initial encoder on the same cases and few-shot draws
    for protocol in ("linear_probe", "few_shot_k1"):
        row = results["stage2_teacher_ceiling"]["patch_tokens"][protocol]
        initial = results["difficulty"][f"initial_encoder_{protocol}"]["balanced_accuracy"]
        assert row["difference"]["delta"] == pytest.approx(row["balanced_accuracy"] - initial, abs=1e-9), row
    report = results["report_generation"]
    assert report["n"] >= 3 and report["splits"] == ["test", "val"], report
    # the cohort's own reports name their type: the diagnosis metric can tell a right report from a wrong one
    assert report["diagnosis_accuracy"]["references"] == 1.0, report["diagnosis_accuracy"]
    predictions = [json.loads(line) for line in (out / "report_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == report["n"] and all(p["generated"].strip() for p in predictions)

    # what a person looks at
    for path in ("summary.md", "models/stage1/loss_curve.png", "models/stage2/loss_curve.png",
                 "models/stage1/README.md", "models/report_generator/README.md", "real_slide/zero_shot_heatmap.png"):
        assert (out / path).is_file(), path
    assert list((out / "heatmaps").glob("*.png")) and list((out / "cohort" / "features" / "qc").glob("*.png"))
    real = results["real_slide"]
    assert real["num_patches"] > 10 and real["generated_report"].strip()


@pytest.mark.xfail(strict=False, reason=(
    "issue #14 is open: on the full demo's 24 held-out cases (cohort seeds 0 / 1) the declared zero-shot is 0.88 / 0.79 "
    "(>= 0.8) and the shuffled-pairing control, mean of three shuffles, 0.47 / 0.54 (<= 0.45; ten shuffles 0.33 / 0.42); "
    "the initial (pretrained-start) encoder's one-shot "
    "prototypes are 0.81 / 0.69 (goal <= 0.5; an untrained encoder's 0.33 / 0.35); the Stage 2 encoder gains few-shot "
    "k=1 +0.07 / +0.03 and linear probe +0.00 / +0.00 (goal +0.10), within the ceiling its teacher's own patch tokens "
    "set (+0.11 / +0.10); the full demo's reports (900 steps) beat copy-nearest (BLEU-1 0.480 / 0.477 vs 0.439 / 0.416), "
    "the quick demo's (300 steps) do not; the quick demo's "
    "smaller cohort meets "
    "fewer; the assertions below are the goals, and the failure message says which one is missed"))
def test_quick_demo_meets_the_learning_goals(quick_demo):
    """Issue #14's goals on held-out cases of the fair cohort (stain shared by all types). Each assert says
    which goal is missed; a miss is a finding about the method at this budget, not a flaky test."""
    results = quick_demo["results"]
    # the cohort needs learning: colour and the untrained encoder are near chance (3 types: 0.33)
    difficulty = results["difficulty"]
    assert difficulty["mean_rgb_nearest_centroid"]["balanced_accuracy"] <= 0.5, difficulty
    assert difficulty["untrained_encoder_few_shot_k1"]["balanced_accuracy"] <= 0.5, difficulty
    assert difficulty["initial_encoder_few_shot_k1"]["balanced_accuracy"] <= 0.5, difficulty
    # Stage 1, judged on the one zero-shot route declared in the demo (not the best of several)
    declared = results["zero_shot_declared"]
    assert (declared["mode"], declared["patch_source"]) == ("patch_topk", "aggregator"), declared
    assert declared["balanced_accuracy"] >= 0.8, results["zero_shot"]
    retrieval = results["stage1_retrieval"]["slide->report"]
    assert retrieval["type_R@1"] >= 0.5 > retrieval["type_chance@1"], retrieval
    # Stage 2, on a metric a bias cannot meet: held-out patch retrieval@1 against its mean-target baseline
    distillation = results["stage2_distillation"]
    assert distillation["stage2_student"]["retrieval@1"] >= 5 * distillation["mean_target"]["retrieval@1"], distillation
    assert distillation["stage2_student"]["centred_cosine"] > distillation["mean_target"]["centred_cosine"] + 0.1
    for protocol in ("linear_probe", "few_shot_k1", "few_shot_k2", "few_shot_k4", "abmil"):
        row = results["stage2_downstream"][protocol]
        assert {"initial", "stage2", "difference"} <= set(row) and row["difference"]["ci_low"] <= row["difference"]["delta"]
    assert "encoder_stage2" in results["zero_shot"]  # the paper's route, through the Stage 2 encoder
    report = results["report_generation"]
    # the goal: beat copying the nearest training report; if it does not, this says so
    model, baseline = report["model"]["BLEU-1"], report["nearest_report_baseline"]["BLEU-1"]
    assert model > baseline, f"report generation does not beat the copy-nearest baseline: BLEU-1 {model:.3f} <= {baseline:.3f}"


def test_stage2_bounds_agree_with_the_demo_and_pair_every_row(quick_demo):
    """`stage2_bounds` (what of the teacher's gain a patch encoder can reach) is computed on the demo's own cases,
    seed and few-shot draws: its initial, Stage 2 and whole-slide-teacher rows are the demo's other figures, and
    the rows only it has (the teacher on a patch alone, the ridge student) are paired with the initial encoder."""
    results = quick_demo["results"]
    rows = results["stage2_bounds"]
    assert set(rows) == {"initial_encoder", "teacher_whole_slide", "teacher_patch_alone", "ridge_on_initial_features",
                         "stage2_encoder", "stage2_projection"}
    n = results["stage2_downstream"]["linear_probe"]["initial"]["n"]
    for protocol in ("linear_probe", "few_shot_k1", "few_shot_k2", "few_shot_k4"):
        downstream = results["stage2_downstream"][protocol]
        assert rows["initial_encoder"][protocol]["balanced_accuracy"] == downstream["initial"]["balanced_accuracy"]
        assert rows["stage2_encoder"][protocol]["balanced_accuracy"] == downstream["stage2"]["balanced_accuracy"]
        ceiling = results["stage2_teacher_ceiling"]["patch_tokens"][protocol]
        assert rows["teacher_whole_slide"][protocol]["balanced_accuracy"] == ceiling["balanced_accuracy"]
        initial = rows["initial_encoder"][protocol]["balanced_accuracy"]
        for name, row in rows.items():
            assert row[protocol]["n"] == n and row[protocol]["ci_low"] <= row[protocol]["balanced_accuracy"]
            if name != "initial_encoder":
                d = row[protocol]["difference"]
                assert d["delta"] == pytest.approx(row[protocol]["balanced_accuracy"] - initial, abs=1e-9), (name, d)
    assert "Stage 2 reachable, few_shot_k1" in (quick_demo["out"] / "summary.md").read_text()


def test_killed_demo_resumes_and_reports_fresh_results(quick_demo):
    """The kill after Stage 1: the second run reused cohort, features and Stage 1, redid the rest."""
    killed, results = quick_demo["killed_state"], quick_demo["results"]
    assert killed[:4] == TRAINING_STAGES[:4]
    assert results["resumed_stages"] == killed
    assert set(TRAINING_STAGES) - set(killed) <= set(_finished(quick_demo["out"]))
    assert results["timings_s"]  # every stage ran (or was reused) in the second run
    assert "resumed from an earlier run" in (quick_demo["out"] / "summary.md").read_text()


def test_rerun_of_a_finished_demo_reuses_models_and_rewrites_results(quick_demo):
    out = quick_demo["out"]
    before = json.loads((out / "results.json").read_text())
    weights = (out / "models" / "stage1" / "model.safetensors").read_bytes()
    results = run_demo(out, DemoSettings.quick(), quiet=True)
    assert results["resumed_stages"] == TRAINING_STAGES
    assert results["started_at"] >= before["started_at"] and results["real_slide"] is None  # no --slide this time
    assert json.loads((out / "results.json").read_text())["real_slide"] is None
    assert (out / "models" / "stage1" / "model.safetensors").read_bytes() == weights
    # same models, same held-out figures
    assert results["zero_shot"] == before["zero_shot"]


def test_demo_refuses_other_settings_in_a_demo_folder(quick_demo):
    with pytest.raises(DemoFolderError, match="other settings.*--overwrite"):
        DemoFolder.open(quick_demo["out"], vars(DemoSettings.quick(seed=1)))


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    assert cli_main(["demo", "--quick", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not empty" in err and "--overwrite" in err
    assert (out / "thesis.tex").read_text() == "do not delete"
    # --overwrite empties it (checked on the folder logic; the run itself is the test above)
    folder = DemoFolder.open(out, vars(DemoSettings.quick()), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [STATE_FILE] and folder.resumed == []


def test_demo_overwrite_never_empties_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DemoFolderError, match="refusing to empty"):
        DemoFolder.open(".", vars(DemoSettings.quick()), overwrite=True)
    assert (tmp_path / "notes.txt").is_file()


def test_demo_folder_never_keeps_results_of_an_earlier_run(tmp_path):
    settings = vars(DemoSettings.quick())
    folder = DemoFolder.open(tmp_path / "d", settings)
    folder.mark("cohort")
    (tmp_path / "d" / "results.json").write_text("{}")
    (tmp_path / "d" / "summary.md").write_text("old")
    again = DemoFolder.open(tmp_path / "d", settings)
    assert again.resumed == ["cohort"] and again.done("cohort") and not again.done("stage1")
    assert not (tmp_path / "d" / "results.json").exists() and not (tmp_path / "d" / "summary.md").exists()
    (tmp_path / "d" / STATE_FILE).write_text("{not json")
    with pytest.raises(DemoFolderError, match="not a demo folder"):
        DemoFolder.open(tmp_path / "d", settings)


def test_more_control_shuffles_reopen_only_the_control(tmp_path):
    settings = vars(DemoSettings())
    folder = DemoFolder.open(tmp_path / "d", settings)
    for stage in ("cohort", "stage1", "stage1_control", "stage2"):
        folder.mark(stage)
    more = DemoFolder.open(tmp_path / "d", {**settings, "shuffled_control_repeats": 10})
    assert more.reopened == ["stage1_control"] and more.finished == ["cohort", "stage1", "stage2"]
    assert json.loads((tmp_path / "d" / STATE_FILE).read_text())["settings"]["shuffled_control_repeats"] == 10
    # any other change is another demo: refused, naming what differs
    with pytest.raises(DemoFolderError, match=r"cases_per_type: 24 there, 10 here"):
        DemoFolder.open(tmp_path / "d", {**settings, "shuffled_control_repeats": 10, "cases_per_type": 10})


@pytest.mark.parametrize("argv, message", [
    (["--cases", "3"], f"too few cases per type for the splits; the minimum is {MIN_CASES_PER_TYPE}"),
    (["--types", "1"], "2 to 10 cancer types"),
    (["--control-shuffles", "-1"], "--control-shuffles -1: must be 0 or more"),
])
def test_demo_rejects_too_small_cohorts(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli_main(["demo", "--quick", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("argv, enabled, repeats", [
    ([], False, 3), (["--control-shuffles", "5"], True, 5), (["--control-shuffles", "0"], False, 3),
])
def test_control_shuffles_flag_sets_the_control(tmp_path, monkeypatch, argv, enabled, repeats):
    import mstar_hf.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, settings, **kw: seen.setdefault("settings", settings))
    assert cli_main(["demo", "--quick", "--out", str(tmp_path / "out"), *argv]) == 0
    assert seen["settings"].shuffled_control is enabled and seen["settings"].shuffled_control_repeats == repeats
    with pytest.raises(ValueError, match="at least one shuffle"):
        demo.DemoSettings(shuffled_control_repeats=0)


@pytest.mark.parametrize("argv, cached", [([], True), (["--no-encoder-cache"], False)])
def test_no_encoder_cache_flag_trains_the_stand_in_again(tmp_path, monkeypatch, argv, cached):
    import mstar_hf.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, settings, **kw: seen.update(kw))
    assert cli_main(["demo", "--quick", "--out", str(tmp_path / "out"), *argv]) == 0
    assert seen["encoder_cache"] is cached
