"""The feature cache: pooled φ-block features of a whole dataset in one crash-safe HDF5 file.

``format`` is the file's contract (layout, attributes, provenance, reading);
``extract`` writes it; ``verify`` checks it; ``chunks`` reads what does not fit a memory budget.
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "chunks": ["H5Rows", "open_cache_within"],
    "extract": ["ExtractConfig", "ExtractResult", "cache_attributes", "extract_features"],
    "format": ["CACHE_FORMAT_VERSION", "FeatureCache", "cache_info", "default_cache_path", "open_cache",
               "provenance_sha256"],
    "verify": ["VerifyReport", "verify_cache"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)
