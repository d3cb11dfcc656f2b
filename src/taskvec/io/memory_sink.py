"""An output that stays in memory: the planned tensors as a dict, for merges that are scored
rather than saved (coefficient search re-merges the same inputs many times, never on disk)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from taskvec.io.writer import PlannedTensor


class MemorySink:
    """Receives what the engine computes, like a :class:`~taskvec.io.writer.CheckpointWriter`
    (``write(name, rows, row_start)``), into preallocated tensors: :attr:`tensors`."""

    def __init__(self, planned: Iterable[PlannedTensor]) -> None:
        self.tensors = {p.name: torch.empty(p.shape, dtype=p.dtype) for p in planned}

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Copy ``tensor`` (the whole planned tensor, or rows from ``row_start``) into place."""
        out = self.tensors[name]
        data = tensor.detach().to("cpu")
        if out.dim() == 0:
            out.copy_(data.reshape(()))
            return
        out[row_start : row_start + data.shape[0]].copy_(data)
