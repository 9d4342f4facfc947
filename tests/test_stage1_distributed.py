"""Stage 1 losses over the global batch: 2 gloo processes with batch b each give the loss and the
parameter gradients of 1 process with batch 2b (DDP averaging included), and same-case rows are never
InfoNCE negatives."""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from mstar_hf.modeling.modeling_mstar import symmetric_info_nce
from mstar_hf.presets import mstar_config

B, N, D, T, G = 3, 9, 64, 12, 8  # per-process batch, patches, feature width, tokens, genes


def _model(alignment: float = 0.0):
    from mstar_hf.modeling import MStarModel

    torch.manual_seed(0)
    model = MStarModel(mstar_config("tiny", num_genes=G, vocab_size=50, patch_alignment_loss_weight=alignment))
    model.eval()  # no dropout: both runs must compute the same function
    return model


def _batch(size: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "patch_features": torch.randn(size, N, D, generator=g),
        "input_ids": torch.randint(5, 50, (size, T), generator=g),
        "attention_mask": torch.ones(size, T, dtype=torch.long),
        "rna_bins": torch.randint(0, 5, (size, G), generator=g),
        "cancer_type": torch.tensor([i % 2 for i in range(size)]),
        "case_index": torch.arange(size) // 2 * 7,  # pairs of rows are one patient (two slides)
    }
    # some cases lack a modality, in both halves
    batch["report_present"] = torch.tensor([i % 3 != 1 for i in range(size)])
    batch["rna_present"] = torch.tensor([i % 4 != 2 for i in range(size)])
    return batch


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, init_file: str, out_file: str, alignment: float = 0.0):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _model(alignment)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    full = _batch(B * world)
    local = {k: v[rank * B:(rank + 1) * B] for k, v in full.items()}
    out = ddp(**local, return_loss=True)
    out.loss.backward()
    if rank == 0:
        torch.save({"loss": out.loss.detach(), "contrastive": out.contrastive_loss.detach(),
                    "triplet": out.triplet_loss.detach(), "grads": _grads(model),
                    "patch_alignment": None if out.patch_alignment_loss is None else out.patch_alignment_loss.detach()},
                   out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("alignment", [0.0, 1.0], ids=["paper_losses", "with_patch_alignment"])
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, alignment):
    model = _model(alignment)
    out = model(**_batch(2 * B), return_loss=True)
    out.loss.backward()
    reference = _grads(model)

    init_file = tempfile.mktemp(dir=tmp_path)
    result = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, init_file, result, alignment), nprocs=2, join=True, start_method="spawn")
    got = torch.load(result, weights_only=True)

    assert float(out.triplet_loss.detach()) > 0 and float(out.contrastive_loss.detach()) > 0
    terms = [("loss", out.loss), ("contrastive", out.contrastive_loss), ("triplet", out.triplet_loss)]
    if alignment:
        assert float(out.patch_alignment_loss.detach()) > 0
        terms.append(("patch_alignment", out.patch_alignment_loss))
    else:
        assert out.patch_alignment_loss is None and got["patch_alignment"] is None
    for key, value in terms:
        assert abs(float(got[key]) - float(value)) <= 1e-5, (key, float(got[key]), float(value))
    assert set(got["grads"]) == set(reference)
    worst = max(float((got["grads"][n] - g).abs().max()) for n, g in reference.items())
    print(f"2 processes vs 1: loss {float(got['loss']):.6f} vs {float(out.loss):.6f}, max grad diff {worst:.2e}")
    assert worst <= 1e-5


def test_local_loss_differs_so_the_test_above_can_fail():
    """Each half alone gives another loss: a per-process loss would not pass the equality above."""
    model = _model()
    full = model(**_batch(2 * B), return_loss=True).loss
    half = model(**{k: v[:B] for k, v in _batch(2 * B).items()}, return_loss=True).loss
    assert abs(float(full) - float(half)) > 1e-3


def test_same_case_rows_are_not_negatives():
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    groups = torch.tensor([0, 0, 1, 2])
    loss, logits = symmetric_info_nce(a, b, scale, groups)
    assert torch.isinf(logits[0, 1]) and torch.isinf(logits[1, 0]) and torch.isfinite(logits[0, 0])
    # hand computation: row 0's softmax leaves column 1 out
    raw = scale * a @ b.T
    masked = raw.clone()
    masked[0, 1] = masked[1, 0] = float("-inf")
    target = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(masked, target) + torch.nn.functional.cross_entropy(masked.T, target)) / 2
    assert torch.allclose(loss, expected)
    # a duplicate of slide 0's report on row 1 (the same patient): unmasked it competes with row 0's own
    # positive and raises the loss; masked it does not
    b2 = b.clone()
    b2[1] = b[0]
    assert symmetric_info_nce(a, b2, scale, groups)[0] < symmetric_info_nce(a, b2, scale)[0]
