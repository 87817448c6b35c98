"""The cache inside your own training loop: `CacheDataset`, `collate`, `MFTLoss`, `MFTTrainer`, and the cache as a
`datasets.Dataset` (`cache_dataset`) (docs/HF.md)."""
from mft_cache.trainer.hf import CacheDataset, CacheOrderSampler, MFTLoss, MFTTrainer, collate
from mft_cache.trainer.hf_dataset import cache_dataset

__all__ = ["CacheDataset", "CacheOrderSampler", "MFTLoss", "MFTTrainer", "cache_dataset", "collate"]
