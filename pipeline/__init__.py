"""Stage one: the frozen teacher reads the finetuning set once and writes the cache."""
