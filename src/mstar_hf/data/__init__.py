"""Multimodal cohort data: manifests, RNA processing, the `MStarProcessor`, the batch collator and
a synthetic multimodal cohort.

Names are resolved lazily so that importing `mstar_hf.data` (e.g. in slide-painting worker
processes) does not pull in torch, transformers or datasets.
"""

import importlib

_EXPORTS = {
    # manifest.py
    "ManifestError": "manifest", "REQUIRED_COLUMNS": "manifest", "load_cohort": "manifest",
    "cohort_cancer_types": "manifest", "split_cohort": "manifest", "load_case_rna": "manifest",
    "read_manifest_table": "manifest",
    # rna.py
    "GeneExpressionProcessor": "rna", "DEFAULT_BIN_EDGES": "rna", "read_expression_file": "rna",
    "read_expression_matrix": "rna", "read_expression_row": "rna", "read_gene_vocab": "rna",
    # features.py
    "read_slide_features": "features", "write_slide_features": "features",
    # processing_mstar.py
    "MStarProcessor": "processing_mstar",
    # collator.py
    "CohortTorchDataset": "collator", "MStarDataCollator": "collator", "build_cohort_dataloader": "collator",
    # text.py
    "CANCER_TYPES": "text", "ZERO_SHOT_TEMPLATES": "text", "cancer_type_keys": "text", "class_prompts": "text",
    "zero_shot_prompts": "text", "write_report": "text", "train_report_tokenizer": "text",
    # synthetic_cohort.py
    "make_synthetic_cohort": "synthetic_cohort",
    # report_cleaning.py, tcga.py, build_cohort.py (real TCGA/GDC cohorts)
    "clean_report": "report_cleaning", "warn_report_truncation": "report_cleaning", "parse_barcode": "tcga",
    "build_cohort": "build_cohort",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
