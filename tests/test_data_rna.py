"""RNA processing: alignment to the gene vocabulary, masking, binning, file formats, bad input."""

import math

import numpy as np
import pandas as pd
import pytest

from mstar_hf.data.rna import (
    DEFAULT_BIN_EDGES,
    GeneExpressionProcessor,
    read_expression_file,
    read_expression_row,
    read_gene_vocab,
)

VOCAB = ["G0", "G1", "G2", "G3", "G4"]
EDGES = [0.0, 1.0, 2.0, 3.0]  # -> 5 bins


@pytest.fixture
def proc():
    return GeneExpressionProcessor(VOCAB, EDGES)


def test_alignment_masking_extras_and_bins(proc):
    # G1 missing from the profile, X1 not in the vocabulary, order shuffled.
    profile = pd.Series({"G4": math.expm1(3.5), "X1": 7.0, "G0": 0.0, "G3": math.expm1(1.5), "G2": math.expm1(0.5)})
    values, mask = proc.align(profile, case_id="c1")
    assert mask.tolist() == [True, False, True, True, True]
    np.testing.assert_allclose(values, [0.0, 0.0, 0.5, 1.5, 3.5], atol=1e-6)
    out = proc(profile, case_id="c1")
    # bin 0 = zero expression; (0,1] -> 1; (1,2] -> 2; (2,3] -> 3; > 3 -> 4 = num_bins - 1.
    assert out["rna_bins"].tolist() == [0, 0, 1, 2, 4]
    assert out["rna_bins"].dtype == np.int64 and out["rna_mask"].dtype == bool
    assert proc.num_bins == len(EDGES) + 1 == 5


def test_bins_edges_inclusive_and_default_edges():
    proc = GeneExpressionProcessor(VOCAB, EDGES, log1p=False)
    out = proc({"G0": 0.0, "G1": 1.0, "G2": 1.0001, "G3": 3.0, "G4": 99.0})
    assert out["rna_bins"].tolist() == [0, 1, 2, 3, 4]
    default = GeneExpressionProcessor(VOCAB)
    assert default.bin_edges == list(DEFAULT_BIN_EDGES) and default.num_bins == 8
    # Tiny positive expression is not "zero": it gets bin 1.
    assert default({"G0": 1e-4})["rna_bins"][0] == 1


def test_none_profile_is_all_masked(proc):
    out = proc(None)
    assert not out["rna_mask"].any() and (out["rna_bins"] == 0).all()
    batch = proc.batch([{"G0": 1.0}, None], ["a", "b"])
    assert batch["rna_bins"].shape == (2, 5) and batch["rna_present"].tolist() == [True, False]
    assert batch["rna_mask"][1].sum() == 0


def test_dict_dataframe_and_path_inputs(proc, tmp_path):
    d = {"G0": 2.0, "G2": 5.0}
    frame = pd.DataFrame({"gene": ["G0", "G2"], "value": [2.0, 5.0]})
    path = tmp_path / "p.csv"
    frame.to_csv(path, index=False)
    ref = proc(d)
    for other in (frame, str(path), pd.Series(d)):
        out = proc(other, case_id="c")
        assert (out["rna_bins"] == ref["rna_bins"]).all() and (out["rna_mask"] == ref["rna_mask"]).all()


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "NaN/inf"), (-1.0, "negative")])
def test_bad_values_name_the_case(proc, bad, word):
    with pytest.raises(ValueError, match=word) as err:
        proc({"G0": 1.0, "G1": bad}, case_id="CASE-7")
    assert "CASE-7" in str(err.value) and "G1" in str(err.value)


def test_bad_value_in_file_names_case_and_file(proc, tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("gene\tvalue\nG0\t1.0\nG1\tNaN\n")
    with pytest.raises(ValueError, match="NaN") as err:
        proc(read_expression_file(path, case_id="CASE-8"), case_id="CASE-8")
    assert "CASE-8" in str(err.value) and "bad.tsv" in str(err.value)


def test_no_overlap_with_vocabulary(proc):
    with pytest.raises(ValueError, match="no gene with the gene vocabulary") as err:
        proc({"TP53": 3.0, "EGFR": 1.0}, case_id="CASE-9")
    assert "CASE-9" in str(err.value)


def test_duplicated_gene_and_empty_profile(proc):
    with pytest.raises(ValueError, match="more than once"):
        proc(pd.Series([1.0, 2.0], index=["G0", "G0"]), case_id="c")
    with pytest.raises(ValueError, match="empty"):
        proc({}, case_id="c")
    with pytest.raises(TypeError, match="pandas Series"):
        proc([1.0, 2.0], case_id="c")


def test_vocab_and_edges_validation(tmp_path):
    with pytest.raises(ValueError, match="duplicated"):
        GeneExpressionProcessor(["A", "A"])
    with pytest.raises(ValueError, match="empty"):
        GeneExpressionProcessor([])
    with pytest.raises(ValueError, match="increasing"):
        GeneExpressionProcessor(["A"], [0, 2, 1])
    with pytest.raises(ValueError, match=">= 0"):
        GeneExpressionProcessor(["A"], [-1, 1])
    (tmp_path / "v.txt").write_text("A\nB\n\n")
    (tmp_path / "v.json").write_text('{"genes": ["A", "B"]}')
    assert read_gene_vocab(tmp_path / "v.txt") == read_gene_vocab(tmp_path / "v.json") == ["A", "B"]
    proc = GeneExpressionProcessor.from_vocab_file(tmp_path / "v.txt", bin_edges=[0, 1])
    proc.save_vocab(tmp_path / "w.json")
    assert GeneExpressionProcessor.from_dict(proc.to_dict()).gene_vocab == read_gene_vocab(tmp_path / "w.json")


def test_expression_file_formats(tmp_path):
    (tmp_path / "a.csv").write_text("G0,1.5\nG1,2\n")  # no header
    (tmp_path / "b.tsv").write_text("gene\tvalue\nG0\t1.5\nG1\t2\n")
    (tmp_path / "c.csv").write_text("gene_id,symbol,normalized_count\nx,G0,1.5\ny,G1,2\n")  # found by name
    for name in ("a.csv", "b.tsv"):
        s = read_expression_file(tmp_path / name)
        assert s.to_dict() == {"G0": 1.5, "G1": 2.0}
    s = read_expression_file(tmp_path / "c.csv")
    assert s.index.tolist() == ["x", "y"]  # first gene-like column wins: gene_id
    (tmp_path / "d.csv").write_text("gene,value\nG0,abc\n")
    with pytest.raises(ValueError, match="non-numeric") as err:
        read_expression_file(tmp_path / "d.csv", case_id="C1")
    assert "C1" in str(err.value)
    with pytest.raises(FileNotFoundError, match="C2"):
        read_expression_file(tmp_path / "missing.csv", case_id="C2")


def test_expression_matrix_rows(tmp_path):
    frame = pd.DataFrame({"G0": [1.0, 2.0], "G3": [0.0, 5.0]}, index=["s1", "s2"])
    frame.to_csv(tmp_path / "m.csv")
    frame.to_parquet(tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        row = read_expression_row(tmp_path / name, "s2", case_id="c")
        assert row.to_dict() == {"G0": 2.0, "G3": 5.0}
    with pytest.raises(KeyError, match="s9"):
        read_expression_row(tmp_path / "m.csv", "s9", case_id="c")


def test_fit_bin_edges():
    rng = np.random.default_rng(0)
    profiles = [dict(zip(VOCAB, rng.exponential(50, 5) * (rng.random(5) > 0.3))) for _ in range(50)]
    edges = GeneExpressionProcessor.fit_bin_edges(profiles, num_bins=6)
    assert len(edges) == 5 and edges[0] == 0.0 and all(b > a for a, b in zip(edges, edges[1:]))
    proc = GeneExpressionProcessor(VOCAB, edges)
    bins = np.concatenate([proc(p)["rna_bins"] for p in profiles])
    # Non-zero values spread over bins 1..5 roughly evenly.
    counts = np.bincount(bins[bins > 0], minlength=6)[1:]
    assert counts.min() > 0.5 * counts.mean()
