"""Stage 2 (self-taught training of the patch encoder): memory bank, EMA, the step, bad input, and
`training/stage2.py` runs (learning, kill + resume, DeepSpeed ZeRO-2) on a tiny synthetic cohort."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "stage2.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # hub_fixtures / hub_server, whatever the import mode

from hub_fixtures import hub_server  # noqa: E402,F401  (pytest fixture: a local Hub)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Synthetic cohort (2 types x 3 cases, 1024 px slides), a tiny Stage 1 model and its features."""
    from mstar_hf.data import make_synthetic_cohort
    from mstar_hf.modeling import MStarImageProcessor, MStarModel
    from mstar_hf.presets import mstar_config
    from mstar_hf.wsi.extraction import extract_features

    root = tmp_path_factory.mktemp("stage2")
    manifest = make_synthetic_cohort(root / "cohort", num_types=2, cases_per_type=3, slide_size=(1024, 1024),
                                     num_genes=40, seed=0)
    torch.manual_seed(0)
    model = MStarModel(mstar_config("tiny", num_genes=40, vocab_size=100)).eval()
    model.save_pretrained(root / "stage1")
    MStarImageProcessor().save_pretrained(root / "stage1")
    frame = pd.read_csv(manifest)
    # 128 px patches: ~40 per slide, so slides have real context and held-out slides real patches
    summary = extract_features([root / "cohort" / p for p in frame.slide_path], root / "cohort" / "features",
                               model.patch_model, MStarImageProcessor(), patch_size=128, num_workers=0, quiet=True,
                               qc=False)
    assert summary["done"] == len(frame), summary
    frame = pd.read_csv(manifest)
    records = [{"slide_id": r.slide_id, "slide_path": str(root / "cohort" / r.slide_path),
                "features_path": str(root / "cohort" / r.features_path), "split": r.split} for r in frame.itertuples()]
    return SimpleNamespace(root=root, manifest=Path(manifest), stage1=root / "stage1", model=model, records=records)


def _bank(env, folder, width=64):
    from mstar_hf.training_utils.memory_bank import PatchMemoryBank
    from mstar_hf.training_utils.stage2_data import prepare_slides

    usable, failures = prepare_slides(env.records, width)
    assert not failures
    return PatchMemoryBank.build(folder, usable)


def _load_script():
    """The body of `training/stage2.py` (the package module its thin wrapper calls)."""
    from mstar_hf.training_utils import stage2

    return stage2


# -- units -------------------------------------------------------------------------------------------
def test_memory_bank_build_write_restore(env, tmp_path):
    from mstar_hf.training_utils.memory_bank import PatchMemoryBank, bytes_per_patch

    bank = _bank(env, tmp_path / "bank")
    assert len(bank) == len(env.records) and bank.dim == 64
    for i, rec in enumerate(env.records):
        with h5py.File(rec["features_path"]) as f:
            np.testing.assert_array_equal(bank.read(i), f["features"][()])
            np.testing.assert_array_equal(bank.coords(i), f["coords"][()])
    assert bank.slides[0].patch_size == 128 and bank.slides[0].target_mpp == pytest.approx(0.5)
    # the file on disk is the memory: a fresh handle sees a write, a checkpoint copy keeps it
    bank.write(1, [0, 2], np.ones((2, 64), np.float32))
    ckpt = bank.save_to(tmp_path / "ckpt" / "memory")
    bank.write(1, [0], np.zeros((1, 64), np.float32))
    np.testing.assert_array_equal(PatchMemoryBank(bank.folder, writable=False).read(1, [0, 2]),
                                  [np.zeros(64), np.ones(64)])
    restored = PatchMemoryBank.restore(ckpt, tmp_path / "bank")
    np.testing.assert_array_equal(restored.read(1, [0, 2]), np.ones((2, 64)))
    assert bytes_per_patch(1024) * 10_000 / 2**20 == pytest.approx(39.21, abs=0.01)
    assert bank.nbytes == bank.num_rows * bytes_per_patch(64)


def test_context_rows_keep_sampled_and_order():
    from mstar_hf.training_utils.stage2_step import context_rows

    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(context_rows(10, np.array([3]), 16, rng), np.arange(10))
    sampled = np.array([5, 999, 42])
    ctx = context_rows(1000, sampled, 64, rng)
    assert len(ctx) == 64 and np.all(np.diff(ctx) > 0) and set(sampled) <= set(ctx.tolist())


def test_ema_update_is_a_moving_average():
    from mstar_hf.training_utils.ema import EMAModel

    student = torch.nn.Linear(3, 2)
    ema = EMAModel(student, momentum=0.9)
    before = ema.module.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.update(student)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * student.weight)
    assert not ema.module.weight.requires_grad


def test_augment_is_seeded_and_keeps_grey():
    from mstar_hf.training_utils.augment import HEAugment

    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    aug = HEAugment(color_jitter=0.1, hue_jitter=0.05)
    a = aug(image, torch.Generator().manual_seed(3))
    b = aug(image, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == image.shape and torch.equal(a, b)
    grey = torch.full((3, 8, 8), 120, dtype=torch.uint8)  # hue and saturation leave grey alone
    assert HEAugment(flips=False, rotate90=False, color_jitter=0, hue_jitter=0.3)(grey, torch.Generator()).unique().tolist() == [120]


def test_step_writes_ema_features_to_sampled_rows_only(env, tmp_path):
    """After a step, a slide's memory holds the EMA features of the sampled tiles at their rows and is
    unchanged elsewhere; the targets are the aggregator's re-embedding of the updated memory."""
    from mstar_hf.modeling import MStarImageProcessor
    from mstar_hf.training_utils.ema import EMAModel
    from mstar_hf.training_utils.stage2_step import MemoryTeacher, Stage2Student, stage2_forward
    from mstar_hf.training_utils.stage2_data import Stage2StepDataset
    from mstar_hf.wsi.extraction import PatchTransform

    bank = _bank(env, tmp_path / "bank")
    model = env.model
    student = Stage2Student(model.patch_model, model.patch_projection)
    ema = EMAModel(model.patch_model, 0.99)
    with torch.no_grad():  # make the EMA differ from the Stage 1 encoder the memory came from
        for p in ema.module.parameters():
            p.mul_(1.05)
    teacher = MemoryTeacher(model.aggregator, bank, context_size=4096)
    dataset = Stage2StepDataset(bank.folder, bank.slides, [0, 3], slides_per_step=2, patches_per_slide=5,
                                num_items=1, transform=PatchTransform(MStarImageProcessor()), augment=None)
    batch = dataset[0]
    before = {i: bank.read(i) for i in range(len(bank))}
    out = stage2_forward(student, ema, teacher, batch, "cosine", 0.6)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.patch_projection.weight.grad is not None
    with torch.no_grad():
        expected = ema.module(pixel_values=batch["pixel_values"]).pooler_output
    for s in range(len(bank)):
        sel = (batch["slide"] == s).numpy()
        rows = batch["row"].numpy()[sel]
        after = bank.read(s)
        untouched = np.setdiff1d(np.arange(bank.slides[s].count), rows)
        np.testing.assert_array_equal(after[untouched], before[s][untouched])
        if s in (0, 3):
            assert len(rows) == 5
            np.testing.assert_allclose(after[rows], expected[torch.from_numpy(sel)].numpy(), rtol=1e-5, atol=1e-5)
            assert not np.allclose(after[rows], before[s][rows])
            with torch.no_grad():  # every row fits in the context: the target is the whole-slide re-embedding
                whole = model.aggregator(torch.from_numpy(after)[None]).patch_embeds[0, torch.from_numpy(rows)]
            torch.testing.assert_close(out.targets[torch.from_numpy(sel)], whole, rtol=1e-4, atol=1e-5)
        else:
            assert len(rows) == 0


def test_step_items_are_reproducible_and_skip_slides_that_break(env, tmp_path):
    """Items are a function of (seed, step, rank) only (what resume relies on); a slide that cannot be
    read during training is reported once per item and others are drawn instead."""
    import dataclasses

    from mstar_hf.modeling import MStarImageProcessor
    from mstar_hf.training_utils.augment import HEAugment
    from mstar_hf.training_utils.stage2_data import Stage2StepDataset
    from mstar_hf.wsi.extraction import PatchTransform

    bank = _bank(env, tmp_path / "bank")
    slides = list(bank.slides)
    slides[0] = dataclasses.replace(slides[0], slide_path=str(tmp_path / "gone.tiff"))

    def dataset():
        return Stage2StepDataset(bank.folder, slides, [0, 1, 2], slides_per_step=2, patches_per_slide=3, num_items=6,
                                 transform=PatchTransform(MStarImageProcessor()), augment=HEAugment(), seed=5)

    first, second = dataset(), dataset()
    items = [first[i] for i in range(6)]
    for item in items:
        assert sorted(set(item["slide"].tolist())) == [1, 2] and item["pixel_values"].shape == (6, 3, 224, 224)
    failed = [reason for item in items for _, reason in item["failed"]]
    assert len(failed) == 1 and "gone.tiff" in failed[0]  # remembered: not retried
    again = second[4]
    assert torch.equal(again["pixel_values"], items[4]["pixel_values"]) and torch.equal(again["row"], items[4]["row"])


def test_distillation_losses():
    from mstar_hf.training_utils.stage2_step import consistency_loss, distillation_loss

    a = torch.randn(4, 8)
    assert float(distillation_loss(a, 2 * a, "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(a, a, "smooth_l1")) == 0.0
    assert float(distillation_loss(a, -a, "cosine")) == pytest.approx(2.0)
    assert float(consistency_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="--loss"):
        distillation_loss(a, a, "l2")


# -- bad input ---------------------------------------------------------------------------------------
def test_bad_slides_are_skipped_with_errors_naming_files(env, tmp_path):
    from mstar_hf.training_utils.memory_bank import MemoryBankError, inspect_feature_file
    from mstar_hf.training_utils.stage2_data import Stage2InputError, check_slide_coords, prepare_slides
    from mstar_hf.wsi.features import write_features

    good = env.records[0]
    with h5py.File(good["features_path"]) as f:
        coords, feats = f["coords"][()], f["features"][()]
        attrs = dict(f.attrs)
    outside = tmp_path / "outside.h5"
    write_features(outside, coords + 5000, feats, attrs)
    mismatch = tmp_path / "mismatch.h5"
    with h5py.File(mismatch, "w") as f:
        f["coords"], f["features"] = coords, feats[:-1]
        f.attrs.update(attrs)
    wide = tmp_path / "wide.h5"
    write_features(wide, coords, np.zeros((len(coords), 32), np.float32), attrs)
    records = [
        {**good, "slide_id": "missing", "slide_path": str(tmp_path / "nope.tiff")},
        {**good, "slide_id": "outside", "features_path": str(outside)},
        {**good, "slide_id": "mismatch", "features_path": str(mismatch)},
        {**good, "slide_id": "wide", "features_path": str(wide)},
        good,
    ]
    usable, failures = prepare_slides(records, expected_dim=64)
    assert [r["slide_id"] for r, _ in usable] == [good["slide_id"]]
    reasons = {row["reason"] for row in failures}
    assert len(failures) == 4
    assert any(str(tmp_path / "nope.tiff") in r and "not found" in r for r in reasons)
    assert any(str(outside) in r and "outside the slide" in r for r in reasons)
    assert any(str(mismatch) in r and "do not match" in r for r in reasons)
    assert any(str(wide) in r and "32-d" in r for r in reasons)
    with pytest.raises(MemoryBankError, match="mismatch.h5.*rows of 'features'"):
        inspect_feature_file(mismatch)
    with pytest.raises(Stage2InputError, match="outside.h5"):
        check_slide_coords(good["slide_path"], inspect_feature_file(outside), (1024, 1024))


def test_stage1_checkpoint_with_mismatched_widths_is_refused(env, tmp_path):
    bad = tmp_path / "bad_stage1"
    shutil.copytree(env.stage1, bad)
    config = json.loads((bad / "config.json").read_text())
    config["aggregator_config"]["input_dim"] = 48
    (bad / "config.json").write_text(json.dumps(config))
    script = _load_script()
    with pytest.raises(ValueError, match=r"bad_stage1/config.json.*48-d.*64-d"):
        script.load_stage1(str(bad))


# -- the training script -----------------------------------------------------------------------------
def _args(env, out, steps, extra=()):
    return [
        "--stage1_model", str(env.stage1), "--manifest", str(env.run_manifest), "--output_dir", str(out),
        "--max_train_steps", str(steps), "--slides_per_step", "2", "--per_device_train_batch_size", "16",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--dataloader_num_workers", "2",
        "--quiet", "--with_tracking", "false", "--skip_bad_cases", "true", *extra,
    ]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _losses(out):
    return {r["step"]: r for r in map(json.loads, (Path(out) / "loss_log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def run_manifest(env):
    """The cohort manifest plus a slide whose file is missing (the script must skip and record it)."""
    frame = pd.read_csv(env.manifest)
    extra = frame.iloc[[0]].copy()
    extra["case_id"], extra["slide_id"] = "SYN-9999", "SYN-9999-01"
    extra["slide_path"] = "slides/SYN-9999-01.tiff"
    path = env.manifest.parent / "manifest_stage2.csv"
    pd.concat([frame, extra]).to_csv(path, index=False)
    env.run_manifest = path
    return path


@pytest.fixture(scope="module")
def plain_run(env, run_manifest):
    out = env.root / "run_plain"
    # from the Stage 1 model's random projection (the default, said explicitly): the losses and the cosine
    # must show learning
    proc = _run([sys.executable, str(SCRIPT), *_args(env, out, 12, ["--checkpointing_steps", "4",
                                                                   "--init_projection", "stage1"])])
    return SimpleNamespace(out=out, stdout=proc.stdout + proc.stderr)


def test_training_learns_and_saves_models(env, plain_run):
    from safetensors.torch import load_file
    from transformers import AutoModel

    import mstar_hf  # noqa: F401  (registers the Auto classes)

    out = plain_run.out
    losses = [r["loss"] for r in _losses(out).values()]
    distill = [r["distill_loss"] for r in _losses(out).values()]
    assert len(losses) == 12
    print(f"stage 2 loss: first {losses[:3]} last {losses[-3:]}")
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert np.mean(distill[-3:]) < 0.5 * np.mean(distill[:3])

    results = json.loads((out / "stage2_results.json").read_text())
    before, after = results["heldout_cosine_before"], results["heldout_cosine_after"]
    print(f"held-out student-teacher cosine: before {before:.4f}, after {after:.4f}")
    assert "held-out student-teacher cosine: before" in plain_run.stdout
    assert after > before + 0.2 and results["heldout_patches"] > 50
    evals = json.loads((out / "eval_results.json").read_text())
    assert [e["value"] for e in evals] == pytest.approx([before, after])

    # the missing slide was skipped and recorded, naming the file
    with open(out / "failures.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["slide"].endswith("SYN-9999-01.tiff") and "SYN-9999-01.tiff" in rows[0]["reason"]

    # EMA weights differ from the student's and from the initial ones
    ema = load_file(out / "checkpoint-12" / "stage2" / "ema.safetensors")
    patch = AutoModel.from_pretrained(out / "patch_encoder")
    student = patch.state_dict()
    initial = env.model.patch_model.state_dict()
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.allclose(ema[key], student[key]) and not torch.allclose(ema[key], initial[key])
    assert not torch.allclose(student[key], initial[key])
    moved_ema = (ema[key] - initial[key]).norm()
    assert 0 < moved_ema < (student[key] - initial[key]).norm()  # the EMA lags the student

    # the MStarModel carries the new encoder and projection; its aggregator is the frozen Stage 1 one
    mstar = AutoModel.from_pretrained(out / "mstar_model")
    torch.testing.assert_close(mstar.patch_model.state_dict()[key], student[key])
    torch.testing.assert_close(mstar.aggregator.state_dict()["cls_token"], env.model.aggregator.state_dict()["cls_token"])
    assert not torch.allclose(mstar.patch_projection.weight, env.model.patch_projection.weight)
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "patch_encoder" / "preprocessor_config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoint-4" / "stage2" / "memory").iterdir()) == [
        "coords.npy", "memory.npy", "memory_index.json"]


def test_resume_after_kill_gives_the_same_losses(env, plain_run):
    out = env.root / "run_killed"
    cmd = [sys.executable, str(SCRIPT), *_args(env, out, 12, ["--checkpointing_steps", "4", "--max_eval_patches", "0",
                                                           "--init_projection", "stage1"])]  # as plain_run
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint-4").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the run's own process group (its reader workers too)
    finally:
        proc.wait()
    assert not (out / "patch_encoder").exists(), "the run finished before the kill"
    killed_at = max(_losses(out))
    _run(cmd + ["--resume_from_checkpoint", "latest"])
    resumed, reference = _losses(out), _losses(plain_run.out)
    assert sorted(resumed) == list(range(1, 13))
    print(f"killed after step {killed_at}; resumed losses from step 5: {[round(resumed[s]['loss'], 6) for s in range(5, 8)]}")
    for step in range(1, 13):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-7), step


def test_deepspeed_zero2_engine_resume_and_push(env, run_manifest, hub_server):
    out = env.root / "run_ds"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
              "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(SCRIPT), *_args(env, out, 4, ["--checkpointing_steps", "2", "--max_eval_patches", "0"])]
    _run(launch)
    info = json.loads((out / "run_info.json").read_text())
    assert info["engine"] == "deepspeed.runtime.engine.DeepSpeedEngine" and info["is_deepspeed_engine"]
    assert info["zero_stage"] == 2
    ckpt = out / "checkpoint-2"
    assert (ckpt / "pytorch_model").is_dir() and (ckpt / "stage2" / "ema.safetensors").is_file()
    first = _losses(out)
    # resume from step 2 in place: the working memory is at step 4 and must be restored from the checkpoint
    user = hub_server.user
    _run(launch + ["--resume_from_checkpoint", str(ckpt), "--push_to_hub", "--hub_model_id", f"{user}/stage2-patch",
                   "--hub_mstar_model_id", f"{user}/stage2-mstar"], env=hub_server.env)
    second = _losses(out)
    assert sorted(second) == [1, 2, 3, 4]
    for step in (3, 4):
        assert second[step]["loss"] == pytest.approx(first[step]["loss"], rel=1e-6), step
    # both final folders reached the (local) Hub, with a model card
    pushed = hub_server.files(f"{user}/stage2-patch")
    assert json.loads(pushed["config.json"])["model_type"] == "mstar_patch"
    assert {"model.safetensors", "preprocessor_config.json", "README.md"} <= set(pushed)
    assert json.loads(hub_server.files(f"{user}/stage2-mstar")["config.json"])["model_type"] == "mstar"


def test_a_bad_slide_stops_the_run_before_step_1_unless_skipped(env, run_manifest, tmp_path):
    args = _args(env, tmp_path / "run", 2)
    at = args.index("--skip_bad_cases")
    del args[at:at + 2]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "1 bad slide(s), nothing was trained" in proc.stderr and "SYN-9999-01.tiff: file not found" in proc.stderr
    assert not (tmp_path / "run" / "loss_log.jsonl").exists()


def test_in_process_run_gives_the_caller_its_thread_count_back(env, run_manifest, tmp_path):
    """The run sizes torch's threads for its readers; the demo calls it in-process and must get its own back
    (it once ran the report generator and the evaluation on one of two cores)."""
    from mstar_hf.training_utils import stage2

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert stage2.main(_args(env, tmp_path / "run", 1)) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert (tmp_path / "run" / "patch_encoder" / "config.json").is_file()


def test_stain_jitter_changes_stain_not_layout():
    """H&E stain jitter: identity at scale 1 / shift 0; seeded; moves tissue colour while white stays near white."""
    from mstar_hf.training_utils.augment import HEAugment, stain_jitter

    g = torch.Generator().manual_seed(0)
    image = torch.randint(1, 256, (3, 16, 16), generator=g).float()
    torch.testing.assert_close(stain_jitter(image.flatten(1), torch.ones(3), torch.zeros(3)).view_as(image), image,
                               atol=1e-3, rtol=1e-4)
    tissue = torch.tensor([150.0, 80.0, 160.0])[:, None, None].expand(3, 8, 8).clone()
    tile = torch.cat([tissue, torch.full((3, 8, 8), 250.0)], dim=2).to(torch.uint8)  # left: purple, right: white
    aug = HEAugment(flips=False, rotate90=False, color_jitter=0, hue_jitter=0, stain_jitter=0.3)
    a, b = aug(tile, torch.Generator().manual_seed(4)), aug(tile, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and torch.equal(a, b)
    moved = [(aug(tile, torch.Generator().manual_seed(s)).float() - tile.float())[:, :, :8].abs().mean() for s in range(5)]
    assert max(moved) > 5  # the stained half changes colour ...
    white = [(aug(tile, torch.Generator().manual_seed(s)).float() - tile.float())[:, :, 8:].abs().max() for s in range(5)]
    assert max(white) < max(moved)  # ... more than the background does
    plain = HEAugment(color_jitter=0.1, hue_jitter=0.05)  # off: the same draws (and tiles) as without the option
    assert torch.equal(plain(tile, torch.Generator().manual_seed(2)),
                       HEAugment(color_jitter=0.1, hue_jitter=0.05, stain_jitter=0.0)(tile, torch.Generator().manual_seed(2)))


def test_projection_fit_recovers_a_linear_teacher(env, tmp_path):
    """`fit_projection_to_teacher` solves the ridge regression of the teacher's targets on the memory's rows."""
    from mstar_hf.training_utils.stage2_step import fit_projection_to_teacher

    bank = _bank(env, tmp_path / "bank")
    torch.manual_seed(0)
    A, b = torch.randn(bank.dim, 8), torch.randn(8)

    class LinearTeacher(torch.nn.Module):  # patch_embeds = x A + b: a ridge fit must find A and b
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, attention_mask=None):
            return SimpleNamespace(patch_embeds=x @ A + b)

    projection = torch.nn.Linear(bank.dim, 8)
    fit = fit_projection_to_teacher(projection, LinearTeacher(), bank, range(len(bank)), ridge=1e-8)
    assert fit["patches"] == bank.num_rows and fit["r2"] == pytest.approx(1.0, abs=1e-5)
    x = torch.from_numpy(bank.read(0))
    torch.testing.assert_close(projection(x), x @ A + b, atol=1e-3, rtol=1e-3)
    # a real aggregator is not linear in its input: the fit explains part of it, as reported
    again = fit_projection_to_teacher(torch.nn.Linear(bank.dim, env.model.aggregator.config.hidden_size),
                                      env.model.aggregator, bank, range(len(bank)))
    assert 0.0 < again["r2"] < 1.0


def test_ridge_start_begins_close_to_the_teacher(env, plain_run, tmp_path):
    """`--init_projection ridge` is recorded and begins far closer to the teacher than the random
    projection of the Stage 1 model."""
    out = tmp_path / "ridge"
    _run([sys.executable, str(SCRIPT), *_args(env, out, 2, ["--init_projection", "ridge"])])
    info = json.loads((out / "run_info.json").read_text())
    assert info["projection_init"] == "ridge" and 0.0 < info["projection_fit"]["r2"] < 1.0
    ridge = json.loads((out / "stage2_results.json").read_text())["heldout_cosine_before"]
    random = json.loads((plain_run.out / "stage2_results.json").read_text())["heldout_cosine_before"]
    assert ridge > random + 0.3, (ridge, random)


def test_centred_targets_regress_what_differs_between_patches():
    """`center_targets`: the running mean of the teacher targets is subtracted from both sides of the loss."""
    from mstar_hf.training_utils.stage2_step import Stage2Student, distillation_loss

    student = Stage2Student(torch.nn.Identity(), torch.nn.Linear(4, 3), center_targets=True, center_momentum=0.5)
    t1, t2 = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(student.update_target_mean(t1), t1.mean(0))  # the first batch sets it
    torch.testing.assert_close(student.update_target_mean(t2), 0.5 * t1.mean(0) + 0.5 * t2.mean(0))
    assert int(student.target_mean_steps) == 2 and "target_mean" in student.state_dict()  # saved with checkpoints
    # a prediction that is the mean target plus noise: plain cosine looks good, the centred one does not
    shared = torch.tensor([10.0, 0.0, 0.0])
    targets = shared + torch.randn(64, 3)
    pred = shared + torch.randn(64, 3)
    assert float(distillation_loss(pred, targets, "cosine")) < 0.1
    assert float(distillation_loss(pred - targets.mean(0), targets - targets.mean(0), "cosine")) > 0.5
    # smooth-L1 regresses the difference, which centring leaves as it is: the flag only changes a cosine
    m = targets.mean(0)
    assert float(distillation_loss(pred - m, targets - m, "smooth_l1")) == pytest.approx(
        float(distillation_loss(pred, targets, "smooth_l1")), rel=1e-5)


def test_teacher_target_picks_the_aggregators_tokens(env, tmp_path):
    """`teacher_target`: the memory teacher returns the chosen stage of the whole-slide re-embedding; an unknown
    name is refused with the choices."""
    from mstar_hf.training_utils.stage2_step import TEACHER_TARGETS, MemoryTeacher

    bank = _bank(env, tmp_path / "bank")
    aggregator = env.model.aggregator
    slide, row = torch.tensor([0, 0, 2]), torch.tensor([0, 5, 3])
    with torch.no_grad():
        stages = {s: aggregator(torch.from_numpy(bank.read(s))[None], output_hidden_states=True) for s in (0, 2)}
    got = {}
    for name, index in TEACHER_TARGETS.items():
        got[name] = MemoryTeacher(aggregator, bank, target=name).targets(slide, row, 0, "cpu")
        for i, (s, r) in enumerate(zip(slide.tolist(), row.tolist())):
            out = stages[s]
            want = out.patch_embeds[0, r] if index is None else out.hidden_states[index][0, r]
            torch.testing.assert_close(got[name][i], want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got["final"], got["pre_norm"]) and not torch.allclose(got["pre_norm"], got["first_layer"])
    with pytest.raises(ValueError, match="unknown teacher target 'last'.*final, pre_norm, first_layer"):
        MemoryTeacher(aggregator, bank, target="last")


def test_teacher_target_is_trained_on_and_recorded(env, run_manifest, tmp_path):
    """`--teacher_target pre_norm` runs end to end: the ridge start is fitted to, and evaluated on, the same target
    (so it begins close to it), and the results and training args record it; a bad value stops the parser."""
    from mstar_hf.training_utils import stage2

    out = tmp_path / "pre_norm"
    assert stage2.main(_args(env, out, 2, ["--init_projection", "ridge", "--teacher_target", "pre_norm"])) == 0
    results = json.loads((out / "stage2_results.json").read_text())
    assert results["teacher_target"] == "pre_norm" and results["heldout_cosine_before"] > 0.5, results
    assert json.loads((out / "patch_encoder" / "training_args.json").read_text())["teacher_target"] == "pre_norm"
    with pytest.raises(SystemExit):
        stage2.parse_args(_args(env, tmp_path / "bad", 2, ["--teacher_target", "last"]))
