"""Image data: DomainBed-style folders, DomainBed's split, the one image pipeline, the procedural benchmark.

``folders`` lists a ``root/<domain>/<class>/<image>`` folder in DomainBed's
order; ``splits`` draws DomainBed's in/out split; ``images`` decodes and
transforms images (one Dataset, preloading); ``shapes`` writes the demo
benchmark and the demo backbone's pretraining source.
"""

from linft.data.folders import (DOMAINBED_DATASETS, IMG_EXTENSIONS, DomainBedSpec, MultiDomainDataset,
                                file_list_sha256, find_dataset, load_image_folder)
from linft.data.images import (IMAGENET_MEAN, IMAGENET_STD, EvalImages, ImageFiles, decoded_batches,
                               describe_transform, eval_transform, model_input, normalize_uint8, preload_images,
                               train_augmentation)
from linft.data.splits import domain_split_rows, seed_hash, split_indices, split_names

__all__ = [
    "DOMAINBED_DATASETS", "IMG_EXTENSIONS", "DomainBedSpec", "MultiDomainDataset", "file_list_sha256",
    "find_dataset", "load_image_folder", "IMAGENET_MEAN", "IMAGENET_STD", "EvalImages", "ImageFiles",
    "decoded_batches", "describe_transform", "eval_transform", "model_input", "normalize_uint8", "preload_images",
    "train_augmentation", "domain_split_rows", "seed_hash", "split_indices", "split_names",
]
