"""`python -m saelab ...` (and `torchrun ... -m saelab ...`): the `saelab` command."""

import sys

from saelab.cli import main

sys.exit(main())
