"""mft-cache: minifinetuning from a cached teacher."""
__version__ = "0.1.0"
