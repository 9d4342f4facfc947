"""`MStarProcessor`: the preprocessing saved with an mSTAR model.

It bundles the three inputs of the multimodal model:

* `tokenizer`: the text encoder's tokenizer (any `AutoTokenizer`; BioBERT for real use) for
  pathology reports, up to `max_length` (512) tokens, truncated and padded;
* the gene vocabulary and log1p bin edges of the RNA encoder (`GeneExpressionProcessor`), stored
  in `processor_config.json` (`gene_vocab`, `bin_edges`, `log1p`), so the gene order of a saved
  model can never drift from its embedding table;
* `image_processor`: the patch encoder's image processor (`MStarImageProcessor`: resize 224,
  ImageNet mean/std).

Missing modalities: a report that is `None`, NaN or empty becomes `[CLS] [SEP]` with
`report_present` False; a whitespace-only report is treated the same way (with a warning naming the
case) unless `strict_reports=True`, which raises instead. An RNA profile that is `None` gives an
all-False `rna_mask` and `rna_present` False.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from transformers import BatchFeature, ProcessorMixin

from .rna import DEFAULT_BIN_EDGES, GeneExpressionProcessor, validate_bin_edges

logger = logging.getLogger(__name__)


def _default_image_processor():
    try:
        from mstar_hf.modeling.image_processing_mstar import MStarImageProcessor
    except ImportError:  # e.g. loaded as remote code without the package
        from transformers import ViTImageProcessor

        return ViTImageProcessor(
            size={"height": 224, "width": 224},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
            resample=2,
        )
    return MStarImageProcessor()


def is_missing_report(text) -> bool:
    """None, NaN (pandas' empty cell) and "" count as a missing report."""
    return text is None or (isinstance(text, float) and math.isnan(text)) or text == ""


class MStarProcessor(ProcessorMixin):
    r"""
    Processor of [`MStarModel`]: report tokenisation, RNA alignment/binning and patch images.

    Args:
        image_processor: the patch encoder's image processor (default `MStarImageProcessor()`).
        tokenizer: the text encoder's tokenizer (required).
        gene_vocab (`list[str]`, *optional*): ordered gene names of the RNA encoder; without it the
            processor handles no RNA.
        bin_edges (`list[float]`): log1p-space bin edges; `num_bins = len(bin_edges) + 1`.
        max_length (`int`, defaults to 512): report length limit in tokens (truncation).
        log1p (`bool`, defaults to True): log1p-transform the RNA values.
        strict_reports (`bool`, defaults to False): raise on whitespace-only reports instead of
            treating them as missing.

    Example:
        >>> processor = MStarProcessor(tokenizer=tokenizer, gene_vocab=genes)
        >>> batch = processor(text=["Adenocarcinoma ...", None], rna=[{"TP53": 4.2}, None],
        ...                   case_ids=["c1", "c2"])
        >>> sorted(batch.keys())
        ['attention_mask', 'input_ids', 'report_present', 'rna_bins', 'rna_mask', 'rna_present']
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        gene_vocab: Sequence[str] | None = None,
        bin_edges: Sequence[float] | None = None,
        max_length: int = 512,
        log1p: bool = True,
        strict_reports: bool = False,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError(
                "MStarProcessor needs the text encoder's tokenizer, e.g. AutoTokenizer.from_pretrained(<bert>) "
                "or mstar_hf.data.train_report_tokenizer(reports)."
            )
        if image_processor is None:
            image_processor = _default_image_processor()
        if int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}.")
        self.gene_vocab = list(gene_vocab) if gene_vocab is not None else None
        self.bin_edges = validate_bin_edges(DEFAULT_BIN_EDGES if bin_edges is None else bin_edges)
        self.max_length = int(max_length)
        self.log1p = bool(log1p)
        self.strict_reports = bool(strict_reports)
        self._warned_blank: set = set()
        self.gene_processor = (
            GeneExpressionProcessor(self.gene_vocab, self.bin_edges, self.log1p) if self.gene_vocab else None
        )
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The image processor is stored inside processor_config.json. Build MStarImageProcessor from
        # it directly, so loading does not depend on AutoImageProcessor having it registered yet.
        config = (processor_dict or {}).get("image_processor")
        if isinstance(config, dict) and config.get("image_processor_type") == "MStarImageProcessor":
            try:
                from mstar_hf.modeling.image_processing_mstar import MStarImageProcessor
            except ImportError:
                MStarImageProcessor = None
            if MStarImageProcessor is not None:
                kwargs = dict(kwargs)
                subfolder = kwargs.pop("subfolder", "")
                image_kwargs = {k: v for k, v in config.items() if k not in ("image_processor_type", "processor_class")}
                tokenizer = cls._load_tokenizer_from_pretrained(
                    "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
                )
                return [MStarImageProcessor(**image_kwargs), tokenizer]
        return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)

    # ---- properties --------------------------------------------------------------------------
    @property
    def num_genes(self) -> int:
        return 0 if self.gene_processor is None else self.gene_processor.num_genes

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges) + 1

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "report_present", "rna_bins", "rna_mask", "rna_present",
                "pixel_values"]

    # ---- text ---------------------------------------------------------------------------------
    def clean_reports(self, reports: Sequence, case_ids: Sequence[str] | None = None, strict: bool | None = None):
        """-> (texts with "" for missing reports, present flags). Whitespace-only reports are missing
        (warning) or, in strict mode, a `ValueError` naming the case."""
        strict = self.strict_reports if strict is None else strict
        case_ids = list(case_ids) if case_ids is not None else [f"#{i}" for i in range(len(reports))]
        texts, present = [], []
        for text, case_id in zip(reports, case_ids):
            if is_missing_report(text):
                texts.append("")
                present.append(False)
                continue
            if not isinstance(text, str):
                raise TypeError(f"report of case {case_id!r} must be a string or None, got {type(text).__name__}.")
            if not text.strip():
                if strict:
                    raise ValueError(f"report of case {case_id!r} is empty (whitespace only).")
                if case_id not in self._warned_blank:  # once per case, not every epoch
                    self._warned_blank.add(case_id)
                    logger.warning("Report of case %r is whitespace only: treated as missing.", case_id)
                texts.append("")
                present.append(False)
                continue
            texts.append(text.strip())
            present.append(True)
        return texts, present

    def tokenize_reports(self, reports: Sequence, case_ids=None, strict: bool | None = None,
                         max_length: int | None = None, padding="longest", return_tensors="pt") -> dict:
        """Tokenise reports (missing -> [CLS][SEP]): input_ids, attention_mask, report_present."""
        if isinstance(reports, str):
            reports = [reports]
        reports = list(reports)
        if case_ids is not None and len(case_ids) != len(reports):
            raise ValueError(f"got {len(reports)} reports but {len(case_ids)} case ids.")
        texts, present = self.clean_reports(reports, case_ids, strict)
        # Never exceed what the tokenizer (i.e. the text encoder's position table) allows.
        limit = min(max_length or self.max_length, getattr(self.tokenizer, "model_max_length", None) or 10**9)
        encoded = self.tokenizer(
            texts,
            padding=padding,
            truncation=True,
            max_length=limit,
            return_token_type_ids=False,
            return_tensors=return_tensors,
        )
        out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if return_tensors == "pt":
            import torch

            out["report_present"] = torch.tensor(present, dtype=torch.bool)
        else:
            out["report_present"] = np.asarray(present, dtype=bool)
        return out

    # ---- RNA ----------------------------------------------------------------------------------
    def process_rna(self, rna: Sequence, case_ids=None, return_tensors="pt") -> dict:
        """Profiles (Series / dict / path / None) -> rna_bins [B,G], rna_mask [B,G], rna_present [B]."""
        if self.gene_processor is None:
            raise ValueError("this MStarProcessor has no gene vocabulary (gene_vocab), so it cannot process RNA.")
        out = self.gene_processor.batch(list(rna), case_ids)
        if return_tensors == "pt":
            import torch

            out = {k: torch.from_numpy(v) for k, v in out.items()}
        return out

    # ---- all ----------------------------------------------------------------------------------
    def __call__(self, text=None, rna=None, images=None, case_ids=None, strict: bool | None = None,
                 return_tensors="pt", max_length: int | None = None, **kwargs) -> BatchFeature:
        """Process any of `text` (reports), `rna` (profiles) and `images` (patches) of a batch.

        `case_ids` name the cases in error messages. Extra kwargs go to the image processor.
        """
        if text is None and rna is None and images is None:
            raise ValueError("MStarProcessor needs at least one of text, rna or images.")
        data = {}
        if text is not None:
            data.update(self.tokenize_reports(text, case_ids, strict, max_length, return_tensors=return_tensors))
        if rna is not None:
            if not isinstance(rna, (list, tuple)):
                rna = [rna]  # a single profile (Series, dict or path)
            data.update(self.process_rna(rna, case_ids, return_tensors=return_tensors))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data=data)


__all__ = ["MStarProcessor", "is_missing_report"]
