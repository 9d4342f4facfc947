"""TCGA / GDC metadata: barcodes, GDC sample sheets, clinical tables, TCGA-Reports-style CSVs.

Barcodes (https://docs.gdc.cancer.gov/Encyclopedia/pages/TCGA_Barcode/):

    patient  TCGA-BP-5195
    sample   TCGA-BP-5195-01A            sample type 01-09 tumour, 10-19 normal, 20-29 control; vial A
    slide    TCGA-BP-5195-01Z-00-DX1     portion 00, slide DX1 (DX diagnostic FFPE, TS/BS/MS frozen)

A downloaded slide is named `<slide barcode>.<UUID>.svs`; an RNA file is named by its file UUID
(`<uuid>.rna_seq.augmented_star_gene_counts.tsv`), so only the GDC sample sheet ties it to a case.

Every table reader normalises column names (lower case, spaces -> `_`, GDC's new `cases.` /
`demographic.` prefixes dropped), so a GDC sample sheet and a plain CSV with `file_name, case_id,
sample_id` columns read the same way: the non-TCGA path is the same code with plain ids.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

# "--" and "'--" are GDC's empty cells; the bracketed ones are the TCGA biotab's
MISSING = {"", "'--", "--", "na", "nan", "n/a", "none", "null", "not reported", "unknown", "[not available]",
           "[not applicable]", "[unknown]", "[discrepancy]", "[not evaluated]", "[completed]"}
DAYS_PER_MONTH = 365.25 / 12

_BARCODE = re.compile(
    r"(?P<patient>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})"
    r"(?:-(?P<sample_type>\d{2})(?P<vial>[A-Z])?"
    r"(?:-(?P<portion>\d{2})(?:-(?P<slide>(?:DX|TS|BS|MS)[A-Z0-9]*)|(?P<analyte>[A-Z])"
    r"(?:-(?P<plate>[A-Z0-9]{4})(?:-(?P<center>\d{2}))?)?)?)?)?",
    re.IGNORECASE)


@dataclass(frozen=True)
class Barcode:
    """A parsed TCGA barcode (only the parts the text holds)."""

    patient: str
    sample_type: int | None = None
    vial: str | None = None
    slide: str | None = None
    text: str = ""

    @property
    def sample(self) -> str | None:
        """`TCGA-XX-XXXX-01A` (vial included when known), None for a patient barcode."""
        if self.sample_type is None:
            return None
        return f"{self.patient}-{self.sample_type:02d}{self.vial or ''}"

    @property
    def tissue(self) -> str | None:
        """"tumor" (01-09), "normal" (10-19), "control" (20-29) or None."""
        if self.sample_type is None:
            return None
        if 1 <= self.sample_type <= 9:
            return "tumor"
        if 10 <= self.sample_type <= 19:
            return "normal"
        return "control"

    @property
    def slide_type(self) -> str | None:
        """"DX" (diagnostic FFPE), "TS"/"BS" (frozen top / bottom section), "MS" or None."""
        return None if self.slide is None else self.slide[:2]


def parse_barcode(text: str) -> Barcode | None:
    """The first TCGA barcode in `text` (a file name, an id such as `TCGA-BP-5195.<uuid>`), or None."""
    match = _BARCODE.search(str(text))
    if match is None:
        return None
    st = match.group("sample_type")
    return Barcode(patient=match.group("patient").upper(), sample_type=None if st is None else int(st),
                   vial=(match.group("vial") or "").upper() or None,
                   slide=(match.group("slide") or "").upper() or None, text=match.group(0).upper())


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip().lower() in MISSING


def normalise_column(name: str) -> str:
    """`Case ID` -> `case_id`; `demographic.vital_status` -> `vital_status`."""
    name = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    return name.rsplit(".", 1)[-1]


def read_table(path: str | os.PathLike, what: str):
    """A CSV / TSV / cBioPortal text table as a DataFrame of strings ("" for empty cells), with
    normalised column names; leading `#` comment lines are skipped. When two columns normalise to the
    same name, the `cases.` / `demographic.` / `project.` one (or else the first) is kept."""
    import pandas as pd

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}.")
    from .rna import sniff_text_table

    comments, sep = sniff_text_table(path, csv_always_comma=False)
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skiprows=comments,
                            encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{what} {path!r} is not a readable {'tab' if sep == chr(9) else 'comma'}-separated "
                         f"table: {e}") from None
    keep: dict[str, str] = {}
    for column in frame.columns:
        short = normalise_column(column)
        preferred = str(column).lower().startswith(("cases.", "demographic.", "project."))
        if short not in keep or preferred and not str(keep[short]).lower().startswith(("cases.", "demographic.")):
            keep[short] = column
    frame = frame[list(keep.values())]
    frame.columns = list(keep.keys())
    frame.attrs["source"] = path
    return frame


def _first(frame, names, what: str, required: bool = True):
    for name in names:
        if name in frame.columns:
            return name
    if required:
        raise ValueError(f"{what} {frame.attrs.get('source')!r} has no {'/'.join(names)} column; its columns "
                         f"are {list(frame.columns)}.")
    return None


def _single(value: str) -> list[str]:
    """GDC sample sheets list several ids comma-separated when a file spans samples."""
    return sorted({v.strip() for v in str(value).split(",") if v.strip()})


@dataclass
class FileRecord:
    """What a sample sheet says about one file."""

    file_name: str
    case_id: str
    sample_id: str | None = None
    project_id: str | None = None
    data_type: str | None = None
    problem: str | None = None  # why the file cannot be tied to one case / sample


def read_sample_sheet(path: str | os.PathLike) -> dict[str, FileRecord]:
    """A GDC sample sheet (`File ID, File Name, Data Category, Data Type, Project ID, Case ID,
    Sample ID, Sample Type`) or a plain CSV (`file_name, case_id[, sample_id, project_id]`) ->
    {file name: FileRecord}."""
    frame = read_table(path, "sample sheet")
    name_col = _first(frame, ("file_name", "filename", "file"), "sample sheet")
    case_col = _first(frame, ("case_id", "case_submitter_id", "patient_id", "submitter_id"), "sample sheet")
    sample_col = _first(frame, ("sample_id", "sample_submitter_id"), "sample sheet", required=False)
    project_col = _first(frame, ("project_id", "project"), "sample sheet", required=False)
    type_col = _first(frame, ("data_type",), "sample sheet", required=False)
    out: dict[str, FileRecord] = {}
    for row in frame.to_dict("records"):
        name = os.path.basename(str(row[name_col]).strip())
        if not name:
            continue
        cases = _single(row[case_col])
        samples = _single(row[sample_col]) if sample_col else []
        record = FileRecord(file_name=name, case_id=cases[0] if cases else "",
                            sample_id=samples[0] if len(samples) == 1 else None,
                            project_id=(row[project_col].strip() or None) if project_col else None,
                            data_type=(row[type_col].strip() or None) if type_col else None)
        if len(cases) != 1:
            record.problem = (f"the sample sheet lists {len(cases)} cases for it ({', '.join(cases)})" if cases
                              else "the sample sheet gives it no case id")
        elif len(samples) > 1:
            record.problem = f"the sample sheet lists {len(samples)} samples for it ({', '.join(samples)})"
        if name in out and out[name] != record:
            record.problem = "the sample sheet lists this file name twice with different cases/samples"
        out[name] = record
    return out


def read_reports_csv(path: str | os.PathLike) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """A TCGA-Reports-style CSV (`patient_filename,text`, patient_filename `TCGA-BP-5195.<uuid>`) or
    a plain one (`case_id,text` / `case_id,report`) -> ({case id: report text}, [(row, problem)]).

    TCGA ids are reduced to the patient barcode; several reports of one patient are joined."""
    frame = read_table(path, "reports CSV")
    id_col = _first(frame, ("patient_filename", "case_id", "patient_id", "case_submitter_id", "filename"),
                    "reports CSV")
    text_col = _first(frame, ("text", "report", "report_text"), "reports CSV")
    reports: dict[str, list[str]] = {}
    problems = []
    for i, row in enumerate(frame.to_dict("records")):
        raw_id, text = str(row[id_col]).strip(), str(row[text_col])
        if not raw_id:
            problems.append((f"row {i + 2}", "empty id"))
            continue
        if not text.strip():
            problems.append((raw_id, "empty report text"))
            continue
        barcode = parse_barcode(raw_id) if id_col == "patient_filename" or raw_id.upper().startswith("TCGA-") else None
        if id_col == "patient_filename" and barcode is None:
            problems.append((raw_id, "no TCGA patient barcode in patient_filename"))
            continue
        reports.setdefault(barcode.patient if barcode else raw_id, []).append(text.strip())
    return {case: "\n\n".join(texts) for case, texts in reports.items()}, problems


@dataclass
class ClinicalRecord:
    time: float | None = None  # days
    event: int | None = None  # 1 = died
    project_id: str | None = None
    values: dict | None = None  # every column of the (first) row, for labels
    problem: str | None = None  # why survival is missing


def _days(value) -> float | None:
    if is_missing(value):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def read_clinical(path: str | os.PathLike) -> dict[str, ClinicalRecord]:
    """Survival (time in days, event) and per-case columns from a clinical table:

    * GDC `clinical.tsv` (`case_submitter_id, project_id, vital_status, days_to_death,
      days_to_last_follow_up`; `'--` = missing; several rows per case are merged: dead if any row
      says so, the largest days);
    * cBioPortal `data_clinical_patient.txt` (`#` header lines, `PATIENT_ID, OS_STATUS` `1:DECEASED` /
      `0:LIVING`, `OS_MONTHS`, converted to days x 30.44);
    * a plain CSV with `case_id, time, event` (time taken as given).
    """
    frame = read_table(path, "clinical table")
    case_col = _first(frame, ("case_submitter_id", "submitter_id", "patient_id", "bcr_patient_barcode", "case_id"),
                      "clinical table")
    project_col = _first(frame, ("project_id",), "clinical table", required=False)
    gdc = "vital_status" in frame.columns
    cbio = "os_status" in frame.columns
    plain = "time" in frame.columns and "event" in frame.columns
    if not (gdc or cbio or plain):
        raise ValueError(f"clinical table {frame.attrs['source']!r} has no survival columns (GDC vital_status / "
                         f"days_to_death / days_to_last_follow_up, cBioPortal OS_STATUS / OS_MONTHS, or time / "
                         f"event); its columns are {list(frame.columns)}.")
    grouped: dict[str, list[dict]] = {}
    for row in frame.to_dict("records"):
        case = str(row[case_col]).strip()
        if case and not is_missing(case):
            grouped.setdefault(case, []).append(row)
    out = {}
    for case, rows in grouped.items():
        record = ClinicalRecord(values=dict(rows[0]))
        if project_col:
            record.project_id = next((r[project_col].strip() for r in rows if not is_missing(r[project_col])), None)
        if gdc:
            statuses = {str(r["vital_status"]).strip().lower() for r in rows if not is_missing(r["vital_status"])}
            death = [d for d in (_days(r.get("days_to_death")) for r in rows) if d is not None]
            follow = [d for d in (_days(r.get("days_to_last_follow_up")) for r in rows) if d is not None]
            if "dead" in statuses or "deceased" in statuses:
                record.event = 1
                record.time = max(death) if death else None
                if record.time is None:
                    record.problem = "vital_status Dead but no days_to_death"
            elif "alive" in statuses or "living" in statuses:
                record.event = 0
                record.time = max(follow) if follow else None
                if record.time is None:
                    record.problem = "vital_status Alive but no days_to_last_follow_up"
            else:
                record.problem = "no vital_status"
        elif cbio:
            status = str(rows[0]["os_status"]).strip().upper()
            months = _days(rows[0].get("os_months"))
            record.event = 1 if status.startswith(("1", "DECEASED")) else 0 if status.startswith(("0", "LIVING")) \
                else None
            record.time = None if months is None else months * DAYS_PER_MONTH
            if record.event is None or record.time is None:
                record.problem = f"OS_STATUS {rows[0]['os_status']!r} / OS_MONTHS {rows[0].get('os_months')!r} missing"
        else:
            record.time = _days(rows[0]["time"])
            event = str(rows[0]["event"]).strip()
            record.event = int(float(event)) if event in ("0", "1", "0.0", "1.0") else None
            if record.event is None or record.time is None:
                record.problem = f"time {rows[0]['time']!r} / event {rows[0]['event']!r} missing or invalid"
        if record.time is None or record.event is None:
            record.time = record.event = None
        out[case] = record
    return out


__all__ = ["Barcode", "ClinicalRecord", "FileRecord", "is_missing", "parse_barcode", "read_clinical",
           "read_reports_csv", "read_sample_sheet", "read_table"]
