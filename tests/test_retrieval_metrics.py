"""Recall@k and the type-level retrieval figures, against hand-computed values."""

import pytest
import torch

from mstar_hf.evaluation.retrieval import recall_at_k, retrieval_table


def test_recall_at_k_and_type_level_figures():
    # 5 items; query i's nearest gallery item: 0->0, 1->0 (same type), 2->3 (same type), 3->3, 4->0 (other type)
    gallery = torch.eye(5)
    query = torch.stack([gallery[0], gallery[0] + 0.5 * gallery[1], gallery[3] + 0.5 * gallery[2], gallery[3],
                         gallery[0] + 0.5 * gallery[4]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    out = recall_at_k(query, gallery, ks=(1, 2), labels=labels)
    assert out["n"] == 5 and out["R@1"] == pytest.approx(2 / 5) and out["R@2"] == pytest.approx(1.0)
    assert out["chance@1"] == pytest.approx(1 / 5) and out["chance@2"] == pytest.approx(2 / 5)
    assert out["type_R@1"] == pytest.approx(4 / 5)
    # share of same-type gallery items per query: 2/5, 2/5, 3/5, 3/5, 3/5
    assert out["type_chance@1"] == pytest.approx((2 + 2 + 3 + 3 + 3) / 25)
    # knowing only the type: 1 / (items of the query's type), averaged: (1/2 + 1/2 + 3 * 1/3) / 5
    assert out["type_only_R@1"] == pytest.approx(2 / 5)
    assert "| 5 |" in retrieval_table({"slide->report": out})


def test_recall_at_k_needs_paired_embeddings():
    with pytest.raises(ValueError, match="paired, non-empty"):
        recall_at_k(torch.eye(3), torch.eye(4))
