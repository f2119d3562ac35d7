"""linft: fine-tuning with very large dropout, from a cached feature file to tables and plots.

Modules
-------
data       DomainBed-style image folders and DomainBed's exact in/out split.
backbones  torchvision ResNet-family backbones, their weights and their φ blocks.
features   ``extract_features`` to a crash-safe HDF5 cache and ``open_cache`` to read it.
"""

__version__ = "0.1.0"

from linft.errors import LinftError  # noqa: E402,F401
