"""Cohort manifests -> datasets.Dataset: columns, relative paths, reports/RNA sources, save/load,
and every bad-input case (each error names the case)."""

import logging

import datasets
import h5py
import numpy as np
import pandas as pd
import pytest

from mstar_hf.data.features import read_slide_features, write_slide_features
from mstar_hf.data.manifest import ManifestError, cohort_cancer_types, load_case_rna, load_cohort, split_cohort

DIM = 8


def make_cohort(root, n=6, dim=DIM, **overrides):
    """n cases over types luad/kirc/lusc: features h5, RNA CSV, inline reports, relative paths."""
    rng = np.random.default_rng(0)
    types = ["luad", "kirc", "lusc"]
    rows = []
    for i in range(n):
        case = f"C{i}"
        write_slide_features(root / "feats" / f"S{i}.h5", rng.normal(size=(5 + i, dim)).astype("float32"))
        pd.DataFrame({"gene": ["A", "B", "C"], "value": rng.uniform(0, 9, 3)}).to_csv(root / f"rna_{case}.csv",
                                                                                     index=False)
        rows.append({"case_id": case, "slide_id": f"S{i}", "cancer_type": types[i % 3],
                     "features_path": f"feats/S{i}.h5", "report": f"report of {types[i % 3]} number {i}",
                     "rna_path": f"rna_{case}.csv", "time": 10.0 + i, "event": i % 2,
                     "split": ["train", "val", "test"][i % 3]})
    frame = pd.DataFrame(rows)
    for key, value in overrides.items():
        frame[key] = value
    return frame


def write(frame, root, name="manifest.csv"):
    path = root / name
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


def test_load_columns_and_paths(tmp_path):
    path = write(make_cohort(tmp_path), tmp_path)
    ds = load_cohort(path)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 6
    assert cohort_cancer_types(ds) == ["kirc", "luad", "lusc"]  # sorted
    assert ds["cancer_type_id"][:3] == [1, 0, 2]
    row = ds[0]
    assert row["features_path"] == str(tmp_path / "feats" / "S0.h5")  # resolved against the manifest folder
    assert row["report"] == "report of luad number 0" and row["time"] == 10.0 and row["event"] == 0
    assert row["slide_path"] is None and row["rna_matrix_path"] is None
    assert load_case_rna(row).index.tolist() == ["A", "B", "C"]
    assert {k: len(v) for k, v in split_cohort(ds).items()} == {"train": 2, "val": 2, "test": 2}
    # Features are not in the dataset; they are read from the h5 on demand.
    assert "features" not in ds.column_names


def test_save_to_disk_round_trip(tmp_path):
    ds = load_cohort(write(make_cohort(tmp_path), tmp_path))
    ds.save_to_disk(tmp_path / "saved")
    again = datasets.load_from_disk(str(tmp_path / "saved"))
    assert again.to_list() == ds.to_list()
    assert cohort_cancer_types(again) == cohort_cancer_types(ds)


def test_parquet_report_path_and_matrix(tmp_path):
    frame = make_cohort(tmp_path, n=3)
    (tmp_path / "r1.txt").write_text("Clear cell renal cell carcinoma.")
    frame.loc[1, "report"] = ""
    frame["report_path"] = ["", "r1.txt", ""]
    pd.DataFrame({"A": [1.0, 2.0], "B": [3.0, 0.0]}, index=["x", "y"]).to_csv(tmp_path / "matrix.csv")
    frame["rna_path"] = ["rna_C0.csv", "", ""]
    frame["rna_matrix_path"] = ["", "matrix.csv", ""]
    frame["rna_row_id"] = ["", "y", ""]
    frame["label"] = [0, 1, 1]
    frame["extra"] = ["p", "q", "r"]
    ds = load_cohort(write(frame, tmp_path, "m.parquet"))
    assert ds[1]["report"] == "Clear cell renal cell carcinoma."
    assert load_case_rna(ds[1]).to_dict() == {"A": 2.0, "B": 0.0}
    assert load_case_rna(ds[2]) is None
    assert ds["label"] == [0, 1, 1] and ds["extra"] == ["p", "q", "r"]


def test_missing_required_column_is_named(tmp_path):
    path = write(make_cohort(tmp_path).drop(columns=["features_path"]), tmp_path)
    with pytest.raises(ManifestError, match="features_path"):
        load_cohort(path)


def test_missing_features_file_names_case(tmp_path):
    frame = make_cohort(tmp_path)
    (tmp_path / "feats" / "S4.h5").unlink()
    path = write(frame, tmp_path)
    with pytest.raises(FileNotFoundError, match="C4"):
        load_cohort(path)
    ds = load_cohort(path, check_files=False)  # before extraction
    with pytest.raises(FileNotFoundError, match="C4"):
        read_slide_features(ds[4]["features_path"], case_id="C4")


def test_missing_rna_or_report_file_names_case(tmp_path):
    frame = make_cohort(tmp_path, n=3)
    frame.loc[2, "rna_path"] = "nope.csv"
    with pytest.raises(FileNotFoundError, match="C2"):
        load_cohort(write(frame, tmp_path))
    frame = make_cohort(tmp_path, n=3)
    frame["report_path"] = ["", "gone.txt", ""]
    frame.loc[1, "report"] = ""
    with pytest.raises(FileNotFoundError, match="C1"):
        load_cohort(write(frame, tmp_path))


def test_feature_width_and_nan_errors(tmp_path):
    write_slide_features(tmp_path / "w.h5", np.zeros((4, 5), "float32"))
    with pytest.raises(ValueError, match="expected 8, got 5") as err:
        read_slide_features(tmp_path / "w.h5", case_id="CASE-W", expected_dim=8)
    assert "CASE-W" in str(err.value)
    bad = np.zeros((4, 8), "float32")
    bad[2, 3] = np.nan
    write_slide_features(tmp_path / "n.h5", bad)
    with pytest.raises(ValueError, match="NaN") as err:
        read_slide_features(tmp_path / "n.h5", case_id="CASE-N")
    assert "CASE-N" in str(err.value)
    write_slide_features(tmp_path / "e.h5", np.zeros((0, 8), "float32"))
    with pytest.raises(ValueError, match="no patches"):
        read_slide_features(tmp_path / "e.h5", case_id="CASE-E")
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["features"] = np.zeros((4, 8), "float32")
        f["coords"] = np.zeros((3, 2), "int64")
    with pytest.raises(ValueError, match="coords"):
        read_slide_features(tmp_path / "c.h5", case_id="CASE-C")
    (tmp_path / "x.h5").write_text("not hdf5")
    with pytest.raises(OSError, match="CASE-X"):
        read_slide_features(tmp_path / "x.h5", case_id="CASE-X")


def test_whitespace_report_strict_and_lenient(tmp_path):
    frame = make_cohort(tmp_path, n=3)
    frame.loc[1, "report"] = "   "
    path = write(frame, tmp_path)
    assert load_cohort(path)[1]["report"].strip() == ""  # lenient: the processor treats it as missing
    with pytest.raises(ManifestError, match="C1"):
        load_cohort(path, strict_reports=True)


def test_single_case_type_allowed_with_warning(tmp_path, caplog):
    frame = make_cohort(tmp_path, n=4)  # types luad, kirc, lusc, luad -> kirc and lusc have one case
    with caplog.at_level(logging.WARNING):
        ds = load_cohort(write(frame, tmp_path))
    assert "single case" in caplog.text and "kirc" in caplog.text
    assert len(ds) == 4


def test_row_level_errors_name_the_case(tmp_path):
    cases = [
        ({"event": [0, 1, 2]}, "event"),
        ({"time": [1.0, -3.0, 2.0]}, "time"),
        ({"split": ["train", "holdout", "test"]}, "split"),
        ({"slide_id": ["S0", "S0", "S2"]}, "duplicated slide_id"),
    ]
    for override, word in cases:
        with pytest.raises(ManifestError, match=word):
            load_cohort(write(make_cohort(tmp_path, n=3, **override), tmp_path))
    frame = make_cohort(tmp_path, n=3)
    frame.loc[1, ["features_path", "report", "rna_path"]] = ""
    with pytest.raises(ManifestError, match="C1"):
        load_cohort(write(frame, tmp_path))
    frame = make_cohort(tmp_path, n=3)
    frame.loc[0, "case_id"] = ""
    with pytest.raises(ManifestError, match="empty case_id"):
        load_cohort(write(frame, tmp_path))


def test_unknown_and_fixed_cancer_types(tmp_path):
    frame = make_cohort(tmp_path, n=3)
    frame.loc[0, "cancer_type"] = ""
    ds = load_cohort(write(frame, tmp_path), cancer_types=["lusc", "kirc"])
    assert ds["cancer_type_id"] == [-1, 1, 0] and cohort_cancer_types(ds) == ["lusc", "kirc"]
