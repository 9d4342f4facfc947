#!/usr/bin/env python
"""Train MStarForReportGeneration on (patch-feature h5, report) pairs of a cohort manifest.

    accelerate launch training/report_generation.py --help

The body lives in the package (`mstar_hf.training_utils.report_generation`), so `mstar-hf demo`, the tests and an
installed wheel run exactly this entry point. Arguments: `--help`, or one JSON file with all of them.
"""

import sys

from mstar_hf.training_utils.report_generation import main

if __name__ == "__main__":
    sys.exit(main())
