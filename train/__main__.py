"""`python -m train [stage1|stage2|all] CONFIG [key=value ...] [--resume] [--full]`.

The stage given here overrides the recipe's `stage:`. Exit codes: 0 done; 1 the run stopped (a NaN/inf
loss); 2 a bad config or command line (one line on stderr).
"""

import sys

from .cli import main

sys.exit(main())
