"""Cross-modal retrieval metrics (Recall@k) on paired embeddings."""

import numpy as np
import torch


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, ks=(1, 5, 10), labels: torch.Tensor | None = None) -> dict:
    """Recall@k of retrieving row i of `gallery` for row i of `query` (L2-normalised `[n, P]` each).

    Returns `{"R@k": ..., "chance@k": k/n, "n": n}`; with `labels` (e.g. cancer types) also
    `"type_R@1"`: the top-1 item has the query's label (chance: the share of gallery items with the
    query's label, averaged over queries) and `"type_only_R@1"`: the instance R@1 expected of a
    retriever that knows every label and nothing else (the mean of 1 / items with the query's label).
    Instance recall is bounded by how distinguishable cases are: when modalities share only the
    cancer type, same-type cases are interchangeable and R@1 is expected near `type_only_R@1`, which
    is why the type-level figure is reported beside it.
    """
    n = query.shape[0]
    if n == 0 or gallery.shape[0] != n:
        raise ValueError(f"recall_at_k needs paired, non-empty embeddings; got {query.shape[0]} and {gallery.shape[0]}.")
    sim = query.float() @ gallery.float().T
    # rank of the true item: how many gallery items score strictly higher
    true = sim.diagonal()[:, None]
    rank = (sim > true).sum(dim=1)
    out = {"n": n}
    for k in ks:
        out[f"R@{k}"] = float((rank < k).float().mean())
        out[f"chance@{k}"] = min(1.0, k / n)
    if labels is not None:
        labels = labels.cpu()
        top1 = sim.argmax(dim=1).cpu()
        out["type_R@1"] = float((labels[top1] == labels).float().mean())
        same = (labels[:, None] == labels[None, :]).float()
        out["type_chance@1"] = float(same.mean())
        out["type_only_R@1"] = float((1.0 / same.sum(dim=1)).mean())
    return out


def retrieval_table(results: dict) -> str:
    """A markdown table of {direction: recall_at_k(...)}."""
    ks = sorted({int(k[2:]) for r in results.values() for k in r if k.startswith("R@")})
    header = "| direction | n | " + " | ".join(f"R@{k} (chance)" for k in ks) + " | type R@1 (chance) |"
    lines = [header, "|" + "---|" * (len(ks) + 3)]
    for name, r in results.items():
        cells = " | ".join(f"{r[f'R@{k}']:.3f} ({r[f'chance@{k}']:.3f})" for k in ks)
        type_cell = f"{r['type_R@1']:.3f} ({r['type_chance@1']:.3f})" if "type_R@1" in r else "-"
        lines.append(f"| {name} | {r['n']} | {cells} | {type_cell} |")
    return "\n".join(lines)


__all__ = ["recall_at_k", "retrieval_table"]
