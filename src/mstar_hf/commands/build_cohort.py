"""`mstar-hf build-cohort`: downloaded TCGA / GDC files (or a plain CSV cohort) -> manifest.csv."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Match slides, RNA-Seq files, reports and clinical data to cases and write OUT/manifest.csv (one row
per slide; features_path points at OUT/features/<slide>.h5, what `mstar-hf extract --out OUT/features`
writes), OUT/unmatched.tsv (every file or case that did not match, with the reason) and, with RNA,
OUT/gene_vocab.json. Files are tied to cases by the sample sheet or else by the TCGA barcode in
their names (slides: TCGA-XX-XXXX-01Z-00-DX1.<uuid>.svs).

TCGA from the GDC portal:
  mstar-hf build-cohort --out cohort --slides slides/ --rna rna/ --sample-sheet gdc_sample_sheet.tsv \\
      --reports TCGA_Reports.csv --clinical clinical.tsv
A non-TCGA cohort: --sample-sheet cases.csv with columns file_name,case_id[,sample_id,project_id],
--reports with case_id,text and --clinical with case_id,time,event (plus label columns).

Reports are kept as written; training and evaluation clean them when they read the manifest
(OCR noise, barcodes and page headers dropped, diagnosis first; see --clean_reports of the
training scripts).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("build-cohort", help="build a cohort manifest from TCGA/GDC downloads or a plain CSV",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (manifest.csv, unmatched.tsv, ...)")
    p.add_argument("--slides", nargs="+", default=[], metavar="DIR", help="slide folders (searched recursively)")
    p.add_argument("--rna", nargs="+", default=[], metavar="DIR",
                   help="RNA folders: GDC STAR-counts TSVs, legacy RSEM genes.normalized_results, or per-case files")
    p.add_argument("--rna-matrix", default=None, metavar="FILE",
                   help="a gene x sample matrix (cBioPortal data_mrna_seq_v2_rsem.txt, UCSC Xena) or a sample x "
                        "gene one, whose sample ids are barcodes or case ids")
    p.add_argument("--rna-value-column", default=None, metavar="NAME",
                   help="value column of the RNA files (GDC STAR counts: default tpm_unstranded; also unstranded, "
                        "fpkm_unstranded, fpkm_uq_unstranded, ...)")
    p.add_argument("--sample-sheet", nargs="+", default=[], metavar="FILE",
                   help="GDC sample sheet(s) (File Name, Case ID, Sample ID, Project ID, ...) or a plain CSV "
                        "file_name,case_id[,sample_id,project_id]")
    p.add_argument("--reports", nargs="+", default=[], metavar="CSV",
                   help="reports CSV: TCGA-Reports style patient_filename,text or case_id,text")
    p.add_argument("--clinical", nargs="+", default=[], metavar="FILE",
                   help="GDC clinical.tsv (vital_status, days_to_death, days_to_last_follow_up), cBioPortal "
                        "data_clinical_patient.txt (OS_STATUS, OS_MONTHS) or case_id,time,event; time in days")
    p.add_argument("--features-dir", default=None, metavar="DIR",
                   help="where the slides' feature h5 files are or will be (default OUT/features)")
    p.add_argument("--cancer-type", default="project", metavar="project|COLUMN",
                   help="cancer type: the GDC project without TCGA- (default) or a clinical column")
    p.add_argument("--label", default=None, metavar="project|COLUMN",
                   help="label column: the GDC project or a clinical column (e.g. ajcc_pathologic_stage)")
    p.add_argument("--include-normal", action="store_true",
                   help="keep normal-tissue slides and samples (sample types 10-19; dropped by default)")
    p.add_argument("--keep-cases-without-slide", action="store_true",
                   help="add a row (no features) for cases with RNA or a report but no slide")
    p.add_argument("--val-fraction", type=float, default=0.1, help="cases per cancer type in val (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="cases per cancer type in test (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the case-level split")
    p.add_argument("--gene-vocab", default=None, metavar="FILE",
                   help="gene vocabulary to use (e.g. mSTAR's); default: built from the RNA profiles")
    p.add_argument("--max-genes", type=int, default=None,
                   help="when building the vocabulary: keep the N most variable genes (default all shared genes)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from mstar_hf.data.build_cohort import build_cohort

    try:
        result = build_cohort(
            args.out, slides=args.slides, rna=args.rna, rna_matrix=args.rna_matrix, sample_sheets=args.sample_sheet,
            reports=args.reports, clinical=args.clinical, features_dir=args.features_dir,
            cancer_type=args.cancer_type, label=args.label, rna_value_column=args.rna_value_column,
            include_normal=args.include_normal, keep_cases_without_slide=args.keep_cases_without_slide,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
            gene_vocab=args.gene_vocab, max_genes=args.max_genes,
        )
    except (ValueError, OSError, KeyError) as e:
        print(f"mstar-hf build-cohort: error: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0
