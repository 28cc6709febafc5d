"""The HDF5 feature cache: the contract between stage one (extract) and stage two (heads)."""

from cache.store import CacheError, FeatureCache, ScanTable, write_cache

__all__ = ["CacheError", "FeatureCache", "ScanTable", "write_cache"]
