"""linft: fine-tuning with very large dropout, from a cached feature file to tables and plots.

Layers, each importing only from the ones above it in this list:

errors, runtime  the one exception type; device, autocast, determinism, atomic files, progress
data             DomainBed-style folders, DomainBed's split, the one image pipeline, the demo benchmark
models           backbone registry, φ blocks, heads, checkpoints, weight averages, first-order models
cache            the HDF5 feature cache: its format, extraction, verification
protocol         schedule, the grid validator, THE run-record schema, selection on records
analysis         records only: aggregation (tables, 1296 clouds), plots, report
train            linear engine and protocol, fine-tuning runs, ensembles and soups, sweeps, pretraining
interpolation    weight vs representation interpolation and the first-order path, written as records
demo             the whole pipeline on the built-in benchmark
"""

__version__ = "0.2.0"

from linft.errors import LinftError  # noqa: E402,F401
