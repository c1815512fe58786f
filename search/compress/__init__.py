"""The compression stage: a recipe from the config, llmcompressor in a child process, a cache."""

from search.compress.cache import CheckpointCache
from search.compress.stage import CompressionFailed, Compressor, CompressResult, compress

__all__ = ["CheckpointCache", "CompressionFailed", "Compressor", "CompressResult", "compress"]
