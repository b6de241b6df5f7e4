"""The training data, as :mod:`capsedge.workshop.dataset` reads it (the one reader of labelled
images, shared with export and the benches); import from there."""

from capsedge.workshop.dataset import Dataset, DatasetError, load_images, read_dataset

__all__ = ["Dataset", "DatasetError", "load_images", "read_dataset"]
