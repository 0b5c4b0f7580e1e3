"""mgs: Momentum-GS large-scene Gaussian splatting, trained block by block."""

__version__ = "0.1.0"

import os as _os

# torch's idle OpenMP threads otherwise spin and starve the numba rasterizer's threads
# (5-10x slower training on a busy machine); must be set before torch is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
