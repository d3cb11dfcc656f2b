"""Run a twin folder: θ(x) = θ* + Σₜ wₜ(x) vₜ for each input x, w = softmax(router(x))
(Lu et al., Twin-Merging, NeurIPS 2024, arXiv 2406.15479).

No per-input model is materialised. Forward hooks on the Hugging Face model holding θ* add the
routed exclusive knowledge to each module's output, input by input (row b of the batch):

* ``nn.Linear``: y_b += Σₜ wₜ[b] (x_b Aₜᵀ) Bₜᵀ + Σₜ wₜ[b] Δbiasₜ (a weighted LoRA term);
* ``nn.Embedding``: e_b += Σₜ wₜ[b] Bₜ[ids_b] Aₜ;
* any other module with exclusive parameters (norms): recomputed row by row with
  ``functional_call`` at its routed parameters (exact, and these modules are small).

Routing itself is a pass of θ* alone (the mean-pooled last hidden state, as at training).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.func import functional_call

from taskvec.bench.encoder import pooled
from taskvec.errors import CheckpointError
from taskvec.forward import Head, checkpoint_names
from taskvec.forward import load_model as load_hf
from taskvec.twin.build import FACTORS, INFO, ROUTER
from taskvec.twin.router import Router


@dataclass(frozen=True)
class Exclusive:
    """vₜ of one parameter for every task: low-rank (B: (T, m, k), A: (T, k, n)) or whole
    (full: (T, ...))."""

    b: torch.Tensor | None = None
    a: torch.Tensor | None = None
    full: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """(T, ...) dense vₜ (for modules recomputed row by row, and for tests)."""
        if self.full is not None:
            return self.full
        assert self.b is not None and self.a is not None
        return self.b @ self.a

    def mixed(self, w: torch.Tensor) -> torch.Tensor:
        """Σₜ wₜ vₜ for one routing row ``w`` (T,)."""
        return torch.tensordot(w.to(self.dense().dtype), self.dense(), dims=1)


def stacked(factors: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, Exclusive]:
    """Checkpoint tensor name → :class:`Exclusive` stacked over ``tasks`` in order."""
    names = {k.split("/", 1)[1].removesuffix(":A").removesuffix(":B") for k in factors}
    out = {}
    for n in names:
        if f"{tasks[0]}/{n}" in factors:
            out[n] = Exclusive(full=torch.stack([factors[f"{t}/{n}"] for t in tasks]))
        else:
            b = torch.stack([factors[f"{t}/{n}:B"] for t in tasks])
            out[n] = Exclusive(b=b, a=torch.stack([factors[f"{t}/{n}:A"] for t in tasks]))
    return out


class DynamicModel:
    """A Hugging Face model holding θ*, its router and the stacked exclusive knowledge of each
    of its parameters (keyed by the model's own parameter names)."""

    def __init__(
        self, model: torch.nn.Module, router: Router, exclusive: dict[str, Exclusive]
    ) -> None:
        self.model, self.router, self.exclusive = model, router, exclusive
        self._w: torch.Tensor | None = None
        self._busy: set[torch.nn.Module] = set()
        hooks = (self._hook(name, m) for name, m in model.named_modules())
        self._hooks = [h for h in hooks if h is not None]

    @classmethod
    def load(cls, folder: str | os.PathLike[str], head: Head = "base") -> DynamicModel:
        """The twin folder written by :func:`~taskvec.twin.build.build_twin`, with ``head``."""
        path = Path(folder)
        try:
            info = json.loads((path / INFO).read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a twin folder (no readable {INFO})") from None
        tasks = list(info["tasks"])
        router = Router(int(info["hidden"]), len(tasks))
        router.load_state_dict(load_file(str(path / ROUTER)))
        model = load_hf(path, head=head)
        by_ckpt = stacked(load_file(str(path / FACTORS)), tasks)
        names = checkpoint_names(model, by_ckpt)
        return cls(model, router.eval(), {p: by_ckpt[c] for p, c in names.items()})

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Routing weights (B, T) from θ*'s mean-pooled last hidden state."""
        base = getattr(self.model, "base_model", self.model)
        return self.router.weights(pooled(base, input_ids, attention_mask))

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The wrapped model's output for the batch, input b at θ* + Σₜ weights[b, t] vₜ
        (``weights`` default: :meth:`route`)."""
        w = self.route(input_ids, attention_mask) if weights is None else weights
        with self.routed(w):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @contextmanager
    def routed(self, weights: torch.Tensor) -> Iterator[None]:
        """Within the block the model runs row b of a batch at θ* + Σₜ weights[b, t] vₜ."""
        before, self._w = self._w, weights.float()
        try:
            yield
        finally:
            self._w = before

    def _hook(self, name: str, module: torch.nn.Module) -> Any:
        prefix = f"{name}." if name else ""
        found = {
            p: self.exclusive.get(prefix + p) for p, _ in module.named_parameters(recurse=False)
        }
        own = {p: e for p, e in found.items() if e is not None}
        if not own:
            return None
        if isinstance(module, torch.nn.Linear):
            return module.register_forward_hook(lambda m, args, y: self._linear(own, args[0], y))
        if isinstance(module, torch.nn.Embedding):
            return module.register_forward_hook(lambda m, args, y: self._embed(own, args[0], y))
        return module.register_forward_hook(
            lambda m, args, kwargs, y: self._rowwise(m, own, args, kwargs, y), with_kwargs=True
        )

    def _linear(self, own: dict[str, Exclusive], x: torch.Tensor, y: torch.Tensor) -> Any:
        if self._w is None:
            return None
        w, out = self._w, y.clone()
        flat_x, flat_y = (
            x.reshape(x.shape[0], -1, x.shape[-1]),
            out.view(y.shape[0], -1, y.shape[-1]),
        )
        weight = own.get("weight")
        if weight is not None:
            u = torch.einsum("bln,tkn->btlk", flat_x.float(), weight.a) * w[:, :, None, None]
            flat_y += torch.einsum("btlk,tmk->blm", u, weight.b).to(y.dtype)
        bias = own.get("bias")
        if bias is not None:
            flat_y += (w @ bias.dense())[:, None, :].to(y.dtype)
        return out

    def _embed(self, own: dict[str, Exclusive], ids: torch.Tensor, y: torch.Tensor) -> Any:
        if self._w is None:
            return None
        e = own["weight"]
        assert e.b is not None and e.a is not None  # a 2-D tensor is stored as factors
        delta = torch.einsum("tblk,tkd,bt->bld", e.b[:, ids], e.a, self._w)
        return y + delta.to(y.dtype)

    def _rowwise(
        self,
        module: torch.nn.Module,
        own: dict[str, Exclusive],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        y: torch.Tensor,
    ) -> Any:
        if self._w is None or module in self._busy:
            return None
        w, rows = self._w, []
        for b in range(w.shape[0]):
            params = {
                p: getattr(module, p) + e.mixed(w[b]).to(getattr(module, p).dtype)
                for p, e in own.items()
            }
            row_args = tuple(a[b : b + 1] if torch.is_tensor(a) else a for a in args)
            self._busy.add(module)
            try:
                with self.routed(w[b : b + 1]):
                    rows.append(functional_call(module, params, row_args, kwargs))
            finally:
                self._busy.discard(module)
        return torch.cat(rows)
