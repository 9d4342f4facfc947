"""Cleaning OCR'd pathology reports before they reach the 512-token window of the report encoder.

Real TCGA reports are OCR'd PDFs (the public TCGA-Reports CSV holds one text per patient). Most are
longer than 512 tokens, and their first ~100 tokens are page headers, barcodes, UUIDs, "Redacted"
lines and OCR runs such as "IIII": with plain truncation the encoder sees the letterhead and never
the diagnosis. `clean_report` drops that noise and moves the diagnosis sections to the front, so the
window holds the diagnosis text. It is conservative: a clean report (no noise, diagnosis first or no
section headings) comes back unchanged, and cleaning twice gives the same text as cleaning once.

What is dropped:

* TCGA barcodes (``TCGA-BP-5195``, ``TCGA-BP-5195-01Z-00-DX1``) and UUIDs, wherever they stand;
* redaction marks: ``Redacted`` / ``[REDACTED]`` / ``<redacted>`` and runs of ``XXXX`` / ``****``;
* page furniture: ``Page 2 of 5``, ``(continued)``, ``Continued on next page``, ``End of report``,
  ``Printed: <date>``, the "Surgical Pathology Report" title, and identification fields left empty
  by the redaction (``Patient Name:``, ``MRN:``, ``Accession #:``, ``UUID:``, ...);
* OCR noise: runs of ``I``/``l``/``|``/``1`` (``IIII``, ``lIlI``, ``||||``; the Roman numerals ``II``,
  ``III`` of a grade are kept), runs of four or more punctuation marks (``-----``, ``.....``,
  ``~~~~``) and runs of three or more single-character tokens (``I l | i``);
* then empty lines and repeated spaces.

Sections: a heading is a known section name (``FINAL DIAGNOSIS``, ``GROSS DESCRIPTION``, ...) followed
by a colon, or alone on its line; it must start with a capital letter, so prose such as "the
diagnosis: ..." is not one. When the report has a diagnosis section that is not already first,
the diagnosis sections (in their order) go first, then everything else in its original order.
"Clinical diagnosis" is clinical history, not a pathology diagnosis, and is not moved.

`report_truncation_stats` / `warn_report_truncation` measure how many reports exceed the token
window and warn once (with counts), since truncation itself is silent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

logger = logging.getLogger(__name__)

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# patient barcode, then any of sample/portion/plate/center parts, then an optional ".<uuid>" (file names)
_BARCODE = r"\bTCGA-[A-Za-z0-9]{2}-[A-Za-z0-9]{4}(?:-[A-Za-z0-9]{2,4}){0,4}(?:\." + _UUID + r")?"
_NOISE_PATTERNS = [
    re.compile(_BARCODE),
    re.compile(r"\b" + _UUID + r"\b"),
    re.compile(r"[\[<(]\s*redacted\s*[\])>]", re.IGNORECASE),
    re.compile(r"\bredacted\b", re.IGNORECASE),
    re.compile(r"\b[Xx]{4,}\b"),
    re.compile(r"\*{3,}"),
    re.compile(r"\bpage\s*\d+\s*(?:of|/)\s*\d+\b", re.IGNORECASE),
    re.compile(r"\bpage\s*:?\s*\d+\b(?=\s*$)", re.IGNORECASE | re.MULTILINE),
    re.compile(r"\(\s*continued\s*\)|\bcontinued on (?:the )?next page\b", re.IGNORECASE),
    re.compile(r"\bend of (?:the )?report\b", re.IGNORECASE),
    re.compile(r"\bprinted\s*(?:on|:)\s*[0-9][0-9/:.\- ]*(?:[AP]M\b)?", re.IGNORECASE),
    re.compile(r"[^\w\s(){}\[\]]{4,}"),  # -----, ....., ~~~~, ==== (but not "(+)")
    # 3+ single-character tokens in a row ("I l | i"): OCR dust; "a", "A" and digits alone are words.
    re.compile(r"(?<!\S)(?:[^\sAa0-9]\s+){2,}[^\sAa0-9](?!\S)"),
]
# I/l/|/1 runs: 4+ of them, or 3+ with at least one l, | or 1, so the numerals II and III of a grade
# stay; a run of digits only is a number and stays too.
_OCR_RUN = re.compile(r"(?<![\w|])(?:[Il|1]{4,}|(?=[Il|1]*[l|1])[Il|1]{3,})(?![\w|])")
_ID_LABEL = (r"(?:Patient\s+Name|Name|MRN|Med(?:ical)?\s*Rec(?:ord)?\s*(?:#|No\.?|Number)?"
             r"|Accession\s*(?:#|No\.?|Number)?"
             r"|DOB|Date\s+of\s+Birth|SSN|Account\s*(?:#|No\.?)?|UUID|Case\s*(?:#|No\.?)|Hospital\s*#)")
_NOISE_PATTERNS += [
    # the report title repeated on every page
    re.compile(r"\b(?:[Ss]urgical\s+|SURGICAL\s+)?(?:Pathology|PATHOLOGY)\s+"
               r"(?:Report|REPORT|Consultation|CONSULTATION)\b"),
]

# Section names; the longest alternatives come first so "CLINICAL DIAGNOSIS" wins over "DIAGNOSIS".
_DIAGNOSIS_NAMES = [
    "FINAL PATHOLOGIC DIAGNOSIS", "FINAL PATHOLOGICAL DIAGNOSIS", "FINAL SURGICAL PATHOLOGY DIAGNOSIS",
    "SURGICAL PATHOLOGY DIAGNOSIS", "PATHOLOGIC DIAGNOSIS", "PATHOLOGICAL DIAGNOSIS", "PATHOLOGY DIAGNOSIS",
    "FINAL DIAGNOSES", "FINAL DIAGNOSIS", "DIAGNOSES", "DIAGNOSIS", "DIAGNOSTIC SUMMARY",
]
_OTHER_NAMES = [
    "CLINICAL DIAGNOSIS AND HISTORY", "CLINICAL DIAGNOSIS & HISTORY", "CLINICAL DIAGNOSIS", "PREOPERATIVE DIAGNOSIS",
    "POSTOPERATIVE DIAGNOSIS", "PRE-OPERATIVE DIAGNOSIS", "POST-OPERATIVE DIAGNOSIS", "CLINICAL HISTORY",
    "CLINICAL INFORMATION", "CLINICAL DATA", "HISTORY", "SPECIMENS SUBMITTED", "SPECIMEN SUBMITTED", "SPECIMENS",
    "SPECIMEN", "SOURCE OF SPECIMEN", "GROSS DESCRIPTION", "GROSS EXAMINATION", "GROSS", "MICROSCOPIC DESCRIPTION",
    "MICROSCOPIC EXAMINATION", "MICROSCOPIC", "INTRAOPERATIVE CONSULTATION", "FROZEN SECTION DIAGNOSIS",
    "FROZEN SECTION", "COMMENTS", "COMMENT", "NOTE", "ADDENDUM", "SYNOPTIC REPORT", "SUMMARY OF SECTIONS",
    "IMMUNOHISTOCHEMISTRY", "SPECIAL STAINS",
]


def _heading_pattern(names: Sequence[str]) -> str:
    words = sorted(names, key=len, reverse=True)
    return "|".join(r"\s+".join(re.escape(w) for w in name.split()) for name in words)


_NAMES = _heading_pattern(_DIAGNOSIS_NAMES + _OTHER_NAMES)
_HEADING = re.compile(
    # a capitalised section name followed by a colon, or alone on its line
    r"(?:(?:^|(?<=\s))(?=[A-Z])(?P<name>(?i:" + _NAMES + r"))\s*:"
    r"|^[ \t]*(?=[A-Z])(?P<alone>(?i:" + _NAMES + r"))[ \t]*$)", re.MULTILINE)
# identification fields whose value was redacted (or was a barcode / UUID removed above): the label is
# followed by another label, a section heading or the end of the line
_NOISE_PATTERNS.append(re.compile(
    r"\b(?i:" + _ID_LABEL + r")\s*:\s*(?=(?i:" + _ID_LABEL + r")\s*:|(?=[A-Z])(?i:" + _NAMES + r")\s*:|$)"))
_DIAGNOSIS = re.compile(r"^(?:" + _heading_pattern(_DIAGNOSIS_NAMES) + r")$", re.IGNORECASE)


def _drop_noise_once(line: str) -> str:
    for pattern in _NOISE_PATTERNS:
        line = pattern.sub(" ", line)
    line = _OCR_RUN.sub(lambda m: m.group(0) if m.group(0).isdigit() else " ", line)
    return re.sub(r"[ \t]{2,}", " ", line).strip()


def _drop_noise(text: str) -> str:
    lines = []
    for line in text.splitlines():
        # removing one piece of noise can leave a new run (e.g. "I TCGA-.. l |"): repeat to a fixed point
        for _ in range(4):
            cleaned = _drop_noise_once(line)
            if cleaned == line:
                break
            line = cleaned
        # what is left of a line such as "TCGA-... : ..." is punctuation only
        if line and re.search(r"\w", line):
            lines.append(line)
    return "\n".join(lines)


def _diagnosis_first(text: str) -> str:
    heads = list(_HEADING.finditer(text))
    if not heads:
        return text
    is_dx = [bool(_DIAGNOSIS.match(re.sub(r"\s+", " ", h.group("name") or h.group("alone")))) for h in heads]
    if not any(is_dx):
        return text
    preamble = text[: heads[0].start()].strip()
    sections = [text[h.start(): nxt.start() if nxt is not None else len(text)].strip()
                for h, nxt in zip(heads, heads[1:] + [None])]
    if is_dx[0] and not preamble:
        return text
    dx = [s for s, d in zip(sections, is_dx) if d]
    rest = ([preamble] if preamble else []) + [s for s, d in zip(sections, is_dx) if not d]
    # single-line (flattened OCR) reports stay single-line
    sep = "\n" if "\n" in text else " "
    return sep.join(dx + rest)


def clean_report(text: str) -> str:
    """An OCR'd pathology report without its noise, diagnosis sections first (see the module
    docstring). `None` or a blank text gives ""."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise TypeError(f"clean_report expects a string, got {type(text).__name__}.")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    return _diagnosis_first(_drop_noise(text))


def report_truncation_stats(reports: Iterable, tokenizer, max_length: int) -> dict:
    """Token lengths (with special tokens) of the non-empty reports against a `max_length` window:
    {"n", "truncated", "median_tokens", "max_tokens"}."""
    import numpy as np

    texts = [r for r in reports if isinstance(r, str) and r.strip()]
    if not texts:
        return {"n": 0, "truncated": 0, "median_tokens": 0, "max_tokens": 0}
    # no truncation here: the point is to count what truncation would drop. A fast tokenizer's backend
    # is used directly, so transformers does not warn about each long sequence.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
        try:
            ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
        finally:
            if truncation is not None:
                backend.enable_truncation(**truncation)
            if padding is not None:
                backend.enable_padding(**padding)
    else:
        ids = tokenizer(texts, truncation=False, padding=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
    lengths = np.asarray([len(x) for x in ids])
    return {"n": int(lengths.size), "truncated": int((lengths > max_length).sum()),
            "median_tokens": float(np.median(lengths)), "max_tokens": int(lengths.max())}


_WARNED: set = set()


def warn_report_truncation(reports: Iterable, tokenizer, max_length: int, *, source: str = "reports",
                           cleaned: bool | None = None) -> dict:
    """Log one warning (once per `source` and `max_length` in this process) when some reports are
    longer than the `max_length`-token window; returns `report_truncation_stats`."""
    stats = report_truncation_stats(reports, tokenizer, max_length)
    key = (str(source), int(max_length))
    if stats["truncated"] and key not in _WARNED:
        _WARNED.add(key)
        how = "" if cleaned is None else (" (after report cleaning)" if cleaned else
                                          " (report cleaning is off: --clean_reports true may help)")
        logger.warning(
            "%s: %d of %d reports are longer than the %d-token window%s (median %.0f tokens, longest %d); "
            "their text beyond token %d is not seen.", source, stats["truncated"], stats["n"], max_length, how,
            stats["median_tokens"], stats["max_tokens"], max_length)
    return stats


__all__ = ["clean_report", "report_truncation_stats", "warn_report_truncation"]
