"""Cross-modal retrieval metrics (Recall@k) on paired embeddings, per slide and per case (patient).

With several slides per case, the report and RNA of a case are the same for all its slides: at slide
level another slide's row of the same case is not a wrong answer (`case_ids` keeps it out of the
ranking, as the Stage 1 loss keeps it out of the negatives), and at case level (`case_recall_at_k`) each
patient counts once, however many slides it has.
"""

import torch


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, ks=(1, 5, 10), labels: torch.Tensor | None = None,
                case_ids=None) -> dict:
    """Recall@k of retrieving row i of `gallery` for row i of `query` (L2-normalised `[n, P]` each).

    `case_ids` (one per row): gallery rows of the query's own case other than row i are left out of its
    ranking (they hold the same patient's report / RNA / slide), so only other cases compete.

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
        raise ValueError(f"recall_at_k needs paired, non-empty embeddings; got {query.shape[0]} and "
                         f"{gallery.shape[0]}.")
    sim = query.float() @ gallery.float().T
    # rank of the true item: how many gallery items (of other cases) score strictly higher
    true = sim.diagonal()[:, None]
    higher = sim > true
    if case_ids is not None:
        codes = _case_codes(case_ids, n).to(sim.device)
        higher &= codes[:, None] != codes[None, :]
    rank = higher.sum(dim=1)
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


def _case_codes(case_ids, n: int) -> torch.Tensor:
    if torch.is_tensor(case_ids):
        case_ids = case_ids.tolist()
    case_ids = [str(c) for c in case_ids]
    if len(case_ids) != n:
        raise ValueError(f"case_ids must give the case of each of the {n} rows, got {len(case_ids)}.")
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(c, len(index)) for c in case_ids])


def case_recall_at_k(query: torch.Tensor, gallery: torch.Tensor, case_ids, ks=(1, 5, 10),
                     labels: torch.Tensor | None = None) -> dict:
    """Recall@k with one row per case: a case's query and gallery embeddings are the mean of its rows'
    (L2-normalised again), so a patient with three slides is one query and one gallery item. Returns the
    keys of `recall_at_k` (`n` = cases) plus `"n_rows"`; `labels` (per row, e.g. cancer type) are taken
    from each case's first row."""
    n = query.shape[0]
    if n == 0 or gallery.shape[0] != n:
        raise ValueError(f"case_recall_at_k needs paired, non-empty embeddings; got {query.shape[0]} and "
                         f"{gallery.shape[0]}.")
    codes = _case_codes(case_ids, n)
    num_cases = int(codes.max()) + 1

    def by_case(x):
        summed = torch.zeros(num_cases, x.shape[1], dtype=torch.float32).index_add_(0, codes, x.float().cpu())
        return torch.nn.functional.normalize(summed, dim=-1)

    case_labels = None
    if labels is not None:
        first = torch.full((num_cases,), n, dtype=torch.long).scatter_reduce_(0, codes, torch.arange(n), "amin")
        case_labels = labels.cpu()[first]
    out = recall_at_k(by_case(query), by_case(gallery), ks=ks, labels=case_labels)
    out["n_rows"] = n
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


__all__ = ["case_recall_at_k", "recall_at_k", "retrieval_table"]
