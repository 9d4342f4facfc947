#!/usr/bin/env python
"""mSTAR Stage 1: multimodal pretraining of the slide aggregator on precomputed patch features.

    accelerate launch training/stage1.py --manifest cohort/manifest.csv --output_dir runs/stage1 \
        --patch_model_name_or_path converted/mstar-patch --text_model_name_or_path dmis-lab/biobert-base-cased-v1.2

    # DeepSpeed ZeRO-2:  accelerate launch --config_file training/configs/accelerate_zero2.yaml training/stage1.py ...
    # resume:            ... --resume_from_checkpoint latest

The body lives in the package (`mstar_hf.training_utils.stage1`). Arguments: `--help`, or one JSON file.
"""

import sys

from mstar_hf.training_utils.stage1 import main

if __name__ == "__main__":
    sys.exit(main())
