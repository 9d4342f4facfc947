"""RNA-Seq processing for the scBERT-style gene encoder.

A profile (RSEM-like, non-negative values per gene) becomes two arrays aligned to a fixed, ordered
gene vocabulary (the order is the gene index of the model's gene embedding):

    values -> log1p -> aligned to the vocabulary -> bins

* genes of the vocabulary that the profile lacks are masked (`rna_mask` False, bin 0);
* genes of the profile that the vocabulary lacks are dropped;
* bins come from fixed `bin_edges` in log1p space: bin 0 is zero expression and bin `i` holds
  `edges[i-1] < x <= edges[i]`, the last bin everything above `edges[-1]`, so
  `num_bins = len(bin_edges) + 1`. With `edges[0] == 0` (the default) bin 0 is exactly "zero".

Bad values never reach a batch: NaN/inf, negative values, duplicated vocabulary genes or a profile
that shares no gene with the vocabulary raise a `ValueError` naming the case (and file, if any).

This module only needs numpy (pandas for reading files), so it can be copied with a saved processor.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# log1p-space edges for RSEM-normalised values (TCGA "RSEM genes normalized" spans ~0..1e5, i.e.
# log1p 0..~12; expressed genes mostly fall in 1..9). 7 edges -> 8 bins, bin 0 = zero expression.
DEFAULT_BIN_EDGES = (0.0, 1.0, 2.5, 4.0, 5.5, 7.0, 8.5)

GENE_COLUMN_NAMES = ("gene", "gene_id", "gene_name", "symbol", "hugo_symbol", "genes")
VALUE_COLUMN_NAMES = ("value", "expression", "rsem", "normalized_count", "tpm", "fpkm", "count", "values")


def _where(case_id: str | None, source: str | None) -> str:
    parts = []
    if case_id is not None:
        parts.append(f"case {case_id!r}")
    if source is not None:
        parts.append(f"file {source!r}")
    return " (" + ", ".join(parts) + ")" if parts else ""


def _preview(items, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def validate_bin_edges(bin_edges: Sequence[float]) -> list[float]:
    edges = [float(e) for e in bin_edges]
    if not edges:
        raise ValueError("bin_edges must hold at least one edge (num_bins = len(bin_edges) + 1).")
    if not all(math.isfinite(e) for e in edges):
        raise ValueError(f"bin_edges must be finite, got {edges}.")
    if edges[0] < 0:
        raise ValueError(f"bin_edges live in log1p space and must be >= 0, got {edges}.")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bin_edges must be strictly increasing, got {edges}.")
    return edges


def read_gene_vocab(path: str | os.PathLike) -> list[str]:
    """Read a gene vocabulary: a JSON list, a JSON object with a `genes` list, or a text file with
    one gene per line."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        obj = json.loads(text)
        genes = obj["genes"] if isinstance(obj, dict) else obj
    else:
        genes = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
        raise ValueError(f"gene vocabulary {path!r} must be a list of gene names.")
    return genes


def _pick_column(columns, names, what: str, source: str, case_id) -> Any:
    lowered = {str(c).strip().lower(): c for c in columns}
    for name in names:
        if name in lowered:
            return lowered[name]
    raise ValueError(
        f"expression file has columns {list(columns)} but no {what} column (one of {list(names)})"
        f"{_where(case_id, source)}."
    )


def read_expression_file(path: str | os.PathLike, case_id: str | None = None) -> "pd.Series":
    """Read a per-case expression file into a `pandas.Series` (index gene, float values).

    Accepts CSV (`.csv`), TSV (`.tsv`, `.txt`, `.tab`) or Parquet with two columns gene,value, with
    or without a header; with more columns, the gene and value columns are found by name.
    """
    import pandas as pd

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"RNA expression file not found{_where(case_id, path)}.")
    lower = path.lower()
    if lower.endswith(".parquet"):
        frame = pd.read_parquet(path)
    else:
        sep = "\t" if lower.endswith((".tsv", ".txt", ".tab", ".tsv.gz", ".txt.gz")) else ","
        try:
            frame = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            frame = pd.DataFrame()
        if frame.shape[0] and frame.shape[1] >= 2:
            # A header is a first row whose value cell is not a number.
            first_value = frame.iloc[0, -1] if frame.shape[1] == 2 else None
            has_header = frame.shape[1] > 2 or not _is_number(first_value)
            if has_header:
                frame.columns = [str(c) for c in frame.iloc[0]]
                frame = frame.iloc[1:].reset_index(drop=True)
            else:
                frame.columns = ["gene", "value"]
    if frame.shape[0] == 0:
        raise ValueError(f"RNA expression file is empty{_where(case_id, path)}.")
    if frame.shape[1] < 2:
        raise ValueError(
            f"RNA expression file needs two columns gene,value, got {frame.shape[1]}{_where(case_id, path)}."
        )
    if frame.shape[1] == 2:
        gene_col, value_col = frame.columns
    else:
        gene_col = _pick_column(frame.columns, GENE_COLUMN_NAMES, "gene", path, case_id)
        value_col = _pick_column(frame.columns, VALUE_COLUMN_NAMES, "value", path, case_id)
    values = pd.to_numeric(frame[value_col].replace("", "nan"), errors="coerce")
    bad = frame[value_col][values.isna() & ~frame[value_col].astype(str).str.strip().str.lower().isin(
        ["nan", "", "na", "null", "none"])]
    if len(bad):
        raise ValueError(
            f"RNA expression file has non-numeric values for genes "
            f"{_preview(frame.loc[bad.index, gene_col])}{_where(case_id, path)}."
        )
    series = pd.Series(values.to_numpy(dtype=np.float64), index=frame[gene_col].astype(str).str.strip().to_numpy())
    series.attrs["source"] = path
    return series


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


# A small per-process cache: a cohort usually shares one matrix, and reading it per item would be
# the bottleneck. Keyed by (path, mtime) so an edited file is re-read.
_MATRIX_CACHE: "OrderedDict[tuple[str, float], Any]" = OrderedDict()
_MATRIX_CACHE_SIZE = 2


def read_expression_matrix(path: str | os.PathLike) -> "pd.DataFrame":
    """Read (cached) an expression matrix: rows are samples (first column = row id), columns genes.
    CSV, TSV or Parquet (a Parquet file's index, or its first column, holds the row ids)."""
    import pandas as pd

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"RNA expression matrix not found: {path!r}.")
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key in _MATRIX_CACHE:
        _MATRIX_CACHE.move_to_end(key)
        return _MATRIX_CACHE[key]
    lower = path.lower()
    if lower.endswith(".parquet"):
        frame = pd.read_parquet(path)
        if isinstance(frame.index, pd.RangeIndex):
            frame = frame.set_index(frame.columns[0])
    else:
        sep = "\t" if lower.endswith((".tsv", ".txt", ".tab", ".tsv.gz", ".txt.gz")) else ","
        frame = pd.read_csv(path, sep=sep, index_col=0)
    frame.index = frame.index.astype(str)
    frame.columns = [str(c).strip() for c in frame.columns]
    _MATRIX_CACHE[key] = frame
    while len(_MATRIX_CACHE) > _MATRIX_CACHE_SIZE:
        _MATRIX_CACHE.popitem(last=False)
    return frame


def read_expression_row(path: str | os.PathLike, row_id: str, case_id: str | None = None) -> "pd.Series":
    """One sample of an expression matrix as a Series (index gene)."""
    import pandas as pd

    frame = read_expression_matrix(path)
    row_id = str(row_id)
    if row_id not in frame.index:
        raise KeyError(f"row id {row_id!r} not found in RNA expression matrix{_where(case_id, os.fspath(path))}.")
    row = frame.loc[row_id]
    if isinstance(row, pd.DataFrame):
        raise ValueError(f"row id {row_id!r} appears {len(row)} times in RNA expression matrix"
                         f"{_where(case_id, os.fspath(path))}.")
    values = pd.to_numeric(row, errors="coerce")
    series = pd.Series(values.to_numpy(dtype=np.float64), index=row.index)
    series.attrs["source"] = f"{os.fspath(path)}[{row_id}]"
    return series


class GeneExpressionProcessor:
    """Aligns and bins RNA-Seq profiles to a fixed gene vocabulary.

    Args:
        gene_vocab: ordered gene names; position = gene index of the model's gene embedding.
        bin_edges: increasing edges in log1p space (`num_bins = len(bin_edges) + 1`).
        log1p: apply `log1p` to the input (set False when profiles are already log1p values).

    Example:
        >>> proc = GeneExpressionProcessor(["A", "B", "C"], bin_edges=[0, 1, 2])
        >>> out = proc({"A": 0.0, "C": 20.0, "X": 5.0}, case_id="c1")
        >>> out["rna_bins"].tolist(), out["rna_mask"].tolist()
        ([0, 0, 3], [True, False, True])
    """

    def __init__(self, gene_vocab: Sequence[str], bin_edges: Sequence[float] = DEFAULT_BIN_EDGES, log1p: bool = True):
        genes = [str(g) for g in gene_vocab]
        if not genes:
            raise ValueError("gene_vocab is empty.")
        seen, duplicates = set(), []
        for gene in genes:
            if gene in seen:
                duplicates.append(gene)
            seen.add(gene)
        if duplicates:
            raise ValueError(f"gene_vocab has duplicated genes: {_preview(duplicates)}.")
        self.gene_vocab = genes
        self.bin_edges = validate_bin_edges(bin_edges)
        self.log1p = bool(log1p)
        self.gene_to_index = {g: i for i, g in enumerate(genes)}
        self._edges = np.asarray(self.bin_edges, dtype=np.float64)

    @property
    def num_genes(self) -> int:
        return len(self.gene_vocab)

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges) + 1

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"gene_vocab": list(self.gene_vocab), "bin_edges": list(self.bin_edges), "log1p": self.log1p}

    @classmethod
    def from_dict(cls, d: Mapping) -> "GeneExpressionProcessor":
        return cls(d["gene_vocab"], d.get("bin_edges", DEFAULT_BIN_EDGES), d.get("log1p", True))

    @classmethod
    def from_vocab_file(cls, path, bin_edges: Sequence[float] | None = None, log1p: bool = True):
        return cls(read_gene_vocab(path), DEFAULT_BIN_EDGES if bin_edges is None else bin_edges, log1p)

    def save_vocab(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(list(self.gene_vocab), f)

    # ---- processing ----------------------------------------------------------------------------
    def _as_gene_values(self, expression, case_id: str | None) -> tuple[list[str], np.ndarray, str | None]:
        """Normalise the accepted inputs to (genes, float64 values, source)."""
        source = None
        if isinstance(expression, (str, os.PathLike)):
            expression = read_expression_file(expression, case_id=case_id)
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - pandas is a training dependency
            pd = None
        if pd is not None and isinstance(expression, pd.DataFrame):
            if expression.shape[1] == 1:
                expression = expression.iloc[:, 0]
            else:
                gene_col = _pick_column(expression.columns, GENE_COLUMN_NAMES, "gene", source, case_id)
                value_col = _pick_column(expression.columns, VALUE_COLUMN_NAMES, "value", source, case_id)
                expression = pd.Series(expression[value_col].to_numpy(), index=expression[gene_col].astype(str))
        if pd is not None and isinstance(expression, pd.Series):
            source = expression.attrs.get("source")
            genes = [str(g) for g in expression.index]
            raw = expression.to_numpy()
        elif isinstance(expression, Mapping):
            genes = [str(g) for g in expression.keys()]
            raw = list(expression.values())
        else:
            raise TypeError(
                f"RNA expression must be a pandas Series/DataFrame, a dict gene->value or a file path, "
                f"got {type(expression).__name__}{_where(case_id, source)}."
            )
        try:
            values = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"RNA expression has non-numeric values{_where(case_id, source)}: {e}") from None
        return genes, values, source

    def align(self, expression, case_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (log1p values float32 [G], mask bool [G]) aligned to the vocabulary."""
        genes, values, source = self._as_gene_values(expression, case_id)
        if values.size == 0:
            raise ValueError(f"RNA expression profile is empty{_where(case_id, source)}.")
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(
                f"RNA expression has NaN/inf values for genes {_preview(np.asarray(genes)[bad])}"
                f"{_where(case_id, source)}."
            )
        negative = values < 0
        if negative.any():
            raise ValueError(
                f"RNA expression has negative values for genes {_preview(np.asarray(genes)[negative])} "
                f"(RSEM-like values must be >= 0; pass log1p=False only for log1p values, which are also >= 0)"
                f"{_where(case_id, source)}."
            )
        index = np.fromiter((self.gene_to_index.get(g, -1) for g in genes), dtype=np.int64, count=len(genes))
        known = index >= 0
        if not known.any():
            raise ValueError(
                f"RNA expression shares no gene with the gene vocabulary ({self.num_genes} genes, e.g. "
                f"{_preview(self.gene_vocab[:3], 3)}; profile genes e.g. {_preview(genes[:3], 3)})"
                f"{_where(case_id, source)}."
            )
        index, kept = index[known], values[known]
        if len(np.unique(index)) != len(index):
            uniq, counts = np.unique(index, return_counts=True)
            dup = [self.gene_vocab[i] for i in uniq[counts > 1]]
            raise ValueError(f"RNA expression lists genes more than once: {_preview(dup)}{_where(case_id, source)}.")
        out = np.zeros(self.num_genes, dtype=np.float32)
        mask = np.zeros(self.num_genes, dtype=bool)
        out[index] = np.log1p(kept) if self.log1p else kept
        mask[index] = True
        return out, mask

    def bin(self, log_values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Bin log1p values (int64); zero expression and masked genes get bin 0."""
        log_values = np.asarray(log_values, dtype=np.float64)
        bins = np.searchsorted(self._edges, log_values, side="left").astype(np.int64)
        bins[log_values <= 0] = 0
        if mask is not None:
            bins[~np.asarray(mask, dtype=bool)] = 0
        return bins

    def __call__(self, expression, case_id: str | None = None) -> dict[str, np.ndarray]:
        """One profile -> {"rna_bins": int64 [G], "rna_mask": bool [G]}; `None` -> all masked."""
        if expression is None:
            return {"rna_bins": np.zeros(self.num_genes, np.int64), "rna_mask": np.zeros(self.num_genes, bool)}
        values, mask = self.align(expression, case_id=case_id)
        return {"rna_bins": self.bin(values, mask), "rna_mask": mask}

    def batch(self, expressions: Sequence, case_ids: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Several profiles (entries may be None = no RNA) -> rna_bins [B,G], rna_mask [B,G], rna_present [B]."""
        case_ids = list(case_ids) if case_ids is not None else [None] * len(expressions)
        if len(case_ids) != len(expressions):
            raise ValueError(f"got {len(expressions)} RNA profiles but {len(case_ids)} case ids.")
        outs = [self(e, case_id=c) for e, c in zip(expressions, case_ids)]
        return {
            "rna_bins": np.stack([o["rna_bins"] for o in outs]) if outs else np.zeros((0, self.num_genes), np.int64),
            "rna_mask": np.stack([o["rna_mask"] for o in outs]) if outs else np.zeros((0, self.num_genes), bool),
            "rna_present": np.asarray([e is not None for e in expressions], dtype=bool),
        }

    @staticmethod
    def fit_bin_edges(profiles: Sequence, num_bins: int = 8, log1p: bool = True) -> list[float]:
        """Edges from quantiles of the non-zero log1p values of some profiles (Series, dicts or
        arrays): edge 0 is 0 (bin 0 = zero expression) and the expressed values are split into
        `num_bins - 1` equally populated bins."""
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}.")
        chunks = []
        for p in profiles:
            v = np.asarray(list(p.values()) if isinstance(p, Mapping) else np.asarray(p), dtype=np.float64)
            chunks.append(v[np.isfinite(v) & (v > 0)])
        values = np.concatenate(chunks) if chunks else np.zeros(0)
        if values.size == 0:
            raise ValueError("cannot fit bin edges: the profiles hold no positive values.")
        if log1p:
            values = np.log1p(values)
        quantiles = np.quantile(values, np.linspace(0, 1, num_bins)[1:-1])
        edges = [0.0]
        for q in quantiles:
            edges.append(max(float(q), edges[-1] + 1e-6))  # strictly increasing even on ties
        return edges

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(num_genes={self.num_genes}, num_bins={self.num_bins}, "
                f"bin_edges={self.bin_edges}, log1p={self.log1p})")


__all__ = [
    "DEFAULT_BIN_EDGES",
    "GeneExpressionProcessor",
    "read_expression_file",
    "read_expression_matrix",
    "read_expression_row",
    "read_gene_vocab",
    "validate_bin_edges",
]
