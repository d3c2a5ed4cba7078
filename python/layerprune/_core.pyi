"""Type stubs for the compiled module `layerprune._core` (kept honest by mypy.stubtest in tests)."""

import numpy as np
import numpy.typing as npt

__version__: str

# --- allocation (issue 3): owned by rust/src/python/alloc.rs ---

# --- scoring (issue 4): owned by rust/src/python/scoring.rs ---
