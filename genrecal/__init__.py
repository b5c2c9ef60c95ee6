"""GenRecal core: family adapters, the Recalibrator, GenRecal's losses, head scoring and the three stages."""

__version__ = "0.1.0"
