#!/usr/bin/env python
"""mSTAR Stage 1: multimodal pretraining of the slide aggregator on precomputed patch features.

    accelerate launch training/stage1.py --manifest cohort/manifest.csv --output_dir runs/stage1 \
        --patch_model_name_or_path converted/mstar-patch --text_model_name_or_path dmis-lab/biobert-base-cased-v1.2

    # DeepSpeed ZeRO-2 (bf16):  accelerate launch --config_file training/configs/accelerate_zero2.yaml training/stage1.py ...
    # resume:                   ... --resume_from_checkpoint latest

Arguments: `python training/stage1.py --help` (or one JSON file with all of them).
"""

import sys

from transformers import HfArgumentParser

from mstar_hf.training_utils.stage1 import (
    Stage1DataArguments,
    Stage1ModelArguments,
    Stage1TrainingArguments,
    run_stage1,
)


def main(argv=None):
    parser = HfArgumentParser((Stage1ModelArguments, Stage1DataArguments, Stage1TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    if not data_args.manifest:
        parser.error("--manifest is required")
    run_stage1(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
