"""DrCT2 feature-cache pipeline: the library (data, encoder, heads, metrics, reports)."""

# One version for the distribution, the one every feature cache records (cache/provenance.py).
from cache.provenance import SOFTWARE_VERSION as __version__

__all__ = ["__version__"]
