"""Report generation over processes and accumulation: the training step's loss is the mean over every label
token of the global batch, so 2 gloo processes x 2 accumulated micro-batches train as 1 process with the
whole batch (reports of very different lengths included), and the old per-micro-batch mean does not."""

import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_generation_fixtures import FEATURE_DIM, tiny_report_config  # noqa: E402

LENGTHS = [3, 14, 5, 22, 7, 2, 17, 9]  # label tokens of the 8 reports of one global batch
PATCHES, VOCAB, STEPS = 10, 64, 2


def _items():
    g = torch.Generator().manual_seed(0)
    items = []
    for length in LENGTHS:
        items.append({"patch_features": torch.randn(PATCHES, FEATURE_DIM, generator=g),
                      "labels": torch.randint(3, VOCAB, (length,), generator=g)})
    return items


def _batch(items) -> dict:
    width = max(len(it["labels"]) for it in items)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for i, it in enumerate(items):
        labels[i, :len(it["labels"])] = it["labels"]
    return {"patch_features": torch.stack([it["patch_features"] for it in items]),
            "patch_attention_mask": torch.ones(len(items), PATCHES, dtype=torch.long), "labels": labels,
            "case_id": [f"C{i}" for i in range(len(items))]}


def _run(rank: int, world: int, port: int, cycle: int, out_file: str, per_micro_batch_mean: bool = False):
    """STEPS optimizer steps on the 8 reports: this rank's share, in `cycle` micro-batches."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="1")
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from mstar_hf import MStarForReportGeneration
    from mstar_hf.training_utils.loop import TrainingLoop, build_scheduler
    from mstar_hf.training_utils.report_generation import token_mean_step

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=cycle)
    assert accelerator.num_processes == world
    torch.manual_seed(0)
    model = MStarForReportGeneration(tiny_report_config()).eval()  # no dropout: the runs compute one function
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # linear in the gradients
    scheduler = build_scheduler("constant", optimizer, 0, STEPS, world)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    args = SimpleNamespace(output_dir=os.path.dirname(out_file), checkpointing_steps=None, resume_from_checkpoint=None,
                           max_grad_norm=0.0, logging_steps=1, with_tracking=False, quiet=True)
    loop = TrainingLoop(accelerator, args, "unit", max_train_steps=STEPS, updates_per_epoch=STEPS)
    items = _items()
    size = len(items) // (world * cycle)  # micro-batch j of rank r: the j-th block of `world` blocks, r-th one
    window = [_batch(items[(j * world + rank) * size:(j * world + rank + 1) * size]) for j in range(cycle)]
    logged = []
    for _ in range(STEPS):
        if per_micro_batch_mean:  # what the loop did before: each micro-batch's own token mean
            for batch in window:
                with accelerator.accumulate(model):
                    loss = model(**{k: v for k, v in batch.items() if k != "case_id"}).loss
                    loop.backward_and_step(model, optimizer, scheduler, loss)
        else:
            loss = token_mean_step(accelerator, model, optimizer, scheduler, loop, window)
        assert loop.end_step(loss=loss)
        logged.append(loop.last["loss"])
    if rank == 0:
        weights = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
        torch.save({"logged": torch.tensor(logged), "weights": weights}, out_file)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group


def _launch(tmp_path, name: str, world: int, cycle: int, per_micro_batch_mean: bool = False) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_file = str(tmp_path / f"{name}.pt")
    mp.start_processes(_run, args=(world, port, cycle, out_file, per_micro_batch_mean), nprocs=world, join=True,
                       start_method="spawn")
    return torch.load(out_file, weights_only=True)


def _worst(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report_dist")
    return {
        "whole": _launch(tmp, "whole", 1, 1),  # the reference: one process, the 8 reports in one batch
        "accumulated": _launch(tmp, "accumulated", 1, 2),
        "two_processes": _launch(tmp, "two_processes", 2, 2),
        "old_mean": _launch(tmp, "old_mean", 1, 2, per_micro_batch_mean=True),
    }


def test_processes_and_accumulation_train_as_the_whole_batch(runs):
    whole = runs["whole"]
    for name in ("accumulated", "two_processes"):
        got = runs[name]
        torch.testing.assert_close(got["logged"], whole["logged"], rtol=1e-5, atol=1e-6)
        worst = _worst(got["weights"], whole["weights"])
        print(f"{name}: logged losses {got['logged'].tolist()} vs {whole['logged'].tolist()}, max weight diff {worst:.2e}")
        assert worst <= 1e-5, name


def test_the_per_micro_batch_mean_differs_so_the_test_above_can_fail(runs):
    worst = _worst(runs["old_mean"]["weights"], runs["whole"]["weights"])
    print(f"per-micro-batch mean vs the whole batch: max weight diff {worst:.2e}")
    assert worst > 1e-3
