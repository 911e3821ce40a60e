"""difflab: diffusion models you can read. Train, sample, guide, edit and measure them.

The map of the package is docs/design.md; every equation lives in difflab/core (docs/math.md).
Subpackages are imported on demand (``from difflab.samplers import sample``), so ``import
difflab`` stays cheap.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("difflab")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0.0.0+unknown"
