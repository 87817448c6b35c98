"""Stage two: minifinetuning from the cache."""
