"""The feature cache: pooled φ-block features of a whole dataset in one crash-safe HDF5 file.

``format`` is the file's contract (layout, attributes, provenance, reading);
``extract`` writes it; ``verify`` checks it.
"""

from linft.cache.extract import ExtractConfig, ExtractResult, cache_attributes, extract_features
from linft.cache.format import (CACHE_FORMAT_VERSION, FeatureCache, cache_info, default_cache_path, open_cache,
                                provenance_sha256)
from linft.cache.verify import VerifyReport, verify_cache

__all__ = ["ExtractConfig", "ExtractResult", "cache_attributes", "extract_features", "CACHE_FORMAT_VERSION",
           "FeatureCache", "cache_info", "default_cache_path", "open_cache", "provenance_sha256", "VerifyReport",
           "verify_cache"]
