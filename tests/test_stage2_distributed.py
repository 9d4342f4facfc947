"""Stage 2 over several processes: 2 gloo processes, each training on its own slide, give the losses, the
running target mean, the memory bank and the weights of 1 process training on both slides (DDP averaging,
the all-reduced target mean, the EMA and the memory included), step after step."""

import copy
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mstar_hf.presets import mstar_config

SLIDES, ROWS, PER_SLIDE, STEPS = 2, 24, 6, 2  # slides (one per rank), patches per slide, sampled per step


def _model():
    from mstar_hf.modeling import MStarModel

    torch.manual_seed(0)
    return MStarModel(mstar_config("tiny", num_genes=8, vocab_size=50)).eval()


def _bank(folder, dim):
    from mstar_hf.data.features import write_slide_features
    from mstar_hf.training_utils.memory_bank import PatchMemoryBank, inspect_feature_file

    rng = np.random.default_rng(0)
    slides = []
    for s in range(SLIDES):
        path = os.path.join(folder, f"S{s}.h5")
        write_slide_features(path, rng.normal(s, 1.0, (ROWS, dim)).astype(np.float32), patch_size=224, target_mpp=0.5)
        slides.append(({"slide_id": f"S{s}", "slide_path": f"S{s}.svs", "split": "train"}, inspect_feature_file(path)))
    return PatchMemoryBank.build(os.path.join(folder, "bank"), slides)


def _batches(image_size):
    """STEPS global batches: PER_SLIDE tiles of each slide, slide 0's rows first."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for step in range(STEPS):
        rows = torch.cat([torch.randperm(ROWS, generator=g)[:PER_SLIDE] for _ in range(SLIDES)])
        batches.append({"pixel_values": torch.randn(SLIDES * PER_SLIDE, 3, image_size, image_size, generator=g),
                        "slide": torch.arange(SLIDES).repeat_interleave(PER_SLIDE), "row": rows, "step": step})
    return batches


def _train(folder, rank: int | None, wrap=None) -> dict:
    """STEPS Stage 2 steps on the whole batch (rank None) or on `rank`'s slide; returns what must agree."""
    from mstar_hf.training_utils.ema import EMAModel
    from mstar_hf.training_utils.stage2_step import MemoryTeacher, Stage2Student, stage2_forward

    model = _model()
    bank = _bank(folder, model.aggregator.config.input_dim)
    student = Stage2Student(copy.deepcopy(model.patch_model), copy.deepcopy(model.patch_projection),
                            center_targets=True, center_momentum=0.5)
    ema = EMAModel(student.patch_model, 0.9)
    with torch.no_grad():  # an EMA that differs from the student: the consistency term is not 0 at step 1
        for p in ema.module.parameters():
            p.mul_(1.02)
    teacher = MemoryTeacher(model.aggregator, bank, context_size=4096, seed=0)
    trained = wrap(student) if wrap is not None else student
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)  # linear in the gradients: a fair comparison
    losses = []
    for batch in _batches(model.patch_model.config.img_size):
        if rank is not None:
            keep = batch["slide"] == rank
            batch = {k: v[keep] if torch.is_tensor(v) else v for k, v in batch.items()}
        out = stage2_forward(trained, ema, teacher, batch, "cosine", 0.6)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(student.patch_model)
        losses.append([float(out.loss.detach()), float(out.distill_loss.detach()), float(out.consistency_loss.detach())])
    return {"losses": torch.tensor(losses), "target_mean": student.target_mean.clone(),
            "weights": {n: p.detach().clone() for n, p in student.named_parameters()},
            "ema": {n: p.detach().clone() for n, p in ema.module.state_dict().items()},
            "memory": torch.from_numpy(np.stack([bank.read(s) for s in range(SLIDES)]))}


def _worker(rank: int, world: int, init_file: str, folder: str, out_file: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = _train(os.path.join(folder, f"rank{rank}"), rank, wrap=DistributedDataParallel)
    torch.save(result, out_file.format(rank=rank))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2_dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _train(str(root / "one"), None)
        half = _train(str(root / "half"), 0)  # one process on slide 0 alone: what a per-process step would be
    finally:
        torch.set_num_threads(threads)
    init_file = tempfile.mktemp(dir=root)
    out_file = str(root / "rank{rank}.pt")
    mp.start_processes(_worker, args=(2, init_file, str(root), out_file), nprocs=2, join=True, start_method="spawn")
    two = [torch.load(out_file.format(rank=r), weights_only=True) for r in range(2)]
    yield one, half, two
    shutil.rmtree(root, ignore_errors=True)


def _worst(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_processes_train_as_one_process_with_the_global_batch(runs):
    one, _, two = runs
    assert one["losses"].shape == (STEPS, 3) and float(one["losses"][:, 2].min()) > 0  # consistency is active
    for rank, got in enumerate(two):
        # each rank's loss is its own half's; their mean is the global batch's (equal halves)
        torch.testing.assert_close(got["target_mean"], one["target_mean"], rtol=1e-5, atol=1e-6)
        assert _worst(got["weights"], one["weights"]) <= 1e-5, rank
        assert _worst(got["ema"], one["ema"]) <= 1e-5, rank
        # a rank's memory rows: its own slide's as on one process (the other slide is another rank's)
        torch.testing.assert_close(got["memory"][rank], one["memory"][rank], rtol=1e-5, atol=1e-5)
    mean_loss = (two[0]["losses"] + two[1]["losses"]) / 2
    torch.testing.assert_close(mean_loss, one["losses"], rtol=1e-5, atol=1e-6)
    print("2 processes vs 1: losses", mean_loss.tolist(), "vs", one["losses"].tolist(),
          f"max weight diff {_worst(two[0]['weights'], one['weights']):.2e}")


def test_a_per_process_step_differs_so_the_test_above_can_fail(runs):
    """One process on half the batch ends with another target mean and other weights: a rank that centred on
    its own batch, or averaged nothing, would fail the equality above."""
    one, half, _ = runs
    assert float((half["target_mean"] - one["target_mean"]).abs().max()) > 1e-3
    print(f"half the batch vs all of it: target mean {float((half['target_mean'] - one['target_mean']).abs().max()):.2e}, "
          f"weights {_worst(half['weights'], one['weights']):.2e}")
    assert _worst(half["weights"], one["weights"]) > 1e-4
