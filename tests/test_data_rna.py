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


# ---- real file layouts (written from the public format descriptions) ---------------------------
STAR_HEADER = ("gene_id\tgene_name\tgene_type\tunstranded\tstranded_first\tstranded_second\ttpm_unstranded\t"
               "fpkm_unstranded\tfpkm_uq_unstranded")


def write_star_counts(path, genes):
    """A GDC `*.rna_seq.augmented_star_gene_counts.tsv`: genes = [(versioned id, name, count, tpm)]."""
    lines = ["# gene-model: GENCODE v36", STAR_HEADER,
             "N_unmapped\t\t\t3163938\t3163938\t3163938\t\t\t",
             "N_multimapping\t\t\t6187264\t6187264\t6187264\t\t\t",
             "N_noFeature\t\t\t3181432\t25452236\t25525346\t\t\t",
             "N_ambiguous\t\t\t3493566\t1159004\t1162587\t\t\t"]
    for gene_id, name, count, tpm in genes:
        lines.append(f"{gene_id}\t{name}\tprotein_coding\t{count}\t{count // 2}\t{count - count // 2}\t{tpm}\t"
                     f"{tpm / 3:.4f}\t{tpm / 2:.4f}")
    path.write_text("\n".join(lines) + "\n")
    return path


STAR_GENES = [("ENSG00000000003.15", "TSPAN6", 3123, 39.9141), ("ENSG00000000005.6", "TNMD", 0, 0.0),
              ("ENSG00000000419.13", "DPM1", 1565, 83.2406), ("ENSG00000002586.20", "CD99", 800, 20.5),
              ("ENSG00000002586.20_PAR_Y", "CD99", 0, 0.0),  # the Y copy of a pseudo-autosomal gene
              ("ENSG00000280987.4", "MATR3", 100, 5.0), ("ENSG00000015479.19", "MATR3", 300, 10.0)]


def test_gdc_star_counts(tmp_path):
    path = write_star_counts(tmp_path / "5a3c.rna_seq.augmented_star_gene_counts.tsv", STAR_GENES)
    series = read_expression_file(path, case_id="TCGA-BP-5195")
    assert series.index.names == ["gene_id", "gene_name"] and len(series) == len(STAR_GENES)  # N_* rows gone
    assert series[("ENSG00000000003", "TSPAN6")] == 39.9141  # default value column: tpm_unstranded
    assert ("ENSG00000002586_PAR_Y", "CD99") in series.index
    counts = read_expression_file(path, value_column="unstranded")
    assert counts[("ENSG00000000419", "DPM1")] == 1565.0
    # a symbol vocabulary: matched by gene_name; ids sharing a symbol are summed (MATR3 = 5 + 10)
    proc = GeneExpressionProcessor(["MATR3", "TSPAN6", "CD99", "DPM1", "GAPDH"], EDGES)
    values, mask = proc.align(series, case_id="c")
    np.testing.assert_allclose(values, np.log1p([15.0, 39.9141, 20.5, 83.2406, 0.0]).astype(np.float32))
    assert mask.tolist() == [True, True, True, True, False]
    # an Ensembl vocabulary (unversioned): matched by id; the PAR_Y copy does not collide with CD99
    ens = GeneExpressionProcessor(["ENSG00000002586", "ENSG00000000005", "ENSG00000015479"], EDGES)
    values, mask = ens.align(series)
    np.testing.assert_allclose(values, np.log1p([20.5, 0.0, 10.0]).astype(np.float32))
    assert mask.all()
    # a plain profile with versioned ids meets an unversioned vocabulary
    values, mask = ens.align({"ENSG00000002586.20": 1.0})
    assert mask.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="no value column 'tpm'") as err:
        read_expression_file(path, case_id="C9", value_column="tpm")
    assert "tpm_unstranded" in str(err.value) and "C9" in str(err.value) and path.name in str(err.value)


def test_legacy_rsem_normalized_results(tmp_path):
    path = tmp_path / "unc.edu.0a1b.2345.rsem.genes.normalized_results"
    path.write_text("gene_id\tnormalized_count\n?|100130426\t0.0000\n?|100133144\t10.0118\nA1BG|1\t148.4160\n"
                    "SLC35E2|728661\t10.0\nSLC35E2|9906\t2.5\nTP53|7157\t999.1\n")
    series = read_expression_file(path)
    assert series.index.names == ["gene_name", "entrez_id"] and series[("A1BG", "1")] == 148.416
    values, mask = GeneExpressionProcessor(["TP53", "SLC35E2", "A1BG", "X"], EDGES).align(series)
    np.testing.assert_allclose(values, np.log1p([999.1, 12.5, 148.416, 0.0]).astype(np.float32), rtol=1e-6)
    assert mask.tolist() == [True, True, True, False]
    # an Entrez-id vocabulary works too
    values, mask = GeneExpressionProcessor(["7157", "100133144"], EDGES).align(series)
    np.testing.assert_allclose(values, np.log1p([999.1, 10.0118]).astype(np.float32), rtol=1e-6)


def test_gene_by_sample_matrices(tmp_path):
    cbio = tmp_path / "data_mrna_seq_v2_rsem.txt"
    cbio.write_text("Hugo_Symbol\tEntrez_Gene_Id\tTCGA-A1-A0SB-01\tTCGA-A1-A0SD-01\n"
                    "A1BG\t1\t12.5\t3.0\nTP53\t7157\t400.0\tNA\nSLC35E2\t728661\t1.0\t2.0\nSLC35E2\t9906\t4.0\t8.0\n")
    proc = GeneExpressionProcessor(["TP53", "SLC35E2", "A1BG"], EDGES)
    row = read_expression_row(cbio, "TCGA-A1-A0SD-01", case_id="TCGA-A1-A0SD")
    values, mask = proc.align(row)
    # NA = not measured for that sample: masked; the two SLC35E2 rows are summed
    assert mask.tolist() == [False, True, True]
    np.testing.assert_allclose(values, np.log1p([0.0, 10.0, 3.0]).astype(np.float32))
    xena = tmp_path / "HiSeqV2.tsv"
    xena.write_text("sample\tTCGA-A1-A0SB-01\tTCGA-A1-A0SD-11\nA1BG\t1.5\t2.5\nTP53\t7.0\t8.0\n")
    assert read_expression_row(xena, "TCGA-A1-A0SD-11").to_dict() == {"A1BG": 2.5, "TP53": 8.0}
    # the samples x genes layout is unchanged (first column = row ids)
    (tmp_path / "rows.tsv").write_text("sample\tA1BG\tTP53\ns1\t1.0\t2.0\n")
    assert read_expression_row(tmp_path / "rows.tsv", "s1").to_dict() == {"A1BG": 1.0, "TP53": 2.0}


def test_unknown_layout_names_file_and_columns(tmp_path):
    path = tmp_path / "weird.tsv"
    path.write_text("probe\tchromosome\tintensity\np1\tchr1\t3.5\n")
    with pytest.raises(ValueError) as err:
        read_expression_file(path, case_id="C7")
    message = str(err.value)
    assert "weird.tsv" in message and "C7" in message and "'probe', 'chromosome', 'intensity'" in message
    (tmp_path / "one.txt").write_text("# comment\nonly_one_column\nA\n")
    with pytest.raises(ValueError, match=r"at least two columns.*one\.txt"):
        read_expression_file(tmp_path / "one.txt")


def test_vocabulary_matches_like_align(tmp_path):
    from mstar_hf.data.rna import vocabulary_matches

    series = read_expression_file(write_star_counts(tmp_path / "s.rna_seq.augmented_star_gene_counts.tsv",
                                                    STAR_GENES))
    assert vocabulary_matches(series, ["MATR3", "CD99", "GAPDH"]) == 2  # by gene_name
    assert vocabulary_matches(series, ["ENSG00000000005", "ENSG00000002586"]) == 2  # by id
    assert vocabulary_matches(pd.Series({"ENSG00000000005.6": 1.0}), ["ENSG00000000005"]) == 1
    assert vocabulary_matches(series, ["GAPDH"]) == 0
