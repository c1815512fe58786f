"""The compression stage: a recipe from the config, llmcompressor in a child process, a cache."""

from search.compress.cache import CheckpointCache
from search.compress.stage import CompressionFailed, CompressResult, compress

__all__ = ["CheckpointCache", "CompressionFailed", "CompressResult", "compress"]
