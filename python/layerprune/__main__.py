"""`python -m layerprune` (and `torchrun -m layerprune`) runs the command line."""

import sys

from layerprune.cli import main

sys.exit(main())
