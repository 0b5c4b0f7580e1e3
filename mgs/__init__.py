"""mgs: Momentum-GS large-scene Gaussian splatting, trained block by block."""

__version__ = "0.1.0"
