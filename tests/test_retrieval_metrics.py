"""Recall@k and the type-level retrieval figures, against hand-computed values."""

import pytest
import torch

from mstar_hf.evaluation.retrieval import case_recall_at_k, recall_at_k, retrieval_table


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


def test_case_level_recall_counts_patients_once():
    # 3 cases; case A has 3 slides sharing one report (gallery rows 0-2 are the same report), B and C one each.
    # Slide embeddings: A's slides point at the report of A, except slide 2, which is nearer to B's report.
    a, b, c = torch.eye(3)
    gallery = torch.stack([a, a, a, b, c])
    query = torch.nn.functional.normalize(torch.stack([a, a + 0.1 * b, b + 0.4 * a, b, c]), dim=-1)
    cases = ["A", "A", "A", "B", "C"]
    # slide level: slide 2 scores B's report (0.93) above its own (0.37): the one miss at 1
    masked = recall_at_k(query, gallery, ks=(1, 2), case_ids=cases)
    assert masked["R@1"] == pytest.approx(4 / 5) and masked["R@2"] == pytest.approx(1.0)
    # case level: A's query is the mean of its 3 slides (a-heavy) -> hit; B, C hit: 3 / 3 at R@1, n = 3 cases
    out = case_recall_at_k(query, gallery, cases, ks=(1, 2), labels=torch.tensor([0, 0, 0, 1, 0]))
    assert out["n"] == 3 and out["n_rows"] == 5 and out["R@1"] == pytest.approx(1.0)
    assert out["chance@1"] == pytest.approx(1 / 3)
    # per-case labels from the first row: A=0, B=1, C=0 -> type-only expectation (1/2 + 1 + 1/2) / 3
    assert out["type_only_R@1"] == pytest.approx(2 / 3)
    # a case-level miss: swap so that A's mean points at B
    query2 = torch.nn.functional.normalize(torch.stack([b, b, a, b, c]), dim=-1)
    out2 = case_recall_at_k(query2, gallery, cases, ks=(1,))
    assert out2["R@1"] == pytest.approx(2 / 3)
    # the mask matters when a same-case row scores above the true row: slide 0's own row (a + 0.5 c) scores
    # 0.894, below rows 1 and 2 of its own case (1.0): a miss without case ids, a hit with them
    query3 = torch.nn.functional.normalize(torch.stack([a, a, a, b, c]), dim=-1)
    gallery3 = torch.nn.functional.normalize(torch.stack([a + 0.5 * c, a, a, b, c]), dim=-1)
    assert recall_at_k(query3, gallery3, ks=(1,))["R@1"] == pytest.approx(4 / 5)
    assert recall_at_k(query3, gallery3, ks=(1,), case_ids=cases)["R@1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="case of each of the 5 rows"):
        recall_at_k(query, gallery, case_ids=cases[:4])
