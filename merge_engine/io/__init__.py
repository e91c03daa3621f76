"""Checkpoint I/O: lazy header-first reads of Hugging Face folders and streaming sharded writes."""
from merge_engine.io.checkpoint import Checkpoint, split_layer_name
from merge_engine.io.safetensors_format import TensorInfo
from merge_engine.io.writer import ShardedWriter

__all__ = ["Checkpoint", "TensorInfo", "ShardedWriter", "split_layer_name"]
