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
import re
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


# GDC's RNA-Seq file today: `<uuid>.rna_seq.augmented_star_gene_counts.tsv` (STAR - Counts, GENCODE v36).
STAR_COUNTS_VALUE_COLUMNS = ("unstranded", "stranded_first", "stranded_second", "tpm_unstranded",
                             "fpkm_unstranded", "fpkm_uq_unstranded")
DEFAULT_STAR_VALUE_COLUMN = "tpm_unstranded"
# gene x sample matrices: the gene identifier column(s) (cBioPortal: Hugo_Symbol + Entrez_Gene_Id;
# UCSC Xena: the first column, e.g. `sample`, `Ensembl_ID` or `gene`)
MATRIX_GENE_COLUMNS = ("hugo_symbol", "entrez_gene_id")
MATRIX_GENE_FIRST_COLUMNS = GENE_COLUMN_NAMES + ("ensembl_id", "entrez_gene_id", "id", "gene_symbol")
_SAMPLE_BARCODE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-\d{2}", re.IGNORECASE)


def strip_ensembl_version(gene_id: str) -> str:
    """`ENSG00000000003.15` -> `ENSG00000000003`; `ENSG00000228572.7_PAR_Y` -> `ENSG00000228572_PAR_Y`
    (the Y copy of a pseudo-autosomal gene keeps its suffix, so it never collides with the X copy)."""
    head, dot, tail = str(gene_id).strip().partition(".")
    if not dot or not head.startswith("ENS"):
        return head + dot + tail
    digits = len(tail) - len(tail.lstrip("0123456789"))
    return head + tail[digits:] if digits else head + dot + tail


def _open_text(path: str):
    if path.lower().endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace")


def sniff_text_table(path: str, csv_always_comma: bool = True) -> tuple[int, str]:
    """(number of leading `#` comment lines, separator) of a text table. `.csv` files are
    comma-separated (unless `csv_always_comma=False` and their first data line holds a tab); other files
    (.tsv, .txt, GDC's `.normalized_results`, ...) are tab-separated when their first data line holds a tab."""
    comments, first = 0, ""
    with _open_text(path) as f:
        for line in f:
            if line.startswith("#"):
                comments += 1
                continue
            first = line
            break
    lower = path.lower()
    if lower.endswith((".csv", ".csv.gz")) and (csv_always_comma or "\t" not in first):
        return comments, ","
    return comments, "\t" if "\t" in first or not first else ","


def _read_text_table(path: str, case_id) -> "pd.DataFrame":
    import pandas as pd

    comments, sep = sniff_text_table(path)
    try:
        return pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, skiprows=comments)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except pd.errors.ParserError as e:
        raise ValueError(f"RNA expression file is not a {'tab' if sep == chr(9) else 'comma'}-separated table "
                         f"({e}){_where(case_id, path)}.") from None


def _numeric(column: "pd.Series", genes, what: str, source: str, case_id) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(column.replace("", "nan"), errors="coerce")
    bad = column[values.isna() & ~column.astype(str).str.strip().str.lower().isin(["nan", "", "na", "null", "none"])]
    if len(bad):
        raise ValueError(f"RNA expression file has non-numeric values in column {what!r} for genes "
                         f"{_preview(np.asarray(genes)[bad.index])}{_where(case_id, source)}.")
    return values.to_numpy(dtype=np.float64)


def _star_counts(frame: "pd.DataFrame", value_column: str | None, path: str, case_id) -> "pd.Series":
    """GDC STAR-counts TSV -> Series on a (gene_id without version, gene_name) MultiIndex."""
    import pandas as pd

    value_column = value_column or DEFAULT_STAR_VALUE_COLUMN
    if value_column not in frame.columns:
        raise ValueError(f"GDC STAR-counts file has no value column {value_column!r}; its columns are "
                         f"{list(frame.columns)}{_where(case_id, path)}.")
    ids = frame["gene_id"].astype(str).str.strip()
    # N_unmapped, N_multimapping, N_noFeature, N_ambiguous: STAR's read tallies, not genes
    genes = frame[~ids.str.startswith("N_")].reset_index(drop=True)
    ids = genes["gene_id"].astype(str).str.strip()
    values = _numeric(genes[value_column], ids, value_column, path, case_id)
    index = pd.MultiIndex.from_arrays([[strip_ensembl_version(g) for g in ids],
                                       genes["gene_name"].astype(str).str.strip().tolist()],
                                      names=["gene_id", "gene_name"])
    return pd.Series(values, index=index, name=value_column)


def _read_star_counts(path: str, comments: int, header: list[str], value_column: str | None,
                      case_id) -> "pd.Series":
    """Fast path for the GDC STAR-counts TSV (60k rows): only the three needed columns, parsed by
    pandas' C reader; ~10x faster than reading every cell as text."""
    import pandas as pd

    value_column = value_column or DEFAULT_STAR_VALUE_COLUMN
    if value_column not in header:
        raise ValueError(f"GDC STAR-counts file has no value column {value_column!r}; its columns are "
                         f"{header}{_where(case_id, path)}.")
    columns = ["gene_id", "gene_name", value_column]
    try:
        frame = pd.read_csv(path, sep="\t", skiprows=comments, usecols=columns, keep_default_na=False,
                            na_values=[""], dtype={"gene_id": str, "gene_name": str, value_column: np.float64})
    except ValueError:  # a non-numeric cell: the text path names the genes
        frame = pd.read_csv(path, sep="\t", skiprows=comments, usecols=columns, dtype=str, keep_default_na=False)
        return _star_counts(frame, value_column, path, case_id)
    genes = frame[~frame["gene_id"].str.startswith("N_")]
    index = pd.MultiIndex.from_arrays(
        [[strip_ensembl_version(g) for g in genes["gene_id"]], genes["gene_name"].str.strip().to_numpy()],
        names=["gene_id", "gene_name"])
    return pd.Series(genes[value_column].to_numpy(dtype=np.float64), index=index, name=value_column)


def _rsem_normalized(frame: "pd.DataFrame", path: str, case_id) -> "pd.Series":
    """Legacy TCGA `*.rsem.genes.normalized_results` (`gene_id normalized_count`, ids `A1BG|1`,
    `?|100130426` for genes without a symbol) -> Series on a (symbol, entrez id) MultiIndex."""
    import pandas as pd

    parts = frame["gene_id"].astype(str).str.strip().str.split("|", n=1)
    symbols = [p[0] if p[0] != "?" else "" for p in parts]
    entrez = [p[1] if len(p) > 1 else "" for p in parts]
    values = _numeric(frame["normalized_count"], frame["gene_id"], "normalized_count", path, case_id)
    index = pd.MultiIndex.from_arrays([symbols, entrez], names=["gene_name", "entrez_id"])
    return pd.Series(values, index=index, name="normalized_count")


def read_expression_file(path: str | os.PathLike, case_id: str | None = None,
                         value_column: str | None = None) -> "pd.Series":
    """Read a per-case expression file into a `pandas.Series` of float values.

    Layouts (text files may be gzipped; leading `#` comment lines are skipped):

    * GDC STAR counts (`*.rna_seq.augmented_star_gene_counts.tsv`): `value_column` picks one of
      `unstranded stranded_first stranded_second tpm_unstranded fpkm_unstranded fpkm_uq_unstranded`
      (default `tpm_unstranded`); the `N_*` rows are dropped; the index is a (gene_id without its
      version, gene_name) MultiIndex, matched to a vocabulary by either;
    * legacy TCGA RSEM (`*.rsem.genes.normalized_results`: `gene_id normalized_count`, ids `A1BG|1`):
      a (gene_name, entrez_id) MultiIndex;
    * two columns gene,value with or without a header (CSV, TSV);
    * more columns: `value_column`, or the gene and value columns found by name
      (`GENE_COLUMN_NAMES`, `VALUE_COLUMN_NAMES`); Parquet likewise.

    A file of no known layout is a `ValueError` naming the file and the columns found.
    """
    import pandas as pd

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"RNA expression file not found{_where(case_id, path)}.")
    lower = path.lower()
    if lower.endswith(".parquet"):
        frame = pd.read_parquet(path)
        frame.columns = [str(c).strip() for c in frame.columns]
    else:
        comments, sep = sniff_text_table(path)
        with _open_text(path) as f:
            for _ in range(comments):
                f.readline()
            header = [c.strip() for c in f.readline().rstrip("\n").split(sep)]
        if {"gene_id", "gene_name"} <= set(header) and set(header) & set(STAR_COUNTS_VALUE_COLUMNS):
            series = _read_star_counts(path, comments, header, value_column, case_id)
            series.attrs["source"] = path
            return series
        frame = _read_text_table(path, case_id)
        if frame.shape[0] and frame.shape[1] >= 2:
            # A header is a first row whose value cell is not a number.
            first_value = frame.iloc[0, -1] if frame.shape[1] == 2 else None
            has_header = frame.shape[1] > 2 or not _is_number(first_value)
            if has_header:
                frame.columns = [str(c).strip() for c in frame.iloc[0]]
                frame = frame.iloc[1:].reset_index(drop=True)
            else:
                frame.columns = ["gene", "value"]
    if frame.shape[0] == 0:
        raise ValueError(f"RNA expression file is empty{_where(case_id, path)}.")
    if frame.shape[1] < 2:
        raise ValueError(
            f"RNA expression file needs at least two columns (gene, value); found {frame.shape[1]}: "
            f"{[str(c) for c in frame.columns]}{_where(case_id, path)}."
        )
    columns = set(frame.columns)
    if {"gene_id", "gene_name"} <= columns and columns & set(STAR_COUNTS_VALUE_COLUMNS):
        series = _star_counts(frame.astype(str), value_column, path, case_id)
    elif (list(frame.columns) == ["gene_id", "normalized_count"] and value_column in (None, "normalized_count")
          and frame["gene_id"].astype(str).str.contains("|", regex=False).any()):
        series = _rsem_normalized(frame.astype(str), path, case_id)
    else:
        if value_column is not None:
            if value_column not in columns:
                raise ValueError(f"RNA expression file has no value column {value_column!r}; its columns are "
                                 f"{list(frame.columns)}{_where(case_id, path)}.")
            value_col = value_column
            others = [c for c in frame.columns if c != value_col]
            gene_col = others[0] if len(others) == 1 else _pick_column(others, GENE_COLUMN_NAMES, "gene", path,
                                                                      case_id)
        elif frame.shape[1] == 2:
            gene_col, value_col = frame.columns
        else:
            gene_col = _pick_column(frame.columns, GENE_COLUMN_NAMES, "gene", path, case_id)
            value_col = _pick_column(frame.columns, VALUE_COLUMN_NAMES, "value", path, case_id)
        genes = frame[gene_col].astype(str).str.strip().to_numpy()
        values = _numeric(frame[value_col].astype(str), genes, str(value_col), path, case_id)
        series = pd.Series(values, index=genes)
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


def _genes_by_samples(frame: "pd.DataFrame", path: str) -> "pd.DataFrame | None":
    """A gene x sample matrix (cBioPortal `data_mrna_seq_v2_rsem.txt`, UCSC Xena) transposed to
    samples x genes, or None when `frame` (read with its first column as data) is samples x genes."""
    import pandas as pd

    lowered = [str(c).strip().lower() for c in frame.columns]
    gene_cols = [c for c, low in zip(frame.columns, lowered) if low in MATRIX_GENE_COLUMNS]
    if not gene_cols:
        others = [str(c) for c in frame.columns[1:]]
        barcodes = sum(bool(_SAMPLE_BARCODE.match(c)) for c in others)
        if lowered[0] in MATRIX_GENE_FIRST_COLUMNS or (others and barcodes > len(others) / 2):
            gene_cols = [frame.columns[0]]
        else:
            return None
    samples = [c for c in frame.columns if c not in gene_cols]
    if not samples:
        raise ValueError(f"RNA expression matrix {path!r} has gene columns {gene_cols} but no sample column.")
    values = frame[samples].apply(pd.to_numeric, errors="coerce")
    # cBioPortal writes the Entrez id as a number: "1.0" must stay "1"
    keys = [frame[c].astype(str).str.strip().str.replace(r"\.0$", "", regex=True).replace("nan", "")
            for c in gene_cols]
    names = [str(c).lower() for c in gene_cols]
    values.index = pd.MultiIndex.from_arrays(keys, names=names) if len(keys) > 1 else pd.Index(keys[0], name=names[0])
    out = values.T
    out.index = [str(s).strip() for s in out.index]
    out.attrs["genes_by_samples"] = True
    return out


def read_expression_matrix(path: str | os.PathLike) -> "pd.DataFrame":
    """Read (cached) an expression matrix as samples x genes.

    * samples x genes: CSV, TSV or Parquet, the first column (or a Parquet index) holds the row ids;
    * gene x sample: cBioPortal (`Hugo_Symbol` and/or `Entrez_Gene_Id` columns, then one column per
      sample, `#` comment lines allowed) or UCSC Xena (first column `sample`, `gene`, `Ensembl_ID`...,
      or sample columns named by TCGA barcodes); it is transposed, the gene columns becoming the
      (MultiIndex) gene keys. Note that Xena matrices hold log2(x+1) values.
    """
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
        comments, sep = sniff_text_table(path)
        raw = pd.read_csv(path, sep=sep, skiprows=comments, dtype=str, keep_default_na=False)
        raw.columns = [str(c).strip() for c in raw.columns]
        if raw.shape[1] < 2:
            raise ValueError(f"RNA expression matrix {path!r} needs a row-id column and at least one more; "
                             f"found columns {list(raw.columns)}.")
        frame = _genes_by_samples(raw, path)
        if frame is None:
            frame = raw.set_index(raw.columns[0]).apply(pd.to_numeric, errors="coerce")
    frame.index = frame.index.astype(str)
    if not isinstance(frame.columns, pd.MultiIndex):
        frame.columns = [str(c).strip() for c in frame.columns]
    _MATRIX_CACHE[key] = frame
    while len(_MATRIX_CACHE) > _MATRIX_CACHE_SIZE:
        _MATRIX_CACHE.popitem(last=False)
    return frame


def read_expression_row(path: str | os.PathLike, row_id: str, case_id: str | None = None) -> "pd.Series":
    """One sample of an expression matrix as a Series (index gene). In a gene x sample matrix a
    missing value (cBioPortal's `NA`) means the gene was not measured: it is left out."""
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
    if frame.attrs.get("genes_by_samples"):
        series = series[series.notna()]
    series.attrs["source"] = f"{os.fspath(path)}[{row_id}]"
    return series


def vocabulary_matches(expression, gene_vocab) -> int:
    """How many genes of `gene_vocab` a profile (Series, possibly on a MultiIndex of identifiers)
    names, matched the way `GeneExpressionProcessor.align` matches them (best identifier level,
    versioned Ensembl ids without their version)."""
    import pandas as pd

    vocab = gene_vocab if isinstance(gene_vocab, (set, frozenset, dict)) else set(map(str, gene_vocab))
    index = expression.index if isinstance(expression, pd.Series) else pd.Index(list(expression))
    levels = ([index.get_level_values(i) for i in range(index.nlevels)] if isinstance(index, pd.MultiIndex)
              else [index])
    best = 0
    for level in levels:
        keys = {str(g) for g in level}
        hits = keys & vocab
        hits |= {strip_ensembl_version(g) for g in keys - hits if g.startswith("ENS") and "." in g} & vocab
        best = max(best, len(hits))
    return best


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
        levels = None
        if pd is not None and isinstance(expression, pd.Series):
            source = expression.attrs.get("source")
            if isinstance(expression.index, pd.MultiIndex):
                # several identifiers per gene (Ensembl id + symbol, symbol + Entrez id)
                levels = [[str(g) for g in expression.index.get_level_values(i)]
                          for i in range(expression.index.nlevels)]
                genes = levels[0]
            else:
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
        return (genes if levels is None else levels), values, source

    def _lookup(self, genes: Sequence[str]) -> np.ndarray:
        """Vocabulary index of each gene (-1 = not in it); a versioned Ensembl id (`ENSG...3.15`) not
        found as is is looked up without its version."""
        index = np.fromiter((self.gene_to_index.get(g, -1) for g in genes), dtype=np.int64, count=len(genes))
        for i in np.flatnonzero(index < 0):
            g = genes[i]
            if g.startswith("ENS") and "." in g:
                index[i] = self.gene_to_index.get(strip_ensembl_version(g), -1)
        return index

    def _resolve(self, keys) -> tuple[list[str], np.ndarray, bool]:
        """(gene names used, vocabulary indices, several rows may share one vocabulary gene). With
        several identifiers per row, the one naming the most vocabulary genes is used."""
        if keys and isinstance(keys[0], list):
            best = max(((level, self._lookup(level)) for level in keys),
                       key=lambda li: len(np.unique(li[1][li[1] >= 0])))
            return best[0], best[1], True
        return keys, self._lookup(keys), False

    def align(self, expression, case_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (log1p values float32 [G], mask bool [G]) aligned to the vocabulary."""
        keys, values, source = self._as_gene_values(expression, case_id)
        genes, index, summed = self._resolve(keys)
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
        known = index >= 0
        if not known.any():
            raise ValueError(
                f"RNA expression shares no gene with the gene vocabulary ({self.num_genes} genes, e.g. "
                f"{_preview(self.gene_vocab[:3], 3)}; profile genes e.g. {_preview(genes[:3], 3)})"
                f"{_where(case_id, source)}."
            )
        index, kept = index[known], values[known]
        if summed and len(np.unique(index)) != len(index):
            # one symbol for several Ensembl ids / Entrez ids (GENCODE's PAR_Y copies, RSEM's two
            # SLC35E2): the symbol's expression is their sum
            uniq, inverse = np.unique(index, return_inverse=True)
            total = np.zeros(len(uniq), dtype=np.float64)
            np.add.at(total, inverse, kept)
            index, kept = uniq, total
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
    "DEFAULT_STAR_VALUE_COLUMN",
    "GeneExpressionProcessor",
    "read_expression_file",
    "read_expression_matrix",
    "read_expression_row",
    "read_gene_vocab",
    "strip_ensembl_version",
    "validate_bin_edges",
    "vocabulary_matches",
]
