#!/usr/bin/env python
"""mSTAR Stage 2: self-taught training of the patch encoder (the frozen Stage 1 aggregator teaches it).

    accelerate launch training/stage2.py --help

The body lives in the package (`mstar_hf.training_utils.stage2`), so `mstar-hf demo`, the tests and an
installed wheel run exactly this entry point. Arguments: `--help`, or one JSON file with all of them.
"""

import sys

from mstar_hf.training_utils.stage2 import main

if __name__ == "__main__":
    sys.exit(main())
