"""`python -m moefuse.train CONFIG [overrides]`, the form `accelerate launch -m moefuse.train ...` uses."""

import sys

from moefuse.train.run import main

sys.exit(main())
