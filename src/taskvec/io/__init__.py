"""Checkpoint I/O: lazy readers and an atomic, streaming sharded writer. No math here."""

from taskvec.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from taskvec.io.dtypes import parse_dtype
from taskvec.io.writer import CheckpointWriter, parse_size

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "TensorInfo",
    "open_checkpoint",
    "parse_dtype",
    "parse_size",
]
