"""A lazy model expression read as a checkpoint: how a merge takes a saved task vector.

In a merge config, a task vector saved with :meth:`~taskvec.algebra.TaskVector.save` stands for
the model ``base + τ``, and every method sees that model as its input. :class:`ModelView` shows
such an expression to the planner and the engine through the :class:`Checkpoint` interface:
the expression's tensor names, shapes and native dtypes (the base's), and reads of a tensor or
of its rows that evaluate the expression (base rows + τ rows, in float32, or float64 if an input
is float64; a tensor τ lacks is the base's). Config and side files are the base's.

A view computes its tensors rather than reading its files: it has no content fingerprint of its
own (:attr:`Checkpoint.derived`), and :attr:`sources` are the checkpoints it reads, which is
what checks on inputs (fingerprints, an output replacing an input) must look at.
"""

from __future__ import annotations

from pathlib import Path

import torch

from taskvec.algebra import Model
from taskvec.errors import CheckpointError
from taskvec.io.checkpoint import Checkpoint, TensorInfo


class ModelView(Checkpoint):
    """``model`` (an expression) read as a checkpoint named ``path``."""

    derived = True

    def __init__(self, model: Model, path: Path) -> None:  # no super().__init__: no file
        primary = model.primary
        self.model = model
        self.path = path
        self.root = primary.root
        self.sources = model._leaves()
        self._files = []
        self._by_name = {}
        self._infos = {
            name: TensorInfo(name, spec.shape, spec.dtype, primary.tensors[name].file)
            for name, spec in model.specs.items()
        }

    @property
    def files(self) -> list[Path]:
        return [f for c in self.sources for f in c.files]

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def side_files(self) -> dict[str, Path]:
        return self.model.primary.side_files()

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self._infos:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        return self.model.tensor(name, rows)

    def __repr__(self) -> str:
        return f"ModelView({self.model!r})"
