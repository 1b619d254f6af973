"""`python -m moefuse COMMAND [options]`: the `moefuse` console script, also as `accelerate launch -m moefuse train`."""

import sys

from moefuse.cli import main

sys.exit(main())
