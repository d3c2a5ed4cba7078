"""`python -m layerprune.cli` runs the command line."""

import sys

from layerprune.cli import main

sys.exit(main())
