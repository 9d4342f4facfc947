"""Training that stays right at scale (issue #13): the shared loop's schedule and checkpoints, the cohort
check before step 1, an empty held-out split, too-small batches, and every shipped DeepSpeed config
launched as shipped (Stage 1 and Stage 2, plus a ZeRO-2 resume)."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "training" / "configs").glob("accelerate_*.yaml"))
DIM, GENES = 64, 24


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return {**env, **extra}


# -- a features-only cohort (Stage 1 reads features, reports and RNA; no slide files needed) ---------------
@pytest.fixture(scope="module")
def feature_cohort(tmp_path_factory):
    from mstar_hf.data.features import write_slide_features

    root = tmp_path_factory.mktemp("feature_cohort")
    rng = np.random.default_rng(0)
    genes = [f"G{i:03d}" for i in range(GENES)]
    (root / "gene_vocab.json").write_text(json.dumps(genes))
    types = ["adeno", "squamous", "small cell"]
    rows = []
    for i in range(18):
        t = i % 3
        case = f"C{i:02d}"
        feats = rng.normal(t, 1.0, size=(12, DIM)).astype(np.float32)
        write_slide_features(root / "features" / f"{case}.h5", feats)
        rna = pd.DataFrame({"gene": genes, "value": rng.gamma(2.0, 5.0, GENES) * (1 + t)})
        (root / "rna").mkdir(exist_ok=True)
        rna.to_csv(root / "rna" / f"{case}.csv", index=False)
        rows.append({"case_id": case, "slide_id": f"{case}-S1", "cancer_type": types[t],
                     "features_path": f"features/{case}.h5", "report": f"Diagnosis: {types[t]} carcinoma, grade {1 + i % 2}.",
                     "rna_path": f"rna/{case}.csv", "label": types[t], "split": "train" if i < 12 else "val"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def _stage1_args(manifest, out, steps, *extra):
    return ["--manifest", str(manifest), "--model_size", "tiny", "--output_dir", str(out), "--max_train_steps",
            str(steps), "--per_device_train_batch_size", "4", "--max_patches", "16", "--with_tracking", "false",
            "--quiet", "--learning_rate", "1e-3", *extra]


def _records(out):
    return [json.loads(line) for line in (Path(out) / "loss_log.jsonl").read_text().splitlines()]


# -- the loop helper -----------------------------------------------------------------------------------
def test_schedule_is_sized_for_the_process_count():
    """A prepared scheduler steps once per process; sized for max_steps * N it gives every optimizer step
    the learning rate of a 1-process run (unsized, 2 processes reach 0 at half of training)."""
    from transformers import get_scheduler

    from mstar_hf.training_utils.loop import build_scheduler

    def lrs(num_processes, sized=True):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = (build_scheduler("cosine", opt, 2, 10, num_processes) if sized
                 else get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10))
        out = []
        for _ in range(10):
            for _ in range(num_processes):  # what AcceleratedScheduler.step does
                sched.step()
            out.append(sched.get_last_lr()[0])
        return out

    assert lrs(2) == pytest.approx(lrs(1), abs=1e-12)
    assert lrs(4) == pytest.approx(lrs(1), abs=1e-12)
    assert lrs(2, sized=False)[4] == 0.0 and lrs(1)[4] > 0.4  # the bug this guards against


def test_loop_checkpoints_every_epoch_and_at_the_end(tmp_path):
    from accelerate import Accelerator
    from types import SimpleNamespace

    from mstar_hf.training_utils.loop import TrainingLoop, build_scheduler, parse_checkpointing_steps

    assert parse_checkpointing_steps("0") is None and parse_checkpointing_steps(None) is None
    assert parse_checkpointing_steps("epoch") == "epoch" and parse_checkpointing_steps("3") == 3
    with pytest.raises(ValueError, match="checkpointing_steps"):
        parse_checkpointing_steps("often")
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler("linear", opt, 0, 5, accelerator.num_processes)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    args = SimpleNamespace(output_dir=str(tmp_path), checkpointing_steps="epoch", resume_from_checkpoint=None,
                           max_grad_norm=1.0, logging_steps=1, with_tracking=False, quiet=True)
    loop = TrainingLoop(accelerator, args, "unit", max_train_steps=5, updates_per_epoch=2)
    loop.resume()
    while not loop.done:
        with accelerator.accumulate(model):
            loss = model(torch.ones(4, 2)).pow(2).mean()
            loop.backward_and_step(model, opt, sched, loss)
        loop.end_step(loss=loss)
    loop.finish()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["lr"] == 0.0
    assert (tmp_path / "loss_curve.png").is_file()
    # resuming the finished run continues from its final checkpoint
    again = TrainingLoop(accelerator, args, "unit", max_train_steps=5, updates_per_epoch=2)
    assert again.resume("latest") == 5 and again.done


# -- the cohort check ----------------------------------------------------------------------------------
def _bad_cohort(src: Path, dst: Path) -> Path:
    """The feature cohort with one case of each kind of bad input."""
    from mstar_hf.data.features import write_slide_features

    shutil.copytree(src, dst)
    frame = pd.read_csv(dst / "manifest.csv")
    frame.loc[0, "features_path"] = "features/missing.h5"                                     # missing file
    write_slide_features(dst / "features" / "C01.h5", np.zeros((5, 8), np.float32))             # wrong width
    nan = np.ones((6, DIM), np.float32)
    nan[2] = np.nan
    write_slide_features(dst / "features" / "C02.h5", nan)                                      # NaN row
    rna = pd.read_csv(dst / "rna" / "C03.csv")
    rna.loc[3, "value"] = np.nan
    rna.to_csv(dst / "rna" / "C03.csv", index=False)                                            # NaN RNA
    (dst / "empty.txt").write_text("   \n")
    frame["report_path"] = ""
    frame.loc[4, "report"] = ""
    frame.loc[4, "report_path"] = "empty.txt"                                                   # empty report
    (dst / "features" / "C05.h5").write_bytes(b"this is not an HDF5 file")                      # unreadable h5
    frame.to_csv(dst / "manifest.csv", index=False)
    return dst / "manifest.csv"


EXPECTED_PROBLEMS = {
    "C00": "features file not found",
    "C01": "wrong feature width",
    "C02": "NaN/inf",
    "C03": "RNA has 1 NaN/inf",
    "C04": "empty report",
    "C05": "cannot open features file",
}


def test_bad_cases_are_all_reported_before_step_1(feature_cohort, tmp_path):
    from mstar_hf.data.validation import CohortError
    from mstar_hf.training_utils.stage1 import main

    manifest = _bad_cohort(feature_cohort, tmp_path / "bad")
    out = tmp_path / "run"
    with pytest.raises(CohortError) as caught:
        main(_stage1_args(manifest, out, 2))
    message = str(caught.value)
    for case, problem in EXPECTED_PROBLEMS.items():
        line = next((line for line in message.splitlines() if line.startswith(case)), "")
        assert problem in line, (case, problem, message)
    assert "6 bad case(s), nothing was trained" in message
    assert not (out / "loss_log.jsonl").exists() and not list(out.glob("checkpoint-*"))
    with open(out / "failures.csv") as handle:
        assert {row["case_id"] for row in csv.DictReader(handle)} == set(EXPECTED_PROBLEMS)

    # --skip_bad_cases: the six are left out and listed, the rest trains
    assert main(_stage1_args(manifest, out, 2, "--skip_bad_cases", "true")) == 0
    results = json.loads((out / "stage1_results.json").read_text())
    assert results["steps"] == 2 and results["train_cases"] == 12 - 6
    assert (out / "model.safetensors").is_file()

    # the same table from the command line, exit 1
    done = subprocess.run([sys.executable, "-m", "mstar_hf.cli", "validate", "--manifest", str(manifest), "--quiet",
                           "--failures", str(tmp_path / "f.csv")], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 1, done.stderr
    assert "6 of 18 slide(s) have problems (expected 64-d features)" in done.stdout
    for case, problem in EXPECTED_PROBLEMS.items():
        assert any(line.startswith(case) and problem in line for line in done.stdout.splitlines()), (case, done.stdout)
    good = subprocess.run([sys.executable, "-m", "mstar_hf.cli", "validate", "--manifest",
                           str(feature_cohort / "manifest.csv"), "--quiet"], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert good.returncode == 0 and "all 18 slide(s) of 18 case(s) are usable" in good.stdout


def test_empty_eval_split_is_no_held_out_set_and_tiny_batches_are_refused(feature_cohort, tmp_path):
    from mstar_hf.training_utils.stage1 import main

    out = tmp_path / "run"
    main(_stage1_args(feature_cohort / "manifest.csv", out, 1, "--eval_split", "test"))  # no 'test' rows
    results = json.loads((out / "stage1_results.json").read_text())
    assert results["eval_slides"] == 0 and results["retrieval"] is None and results["retrieval_before"] is None
    assert "No held-out evaluation: no held-out set" in (out / "retrieval.md").read_text()
    assert json.loads((out / "eval_results.json").read_text()) == []  # nothing reaches the model-index
    assert (out / "checkpoint-1").is_dir(), "a checkpoint is written at the end of training"

    with pytest.raises(ValueError, match="global batch of 1: InfoNCE and the triplet loss need at least 2"):
        main(_stage1_args(feature_cohort / "manifest.csv", tmp_path / "b1", 1, "--per_device_train_batch_size", "1"))


def test_a_case_split_across_train_and_val_is_refused(feature_cohort, tmp_path):
    from mstar_hf.training_utils.stage1 import main

    leaky = tmp_path / "leaky"
    shutil.copytree(feature_cohort, leaky)
    frame = pd.read_csv(leaky / "manifest.csv")
    extra = frame.iloc[[0]].copy()
    extra["slide_id"], extra["split"] = "C00-S2", "val"  # a second slide of C00 on the other side
    pd.concat([frame, extra]).to_csv(leaky / "manifest.csv", index=False)
    with pytest.raises(ValueError, match=r"'C00' \(train / val\)"):
        main(_stage1_args(leaky / "manifest.csv", tmp_path / "run", 1))


# -- 1 vs 2 processes ----------------------------------------------------------------------------------
def test_learning_rate_is_the_same_on_one_and_two_processes(feature_cohort, tmp_path):
    script = ROOT / "training" / "stage1.py"
    args = _stage1_args(feature_cohort / "manifest.csv", "{out}", 4, "--per_device_train_batch_size", "2",
                        "--num_warmup_steps", "1")
    one = tmp_path / "one"
    subprocess.run([sys.executable, str(script), *[a.format(out=one) for a in args]], check=True, env=_env(),
                   cwd=ROOT, capture_output=True, timeout=600)
    two = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           *[a.format(out=two) for a in args]], env=_env(ACCELERATE_USE_CPU="1"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lr_one = [r["lr"] for r in _records(one)]
    lr_two = [r["lr"] for r in _records(two)]
    print("lr, 1 process:", lr_one, "2 processes:", lr_two)
    assert len(lr_one) == 4 and lr_one == lr_two and lr_one[-1] == 0.0 and lr_one[1] > 0
    results = json.loads((two / "stage1_results.json").read_text())
    assert results["num_processes"] == 2 and results["engine"] == "DistributedDataParallel"
    sums = [json.loads((two / f"weights_checksum_rank{r}.json").read_text())["checksum"] for r in (0, 1)]
    assert sums[0] == sums[1]


CHECKPOINT_SCRIPT = """
import sys, time
import torch
from accelerate import Accelerator
from mstar_hf.training_utils.common import save_checkpoint

accelerator = Accelerator(cpu=True)
model, optimizer = accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters()))
if accelerator.process_index == 1:  # a slow rank: it writes its RNG state after the main process is done
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: time.sleep(3))
save_checkpoint(accelerator, sys.argv[1], 1)
"""


def test_a_slow_rank_still_writes_its_state_into_the_checkpoint(tmp_path):
    """save_state writes one RNG file per rank into the temporary folder; the main process renames it only
    when every rank is done (else the late rank crashes on the vanished folder, as it once did in CI)."""
    script = tmp_path / "save.py"
    script.write_text(CHECKPOINT_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tmp_path / "out")], env=_env(ACCELERATE_USE_CPU="1"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = tmp_path / "out" / "checkpoint-1"
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= {p.name for p in final.iterdir()}
    assert not list((tmp_path / "out").glob(".tmp-*")), "no half-written checkpoint is left behind"


# -- DeepSpeed configs as shipped ----------------------------------------------------------------------
def _launch(config, script, args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
           str(ROOT / "training" / script), *args]
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_deepspeed_configs_train_stage1_and_stage2(config, synthetic_cohort, tmp_path):
    """Each accelerate yaml, launched as shipped (only --num_processes 1 on this CPU machine), trains two
    steps of Stage 1 and of Stage 2 in a DeepSpeed engine; ZeRO-2 resumes to the uninterrupted run's loss."""
    cohort = synthetic_cohort
    stage1 = tmp_path / "stage1"
    args = ["--manifest", str(cohort["manifest"]), "--patch_model_name_or_path", str(cohort["patch_model"]),
            "--model_size", "tiny", "--per_device_train_batch_size", "4", "--max_patches", "32", "--with_tracking",
            "false", "--quiet", "--learning_rate", "1e-3"]
    steps = 3 if "zero2" in config.name else 2
    _launch(config, "stage1.py", args + ["--output_dir", str(stage1), "--max_train_steps", str(steps),
                                         "--checkpointing_steps", "2"])
    results = json.loads((stage1 / "stage1_results.json").read_text())
    assert results["engine"] == "DeepSpeedEngine" and results["steps"] == steps
    assert (stage1 / "checkpoint-2" / "pytorch_model").is_dir() and (stage1 / "model.safetensors").is_file()
    losses = {r["step"]: r["loss"] for r in _records(stage1)}
    assert all(math.isfinite(v) for v in losses.values())

    if "zero2" in config.name:  # resume from checkpoint-2 in a fresh folder: step 3 as uninterrupted
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(stage1 / "checkpoint-2", resumed / "checkpoint-2")
        _launch(config, "stage1.py", args + ["--output_dir", str(resumed), "--max_train_steps", "3",
                                             "--resume_from_checkpoint", "latest"])
        again = {r["step"]: r["loss"] for r in _records(resumed)}
        assert list(again) == [3] and abs(again[3] - losses[3]) <= 1e-6, (again, losses)

    stage2 = tmp_path / "stage2"
    _launch(config, "stage2.py", ["--stage1_model", str(stage1), "--manifest", str(cohort["manifest"]),
                                  "--output_dir", str(stage2), "--max_train_steps", "2", "--slides_per_step", "2",
                                  "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
                                  "--max_eval_patches", "16", "--quiet", "--with_tracking", "false"])
    info = json.loads((stage2 / "run_info.json").read_text())
    assert info["is_deepspeed_engine"] and info["zero_stage"] == (3 if "zero3" in config.name else 2)
    assert [r["step"] for r in _records(stage2)] == [1, 2]
    assert (stage2 / "patch_encoder" / "model.safetensors").is_file() and (stage2 / "checkpoint-2").is_dir()


def test_a_frozen_report_encoder_is_run_once_per_report(feature_cohort, tmp_path):
    """With --freeze_text_encoder each report's [CLS] is computed once and reused every step: the model's
    report embeddings from the cache equal the encoder run live (eval mode), and training still runs."""
    from mstar_hf.data import load_cohort
    from mstar_hf.training_utils.stage1 import (
        Stage1DataArguments, Stage1ModelArguments, build_processor_and_model, encode_reports_once, main, make_loader,
        report_hidden_for,
    )

    cohort = load_cohort(feature_cohort / "manifest.csv")
    data_args = Stage1DataArguments(manifest=str(feature_cohort / "manifest.csv"), max_patches=16)
    model, processor = build_processor_and_model(Stage1ModelArguments(model_size="tiny"), data_args, list(cohort["report"]))
    model.eval()
    cache = encode_reports_once(model, processor, [cohort])
    assert set(cache) == set(cohort["case_id"])
    loader, _ = make_loader(cohort, processor, data_args, 6, 0, False, DIM, 0)
    batch = next(iter(loader))
    hidden = report_hidden_for(cache, batch.pop("case_id"), model.config.text_config.hidden_size)
    with torch.no_grad():
        live = model(**batch).text_embeds
        cached = model(**batch, report_hidden=hidden).text_embeds
    assert torch.allclose(live, cached, atol=1e-5)

    out = tmp_path / "frozen"
    assert main(_stage1_args(feature_cohort / "manifest.csv", out, 2, "--freeze_text_encoder", "true")) == 0
    assert [r["step"] for r in _records(out)] == [1, 2]


def test_frozen_report_encodings_are_shared_by_runs_on_the_same_reports(feature_cohort):
    """The demo's shuffled-pairing controls pair the same reports with other cases: the second run reuses the
    first one's encodings (the text encoder does not run) and every case gets its own report's [CLS], to the
    bit; an encoder with other weights is run again."""
    from mstar_hf.data import load_cohort
    from mstar_hf.training_utils.stage1 import Stage1DataArguments, Stage1ModelArguments, build_processor_and_model
    from mstar_hf.training_utils.stage1 import encode_reports_once

    cohort = load_cohort(feature_cohort / "manifest.csv")
    data_args = Stage1DataArguments(manifest=str(feature_cohort / "manifest.csv"), max_patches=16)
    model, processor = build_processor_and_model(Stage1ModelArguments(model_size="tiny"), data_args, list(cohort["report"]))
    calls = []
    model.text_model.register_forward_hook(lambda module, args, output: calls.append(1))
    first = encode_reports_once(model, processor, [cohort], batch_size=4)
    encoded = len(calls)
    assert encoded == -(-len(set(cohort["report"])) // 4)  # each distinct report once, in batches of 4
    # what the encoder reads of a dataset: its case ids and reports
    shuffled = {"case_id": list(cohort["case_id"]),
                "report": list(np.random.default_rng(0).permutation(list(cohort["report"])))}
    assert shuffled["report"] != list(cohort["report"])
    second = encode_reports_once(model, processor, [shuffled], batch_size=4)
    assert len(calls) == encoded  # nothing encoded again
    report_of = dict(zip(cohort["case_id"], cohort["report"]))
    first_by_report = {report_of[c]: h for c, h in first.items()}
    for case, report in zip(shuffled["case_id"], shuffled["report"]):
        assert torch.equal(second[case], first_by_report[report])
    with torch.no_grad():
        next(model.text_model.parameters()).add_(1e-3)
    third = encode_reports_once(model, processor, [cohort], batch_size=4)
    assert len(calls) == 2 * encoded
    assert not all(torch.equal(third[c], first[c]) for c in first)


def test_stage1_with_multi_slide_cases_never_contrasts_a_patient_with_itself(feature_cohort, tmp_path, monkeypatch):
    """Cases with a second slide (same report and RNA): every InfoNCE call masks the pairs of one case, and
    retrieval is reported per case beside per slide."""
    from mstar_hf.data.features import write_slide_features
    from mstar_hf.modeling import modeling_mstar
    from mstar_hf.training_utils.stage1 import main

    multi = tmp_path / "multi"
    shutil.copytree(feature_cohort, multi)
    frame = pd.read_csv(multi / "manifest.csv")
    extra = frame[frame["case_id"].isin(["C00", "C01", "C02", "C12", "C13"])].copy()
    for i, row in extra.iterrows():
        write_slide_features(multi / "features" / f"{row.case_id}-2.h5", np.random.default_rng(i).normal(size=(9, DIM)))
    extra["slide_id"] = extra["case_id"] + "-S2"
    extra["features_path"] = "features/" + extra["case_id"] + "-2.h5"
    pd.concat([frame, extra]).to_csv(multi / "manifest.csv", index=False)

    calls = []
    original = modeling_mstar.symmetric_info_nce

    def recording(a, b, scale, groups=None):
        loss, logits = original(a, b, scale, groups)
        calls.append((groups.clone(), logits.detach().clone()))
        return loss, logits

    monkeypatch.setattr(modeling_mstar, "symmetric_info_nce", recording)
    out = tmp_path / "run"
    main(_stage1_args(multi / "manifest.csv", out, 4, "--per_device_train_batch_size", "8"))
    assert calls
    same_case_pairs = 0
    for groups, logits in calls:
        same = (groups[:, None] == groups[None, :]) & ~torch.eye(len(groups), dtype=torch.bool)
        same_case_pairs += int(same.sum())
        assert torch.isneginf(logits[same]).all()  # never a negative
        assert torch.isfinite(logits.diagonal()).all()
    assert same_case_pairs > 0, "the batches held two slides of one case (the situation under test)"
    results = json.loads((out / "stage1_results.json").read_text())
    assert results["eval_cases"] == 6 and results["eval_slides"] == 8
    assert results["retrieval_by_case"]["slide->report"]["n"] == 6
    assert results["retrieval"]["slide->report"]["n"] == 8
