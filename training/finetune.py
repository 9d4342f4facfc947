#!/usr/bin/env python
"""Fine-tune slide-level MIL heads (ABMIL / TransMIL; classification or survival) with cross-validation.

    accelerate launch training/finetune.py --help

The body lives in the package (`mstar_hf.training_utils.finetune`), so `mstar-hf demo`, the tests and an
installed wheel run exactly this entry point. Arguments: `--help`, or one JSON file with all of them.
"""

import sys

from mstar_hf.training_utils.finetune import main

if __name__ == "__main__":
    sys.exit(main())
