"""The cache inside your own training loop: `CacheDataset`, `collate`, `MFTLoss`, `MFTTrainer` (docs/HF.md)."""
from mft_cache.trainer.hf import CacheDataset, CacheOrderSampler, MFTLoss, MFTTrainer, collate

__all__ = ["CacheDataset", "CacheOrderSampler", "MFTLoss", "MFTTrainer", "collate"]
