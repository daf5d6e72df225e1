"""Built datasets: the shard format (:mod:`ccat.data.spec`) and reading it back."""

from ccat.data.reader import BuiltDataset, DatasetError, Sample, open_dataset

__all__ = ["BuiltDataset", "DatasetError", "Sample", "open_dataset"]
