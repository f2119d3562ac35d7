"""Image data: DomainBed-style folders, DomainBed's split, the one image pipeline, the procedural benchmark.

``folders`` lists a ``root/<domain>/<class>/<image>`` folder in DomainBed's
order; ``splits`` draws DomainBed's in/out split; ``images`` decodes and
transforms images (one Dataset, preloading); ``shapes`` writes the demo
benchmark and the demo backbone's pretraining source.
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "folders": ["DOMAINBED_DATASETS", "IMG_EXTENSIONS", "DomainBedSpec", "MultiDomainDataset", "file_list_sha256",
                "find_dataset", "load_image_folder"],
    "images": ["IMAGENET_MEAN", "IMAGENET_STD", "EvalImages", "ImageFiles", "decoded_batches", "describe_transform",
               "eval_transform", "model_input", "normalize_uint8", "preload_images", "train_augmentation"],
    "splits": ["domain_split_rows", "seed_hash", "split_indices", "split_names"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)
