"""DrCT2 feature-cache pipeline: the library (data, encoder, heads, metrics, reports)."""

__version__ = "0.1.0"
