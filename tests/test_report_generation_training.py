"""training/report_generation.py on a tiny feature cohort: trains, checkpoints, resumes, evaluates against
the nearest-report baseline, saves a loadable model + tokenizer; `accelerate launch` runs it too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from report_generation_fixtures import load_training_script, make_feature_cohort, one_thread
from transformers import AutoModel, AutoTokenizer

import mstar_hf  # noqa: F401  (registers the Auto classes)
from mstar_hf import MStarForReportGeneration

ROOT = Path(__file__).resolve().parents[1]
DIM = 64  # the tiny presets' width, so a tiny Stage 1 MStarModel fits the features

TINY = ["--model_size", "tiny", "--decoder_layers", "2", "--decoder_hidden_size", "32", "--decoder_heads", "2",
        "--region_size", "8", "--tokenizer_vocab_size", "400", "--max_new_tokens", "12", "--num_beams", "3",
        "--with_tracking", "false", "--quiet", "true", "--per_device_train_batch_size", "4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_feature_cohort(tmp_path_factory.mktemp("report_cohort"), dim=DIM)


def test_trains_checkpoints_resumes_and_evaluates(cohort, tmp_path):
    script = load_training_script()
    out = tmp_path / "run"
    args = ["--manifest", str(cohort), "--output_dir", str(out), *TINY, "--learning_rate", "2e-3",
            "--lr_scheduler_type", "constant", "--checkpointing_steps", "2", "--eval_steps", "2"]
    assert script.main(args + ["--max_train_steps", "4"]) == 0
    first = json.loads((out / "report_results.json").read_text())
    # 18 cases, 12 in train of which one has no report: skipped
    assert first["train_cases"] == 11 and first["eval_cases"] == 3 and first["steps"] == 4
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    assert (out / "checkpoint-4" / "tokenizer.json").is_file(), "a resumed run reuses the checkpoint's tokenizer"

    script.main(args + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    resumed = json.loads((out / "report_results.json").read_text())
    assert resumed["steps"] == 6 and resumed["engine"] != "DeepSpeedEngine"
    records = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], "the resumed run continues the loss log without repeating steps"
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0], losses
    assert any("eval_loss" in r for r in records)

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "loss_curve.png",
                 "eval_results.json", "report_results.json", "report_results.md",
                 "eval_predictions.jsonl", "training_args.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "report_results.json").read_text())
    for who in ("model", "nearest_report_baseline"):
        assert set(results[who]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR-exact+stem", "ROUGE-L"}
    print("after 6 steps, model:", {k: round(v, 4) for k, v in results["model"].items()})
    print("nearest training report:", {k: round(v, 4) for k, v in results["nearest_report_baseline"].items()})
    names = {r["name"] for r in json.loads((out / "eval_results.json").read_text())}
    assert "BLEU-4 (model)" in names and "BLEU-4 (nearest training report)" in names
    predictions = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 and all(p["reference"] and isinstance(p["generated"], str) for p in predictions)

    model = AutoModel.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, MStarForReportGeneration) and model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id and model.generation_config.num_beams == 3


def test_stage1_initialisation_and_bad_input(cohort, tmp_path):
    from mstar_hf.presets import mstar_config

    script = load_training_script()
    stage1 = AutoModel.from_config(mstar_config("tiny", num_genes=8, vocab_size=50))
    stage1.save_pretrained(tmp_path / "stage1")
    out = tmp_path / "run"
    script.main(["--manifest", str(cohort), "--output_dir", str(out), *TINY, "--max_train_steps", "1",
                 "--stage1_model_name_or_path", str(tmp_path / "stage1"), "--freeze_aggregator", "true",
                 "--max_eval_samples", "1"])
    trained = MStarForReportGeneration.from_pretrained(out)
    for name, value in stage1.aggregator.state_dict().items():  # frozen: still the Stage 1 weights
        assert torch.equal(trained.aggregator.state_dict()[name], value), name

    # features of another width than the Stage 1 aggregator takes
    narrow = make_feature_cohort(tmp_path / "narrow", dim=8, cases_per_type=3)
    with pytest.raises(ValueError, match="wrong feature width: the aggregator expects 64-d .* 8-d"):
        script.main(["--manifest", str(narrow), "--output_dir", str(tmp_path / "bad"), *TINY, "--max_train_steps", "1",
                     "--stage1_model_name_or_path", str(tmp_path / "stage1")])
    # a cohort without any report
    no_reports = make_feature_cohort(tmp_path / "silent", dim=8, cases_per_type=3, missing_reports=9)
    with pytest.raises(ValueError, match="no case has both a report and a features file"):
        script.main(["--manifest", str(no_reports), "--output_dir", str(tmp_path / "bad2"), *TINY])
    with pytest.raises(ValueError, match="empty report list"):
        script.train_bpe_tokenizer(["", "  "])


def test_eval_on_several_splits_and_the_saved_decoding(cohort, tmp_path):
    script = load_training_script()
    out = tmp_path / "run"
    script.main(["--manifest", str(cohort), "--output_dir", str(out), *TINY, "--max_train_steps", "2",
                 "--eval_split", "val,test", "--num_beams", "1"])
    results = json.loads((out / "report_results.json").read_text())
    # 18 cases: 3 in val and 3 in test, one of the 12 training cases without a report
    assert results["steps"] == 2 and results["eval_cases"] == 6 and results["train_cases"] == 11
    # the folder generates as it was evaluated
    assert MStarForReportGeneration.from_pretrained(out).generation_config.num_beams == 1
    assert "(greedy)" in (out / "report_results.md").read_text()


def test_accelerate_launch_with_deepspeed(cohort, tmp_path):
    """`accelerate launch` with DeepSpeed ZeRO-2 (one CPU process), checkpoint and resume."""
    out = tmp_path / "launched"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
           "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "training" / "report_generation.py"), "--manifest", str(cohort), "--output_dir", str(out), *TINY,
           "--checkpointing_steps", "2", "--max_eval_samples", "1"]
    for steps, extra in (("2", []), ("3", ["--resume_from_checkpoint", "latest"])):
        done = subprocess.run(cmd + ["--max_train_steps", steps, *extra], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "copy nearest training report" in done.stdout and "resuming from" in done.stdout
    results = json.loads((out / "report_results.json").read_text())
    assert results["engine"] == "DeepSpeedEngine" and results["steps"] == 3
    assert (out / "checkpoint-2" / "pytorch_model").is_dir()  # a DeepSpeed ZeRO checkpoint
    assert (out / "model.safetensors").is_file() and (out / "eval_results.json").is_file()


def test_reports_are_cleaned_and_scored_on_the_training_window(cohort, tmp_path):
    """OCR-style reports (page header, barcode, UUID, noise first; long) are cleaned before training, and the
    references and the copy-nearest baseline are cut to the same token window the model is trained on."""
    import pandas as pd

    script = load_training_script()
    frame = pd.read_csv(cohort)
    header = ("Surgical Pathology Report Page 1 of 3 TCGA-BP-5195-01Z-00-DX1 "
              "25c0b433-5557-4165-922e-2c1eac9c26f0 IIIII Redacted\n")
    tail = " ".join(["Additional gross description of the specimen follows."] * 40)
    frame["report"] = [header + r + "\n" + tail if isinstance(r, str) and r else r for r in frame["report"]]
    noisy = cohort.parent / "manifest_ocr.csv"
    frame.to_csv(noisy, index=False)
    out = tmp_path / "run"
    window_tokens = 24
    script.main(["--manifest", str(noisy), "--output_dir", str(out), *TINY, "--max_train_steps", "2",
                 "--max_report_tokens", str(window_tokens + 1), "--num_beams", "1"])
    results = json.loads((out / "report_results.json").read_text())
    assert results["scored_window_tokens"] == window_tokens
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    predictions = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert predictions
    for row in predictions:
        for text in (row["reference"], row["nearest_train_report"]):
            assert "TCGA-BP" not in text and "25c0b433" not in text and "IIIII" not in text, text
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= window_tokens + 1, text
        assert "Page 1 of 3" not in row["reference"] and "Surgical Pathology Report" not in row["reference"]
        assert "Additional gross description" not in row["reference"]  # the long tail lies past the window
    assert "first 24 tokens" in (out / "report_results.md").read_text()
