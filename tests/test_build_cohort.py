"""`mstar-hf build-cohort`: a TCGA/GDC-style download (barcode-named slides, GDC STAR-counts TSVs in
gdc-client folders, a GDC sample sheet, a TCGA-Reports-style CSV, a GDC clinical TSV) becomes a
manifest; what does not match is listed with its reason; Stage 1 trains on the result. Also cBioPortal
clinical + matrix inputs, and a non-TCGA cohort from plain CSVs. All files are written here in the
public formats; nothing is downloaded."""

import csv
import json
import uuid

import numpy as np
import pandas as pd
import pytest

from mstar_hf.data.build_cohort import assign_splits, build_cohort
from mstar_hf.data.features import write_slide_features
from mstar_hf.data.manifest import load_case_rna, load_cohort
from mstar_hf.data.report_cleaning import clean_report
from mstar_hf.data.tcga import parse_barcode, read_clinical

SHEET_COLUMNS = ["File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID",
                 "Sample Type"]
GENES = [(f"ENSG{1000 + i:011d}.{i % 7 + 1}", f"GENE{i}") for i in range(24)]
PROJECTS = {"KIRC": ["TCGA-B0-5691", "TCGA-B0-5692", "TCGA-B0-5693", "TCGA-B0-5694", "TCGA-B0-5695"],
            "LUAD": ["TCGA-05-4244", "TCGA-05-4249", "TCGA-05-4250", "TCGA-05-4382", "TCGA-05-4384"]}


def _uuid(rng) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _star_tsv(path, rng, project):
    """A GDC STAR-counts TSV whose expression depends on the project (so the modalities agree)."""
    shift = 0 if project == "KIRC" else 12
    lines = ["# gene-model: GENCODE v36",
             "gene_id\tgene_name\tgene_type\tunstranded\tstranded_first\tstranded_second\ttpm_unstranded\t"
             "fpkm_unstranded\tfpkm_uq_unstranded",
             "N_unmapped\t\t\t3163938\t3163938\t3163938\t\t\t", "N_multimapping\t\t\t6187264\t6187264\t6187264\t\t\t",
             "N_noFeature\t\t\t3181432\t25452236\t25525346\t\t\t", "N_ambiguous\t\t\t3493566\t1159004\t1162587\t\t\t"]
    for i, (gene_id, name) in enumerate(GENES):
        tpm = float(rng.gamma(2.0, 60.0 if shift <= i < shift + 12 else 2.0))
        count = int(tpm * 10)
        lines.append(f"{gene_id}\t{name}\tprotein_coding\t{count}\t{count // 2}\t{count - count // 2}\t{tpm:.4f}\t"
                     f"{tpm / 3:.4f}\t{tpm / 2:.4f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _ocr_report(patient, rng, project):
    dx = ("Renal cell carcinoma, clear cell type, Fuhrman grade II" if project == "KIRC"
          else "Adenocarcinoma of the lung, acinar predominant")
    return (f"{patient}.{_uuid(rng)} Surgical Pathology Report Page 1 of 2 IIII Patient Name: Redacted "
            f"Clinical History: mass. GROSS DESCRIPTION: Received in formalin. FINAL DIAGNOSIS: {dx}.")


@pytest.fixture
def gdc_download(tmp_path):
    """slides/ (barcode names), rna/<file id>/<uuid>.rna_seq.augmented_star_gene_counts.tsv + logs,
    gdc_sample_sheet.tsv, TCGA_Reports.csv, clinical.tsv."""
    rng = np.random.default_rng(0)
    root = tmp_path / "download"
    sheet, reports, clinical = [], [], []
    expected = {}  # slide stem -> (case, rna file name)
    for project, patients in PROJECTS.items():
        for k, patient in enumerate(patients):
            slide_stems = [f"{patient}-01Z-00-DX1.{_uuid(rng)}"]
            if k == 0:
                slide_stems.append(f"{patient}-01Z-00-DX2.{_uuid(rng)}")  # two slides, one case
            for stem in slide_stems:
                (root / "slides").mkdir(parents=True, exist_ok=True)
                (root / "slides" / f"{stem}.svs").write_bytes(b"II*\0")
            if patient == "TCGA-05-4384":  # no RNA for this patient
                rna_name = None
            else:
                file_id, rna_name = _uuid(rng), f"{_uuid(rng)}.rna_seq.augmented_star_gene_counts.tsv"
                _star_tsv(root / "rna" / file_id / rna_name, rng, project)
                (root / "rna" / file_id / "logs").mkdir()
                (root / "rna" / file_id / "logs" / f"{rna_name}.parcel").write_text("parcel")
                sheet.append([file_id, rna_name, "Transcriptome Profiling", "Gene Expression Quantification",
                              f"TCGA-{project}", patient, f"{patient}-01A", "Primary Tumor"])
            for stem in slide_stems:
                expected[stem] = (patient, rna_name)
            if k == 1:  # a normal-tissue RNA sample beside the tumour one: not used
                file_id, name = _uuid(rng), f"{_uuid(rng)}.rna_seq.augmented_star_gene_counts.tsv"
                _star_tsv(root / "rna" / file_id / name, rng, project)
                sheet.append([file_id, name, "Transcriptome Profiling", "Gene Expression Quantification",
                              f"TCGA-{project}", f"{patient}, {patient}", f"{patient}-11A", "Solid Tissue Normal"])
            if patient != "TCGA-B0-5695":  # a patient without a report
                reports.append({"patient_filename": f"{patient}.{_uuid(rng)}",
                                "text": _ocr_report(patient, rng, project)})
            dead = k % 2 == 1
            # GDC clinical.tsv: one row per treatment, "'--" for missing
            for treatment in ("Radiation Therapy, NOS", "Pharmaceutical Therapy, NOS")[: 1 + (k == 2)]:
                if patient == "TCGA-05-4250":
                    continue  # no clinical row
                clinical.append({"case_id": _uuid(rng), "case_submitter_id": patient, "project_id": f"TCGA-{project}",
                                 "vital_status": "Dead" if dead else "Alive",
                                 "days_to_death": str(100 * (k + 1)) if dead else "'--",
                                 "days_to_last_follow_up":
                                     "'--" if dead else str(300 + 10 * k + (5 if treatment.startswith("P") else 0)),
                                 "ajcc_pathologic_stage": f"Stage {['I', 'II', 'III', 'IV', 'I'][k]}",
                                 "treatment_type": treatment})
    # a normal frozen slide, a slide without a barcode, an RNA file of a patient without a slide,
    # an RNA file nobody listed, and gdc-client's annotations.txt
    (root / "slides" / f"TCGA-B0-5691-11A-01-TS1.{_uuid(rng)}.svs").write_bytes(b"II*\0")
    (root / "slides" / "scan_0001.svs").write_bytes(b"II*\0")
    file_id, orphan = _uuid(rng), f"{_uuid(rng)}.rna_seq.augmented_star_gene_counts.tsv"
    _star_tsv(root / "rna" / file_id / orphan, rng, "KIRC")
    sheet.append([file_id, orphan, "Transcriptome Profiling", "Gene Expression Quantification", "TCGA-KIRC",
                  "TCGA-B0-9999", "TCGA-B0-9999-01A", "Primary Tumor"])
    _star_tsv(root / "rna" / "stray" / "unlisted.rna_seq.augmented_star_gene_counts.tsv", rng, "KIRC")
    (root / "rna" / file_id / "annotations.txt").write_text("id\tnote\n")
    sheet.append([_uuid(rng), "gone.rna_seq.augmented_star_gene_counts.tsv", "Transcriptome Profiling",
                  "Gene Expression Quantification", "TCGA-KIRC", "TCGA-B0-5692", "TCGA-B0-5692-01B", "Primary Tumor"])
    reports.append({"patient_filename": f"TCGA-ZZ-0000.{_uuid(rng)}", "text": "FINAL DIAGNOSIS: something."})
    pd.DataFrame(sheet, columns=SHEET_COLUMNS).to_csv(root / "gdc_sample_sheet.tsv", sep="\t", index=False)
    pd.DataFrame(reports).to_csv(root / "TCGA_Reports.csv", index=False)
    pd.DataFrame(clinical).to_csv(root / "clinical.tsv", sep="\t", index=False)
    return {"root": root, "expected": expected, "orphan": orphan}


def _build(gdc, out, **kwargs):
    root = gdc["root"]
    return build_cohort(out, slides=[root / "slides"], rna=[root / "rna"],
                        sample_sheets=[root / "gdc_sample_sheet.tsv"],
                        reports=[root / "TCGA_Reports.csv"], clinical=[root / "clinical.tsv"], **kwargs)


def test_gdc_download_to_manifest(gdc_download, tmp_path):
    out = tmp_path / "cohort"
    result = _build(gdc_download, out, label="ajcc_pathologic_stage", val_fraction=0.2, seed=1)
    frame = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    expected = gdc_download["expected"]
    assert sorted(frame["slide_id"]) == sorted(expected)  # normal and barcode-less slides left out
    for row in frame.to_dict("records"):
        case, rna_name = expected[row["slide_id"]]
        assert row["case_id"] == case and row["sample_id"] == f"{case}-01Z"
        assert row["features_path"] == f"features/{row['slide_id']}.h5"
        assert (out / row["slide_path"]).resolve() == (gdc_download["root"] / "slides" / f"{row['slide_id']}.svs")
        assert row["cancer_type"] == ("KIRC" if case.startswith("TCGA-B0") else "LUAD")
        assert row["project_id"] == f"TCGA-{row['cancer_type']}"
        if rna_name is None:
            assert row["rna_path"] == "" and row["rna_value_column"] == ""
        else:
            assert row["rna_path"].endswith(rna_name) and row["rna_value_column"] == "tpm_unstranded"
            assert row["rna_sample_id"] == f"{case}-01A"
        k = PROJECTS[row["cancer_type"]].index(case)
        if case == "TCGA-05-4250":
            assert row["time"] == row["event"] == row["label"] == ""
        elif k % 2:
            assert (row["time"], row["event"]) == (str(100 * (k + 1)), "1")
        else:  # alive: the largest follow-up over the case's rows
            assert (row["time"], row["event"]) == (str(300 + 10 * k + (5 if k == 2 else 0)), "0")
        if case != "TCGA-05-4250":
            assert row["label"] == f"Stage {['I', 'II', 'III', 'IV', 'I'][k]}"
        assert (row["report"] == "") == (case == "TCGA-B0-5695")
        if row["report"]:
            assert row["report"].startswith(f"{case}.")  # kept as written; cleaned when loaded
    # splits are per case (both slides of TCGA-B0-5691 on one side), one val case per type
    splits = frame.groupby("case_id")["split"].nunique()
    assert (splits == 1).all()
    per_case = frame.drop_duplicates("case_id")
    assert per_case.groupby("cancer_type")["split"].apply(lambda s: (s == "val").sum()).tolist() == [1, 1]

    reasons = {(u.kind, u.item.split("/")[-1], u.reason) for u in result.unmatched}
    normal_slide = next(p.name for p in (gdc_download["root"] / "slides").glob("TCGA-B0-5691-11A*"))
    assert ("slide", normal_slide, "normal tissue (sample type 11); pass --include-normal to keep it") in reasons
    assert ("slide", "scan_0001.svs", "no TCGA barcode in its name and not in a sample sheet") in reasons
    assert ("rna", gdc_download["orphan"], "the patient has no slide") in reasons
    assert ("rna", "unlisted.rna_seq.augmented_star_gene_counts.tsv",
            "no TCGA barcode in its name and not in a sample sheet") in reasons
    # the sheet names the normal sample's case twice ("A, A"): still one case, dropped as normal tissue
    assert sum(k == "rna" and r == "normal tissue (sample type 11); pass --include-normal to keep it"
               for k, _, r in reasons) == 2
    assert ("sample_sheet", "gone.rna_seq.augmented_star_gene_counts.tsv",
            "listed in the sample sheet but not found under the rna folder(s)") in reasons
    assert ("report", "TCGA-ZZ-0000", "the patient has no slide") in reasons
    assert ("clinical", "TCGA-05-4250", "no row in the clinical table(s): no survival") in reasons
    assert not any("annotations.txt" in u.item or ".parcel" in u.item for u in result.unmatched)
    listed = pd.read_csv(out / "unmatched.tsv", sep="\t")
    assert len(listed) == len(result.unmatched)
    summary = result.summary()
    assert "12 slides, 10 cases; 11 with RNA, 11 with a report, 11 with survival" in summary
    assert "KIRC 6, LUAD 6" in summary and "the patient has no slide" in summary

    # the vocabulary: the genes of the profiles, by symbol (as mSTAR's), all shared by every profile
    genes = json.loads((out / "gene_vocab.json").read_text())
    assert genes == sorted(name for _, name in GENES)

    # the manifest loads; the RNA goes through the GDC reader with the manifest's value column
    for stem in expected:
        write_slide_features(out / "features" / f"{stem}.h5", np.zeros((4, 64), np.float32))
    cohort = load_cohort(out / "manifest.csv")
    row = cohort[int(np.flatnonzero(np.asarray(cohort["case_id"]) == "TCGA-B0-5692")[0])]
    profile = load_case_rna(row)
    tsv = pd.read_csv(out / row["rna_path"], sep="\t", comment="#")
    tsv = tsv[~tsv["gene_id"].str.startswith("N_")]
    assert profile.to_numpy().tolist() == tsv["tpm_unstranded"].tolist()
    assert row["report"] == clean_report(frame.set_index("slide_id").loc[row["slide_id"], "report"])
    assert row["report"].startswith("FINAL DIAGNOSIS: Renal cell carcinoma")


def test_cli_prints_unmatched_and_stage1_trains(gdc_download, tmp_path, capsys):
    from mstar_hf.cli import main

    out = tmp_path / "cohort"
    root = gdc_download["root"]
    code = main(["build-cohort", "--out", str(out), "--slides", str(root / "slides"), "--rna", str(root / "rna"),
                 "--sample-sheet", str(root / "gdc_sample_sheet.tsv"), "--reports", str(root / "TCGA_Reports.csv"),
                 "--clinical", str(root / "clinical.tsv"), "--val-fraction", "0.2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "slide: 1 x no TCGA barcode in its name and not in a sample sheet: " in printed
    assert "scan_0001.svs" in printed and "report: 1 x the patient has no slide: TCGA-ZZ-0000" in printed

    from mstar_hf.training_utils.stage1 import main as stage1_main

    rng = np.random.default_rng(0)
    for row in csv.DictReader(open(out / "manifest.csv")):
        shift = 0 if row["cancer_type"] == "KIRC" else 1
        write_slide_features(out / row["features_path"], rng.normal(shift, 1, size=(12, 64)).astype(np.float32))
    run = tmp_path / "stage1"
    stage1_main(["--manifest", str(out / "manifest.csv"), "--model_size", "tiny", "--output_dir", str(run),
                 "--max_train_steps", "3", "--per_device_train_batch_size", "4", "--max_patches", "8",
                 "--with_tracking", "false", "--quiet", "--tokenizer_vocab_size", "200"])
    results = json.loads((run / "stage1_results.json").read_text())
    assert results["steps"] == 3 and all(np.isfinite(results["first_losses"]))
    processor_config = json.loads((run / "processor_config.json").read_text())
    assert processor_config["gene_vocab"] == json.loads((out / "gene_vocab.json").read_text())


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "sheet.tsv").write_text("File Name\tProject ID\nx.svs\tTCGA-KIRC\n")
    with pytest.raises(ValueError, match=r"sample sheet .*sheet\.tsv.* no case_id/.*columns are \['file_name'"):
        build_cohort(tmp_path / "o", slides=[tmp_path / "slides"], sample_sheets=[tmp_path / "sheet.tsv"])
    (tmp_path / "clin.tsv").write_text("case_submitter_id\tgender\nTCGA-B0-5691\tmale\n")
    with pytest.raises(ValueError, match=r"clin\.tsv.* no survival columns"):
        read_clinical(tmp_path / "clin.tsv")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_cohort(tmp_path / "o", slides=[tmp_path / "nowhere"])


def test_cbioportal_clinical_and_rna_matrix(tmp_path):
    (tmp_path / "slides").mkdir()
    patients = ["TCGA-A1-A0SB", "TCGA-A1-A0SD", "TCGA-A2-A04P"]
    for p in patients:
        (tmp_path / "slides" / f"{p}-01Z-00-DX1.0b1f4a3c-1111-4222-8333-944455556666.svs").write_bytes(b"x")
    (tmp_path / "data_clinical_patient.txt").write_text(
        "#Patient Identifier\tOverall Survival Status\tOverall Survival (Months)\tSubtype\n"
        "#Identifier to uniquely identify a patient.\tOverall patient survival status.\tOS months\tSubtype\n"
        "#STRING\tSTRING\tNUMBER\tSTRING\n#1\t1\t1\t1\n"
        "PATIENT_ID\tOS_STATUS\tOS_MONTHS\tSUBTYPE\n"
        "TCGA-A1-A0SB\t0:LIVING\t12.0\tBRCA_LumA\nTCGA-A1-A0SD\t1:DECEASED\t3.5\tBRCA_Basal\n"
        "TCGA-A2-A04P\t[Not Available]\t\tBRCA_LumA\n")
    (tmp_path / "data_mrna_seq_v2_rsem.txt").write_text(
        "Hugo_Symbol\tEntrez_Gene_Id\tTCGA-A1-A0SB-01\tTCGA-A1-A0SD-01\tTCGA-A1-A0SD-11\n"
        "A1BG\t1\t10\t20\t30\nTP53\t7157\t1\t2\t3\n")
    result = build_cohort(tmp_path / "o", slides=[tmp_path / "slides"],
                          rna_matrix=tmp_path / "data_mrna_seq_v2_rsem.txt",
                          clinical=[tmp_path / "data_clinical_patient.txt"], cancer_type="subtype", label="subtype",
                          val_fraction=0)
    rows = {r["case_id"]: r for r in result.rows}
    assert rows["TCGA-A1-A0SB"]["time"] == f"{12.0 * 365.25 / 12:g}" and rows["TCGA-A1-A0SB"]["event"] == "0"
    assert rows["TCGA-A1-A0SD"]["event"] == "1" and rows["TCGA-A2-A04P"]["time"] == ""
    assert rows["TCGA-A1-A0SD"]["rna_row_id"] == "TCGA-A1-A0SD-01"  # the tumour column, not -11
    assert rows["TCGA-A2-A04P"].get("rna_row_id", "") == ""
    assert rows["TCGA-A1-A0SD"]["cancer_type"] == rows["TCGA-A1-A0SD"]["label"] == "BRCA_Basal"
    cohort = load_cohort(tmp_path / "o" / "manifest.csv", check_files=False)
    row = cohort[cohort["case_id"].index("TCGA-A1-A0SD")]
    assert load_case_rna(row).to_dict() == {("A1BG", "1"): 20.0, ("TP53", "7157"): 2.0}
    assert json.loads((tmp_path / "o" / "gene_vocab.json").read_text()) == ["A1BG", "TP53"]


def test_plain_csv_cohort(tmp_path):
    """A non-TCGA cohort: files tied to cases by a plain CSV; reports and survival by case id."""
    for name in ("s1.tiff", "s2.tiff", "s3.tiff"):
        (tmp_path / "slides").mkdir(exist_ok=True)
        (tmp_path / "slides" / name).write_bytes(b"x")
    (tmp_path / "rna").mkdir()
    for case in ("P1", "P2"):
        (tmp_path / "rna" / f"{case}.csv").write_text("gene,value\nA,1.0\nB,2.0\n")
    (tmp_path / "cases.csv").write_text("file_name,case_id,project_id\ns1.tiff,P1,LUNG\ns2.tiff,P2,LUNG\n"
                                        "s3.tiff,P3,KIDNEY\nP1.csv,P1,LUNG\nP2.csv,P2,LUNG\n")
    (tmp_path / "reports.csv").write_text('case_id,text\nP1,"Adenocarcinoma."\nP3,"Clear cell carcinoma."\n')
    (tmp_path / "clinical.csv").write_text("case_id,time,event,grade\nP1,100,1,G2\nP2,50,0,G1\n")
    result = build_cohort(tmp_path / "o", slides=[tmp_path / "slides"], rna=[tmp_path / "rna"],
                          sample_sheets=[tmp_path / "cases.csv"], reports=[tmp_path / "reports.csv"],
                          clinical=[tmp_path / "clinical.csv"], label="grade", val_fraction=0)
    got = [(r["case_id"], r["slide_id"], r["cancer_type"], r.get("rna_path", ""), r["report"], r["time"], r["event"],
            r["label"]) for r in result.rows]
    assert got == [("P1", "s1", "LUNG", "../rna/P1.csv", "Adenocarcinoma.", "100", "1", "G2"),
                   ("P2", "s2", "LUNG", "../rna/P2.csv", "", "50", "0", "G1"),
                   ("P3", "s3", "KIDNEY", "", "Clear cell carcinoma.", "", "", "")]
    assert [(u.kind, u.item, u.reason) for u in result.unmatched] == [
        ("clinical", "P3", "no row in the clinical table(s): no survival")]
    # a case with a report but no slide: listed, or kept as a row without features on request
    (tmp_path / "reports.csv").write_text('case_id,text\nP1,"Adenocarcinoma."\nP9,"Carcinoma."\n')
    kwargs = dict(slides=[tmp_path / "slides"], sample_sheets=[tmp_path / "cases.csv"], val_fraction=0,
                  reports=[tmp_path / "reports.csv"])
    assert ("report", "P9", "the patient has no slide") in {
        (u.kind, u.item, u.reason) for u in build_cohort(tmp_path / "o2", **kwargs).unmatched}
    kept = build_cohort(tmp_path / "o3", keep_cases_without_slide=True, **kwargs)
    cohort = load_cohort(kept.manifest, check_files=False)
    row = cohort[cohort["case_id"].index("P9")]
    assert row["features_path"] is None and row["report"] == "Carcinoma." and row["slide_id"] == "P9"


def test_barcodes_and_splits():
    b = parse_barcode("TCGA-BP-5195-01Z-00-DX1.25c0b433-5557-4165-922e-2c1eac9c26f0.svs")
    assert (b.patient, b.sample, b.tissue, b.slide, b.slide_type) == ("TCGA-BP-5195", "TCGA-BP-5195-01Z", "tumor",
                                                                      "DX1", "DX")
    b = parse_barcode("TCGA-A7-A0CE-11A-21R-A089-07")
    assert (b.sample, b.tissue, b.slide) == ("TCGA-A7-A0CE-11A", "normal", None)
    assert parse_barcode("TCGA-BP-5195.25c0b433").sample is None and parse_barcode("slide_01.svs") is None
    cases = {f"c{i}": "a" if i < 10 else "b" for i in range(14)}
    splits = assign_splits(cases, 0.2, 0.1, seed=0)
    assert sorted(splits) == sorted(cases)
    per_type = {t: [splits[c] for c in cases if cases[c] == t] for t in "ab"}
    assert (per_type["a"].count("val"), per_type["a"].count("test")) == (2, 1)
    assert (per_type["b"].count("val"), per_type["b"].count("test")) == (1, 1)
    assert assign_splits(cases, 0.2, 0.1, seed=0) == splits != assign_splits(cases, 0.2, 0.1, seed=1)
    with pytest.raises(ValueError, match="sum to less than 1"):
        assign_splits(cases, 0.6, 0.5, seed=0)
