"""The block-level model interface shared by the methods that run forward passes (FDA now).

A :class:`BlockModel` reads a Hugging Face config, lists the model's residual blocks and runs
one block functionally on given inputs with given parameters (``torch.func.functional_call``),
so a method can evaluate θ0, an expert or a candidate merge of a block without materialising
the model. Only the block being worked on is ever instantiated (the rest of the architecture
is built on the ``meta`` device, which allocates nothing).

Supported families (``model_type`` in the config):

- encoders — ``bert`` (MiniLM too), ``roberta``, ``xlm-roberta``: ``encoder.layer.<i>``, input
  (anchors, tokens, hidden), no attention mask (every token attends to every token);
- ``vit``: ``layers.<i>`` (``encoder.layer.<i>`` before transformers 5), input (anchors,
  tokens, hidden);
- Llama-style decoders — ``llama``, ``mistral``, ``qwen2``: only the MLP of each layer,
  ``layers.<i>.mlp``, input (anchors, hidden) (no sequence dimension), as FDA does for decoders.

Block parameter names are relative to the block (``attention.self.query.weight``); a block's
:meth:`Block.checkpoint_names` maps them to the checkpoint's names, whatever prefix the
checkpoint uses (``bert.``, ``model.``, or none).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from taskvec.errors import IncompatibleError, NumericError
from taskvec.forward import transformers_module

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks and what a block's input looks like."""

    name: str
    blocks: tuple[str, ...]  # module paths the block list may have (transformers versions differ)
    inner: str  # sub-module of each list entry that is the block ('' = the entry itself)
    has_tokens: bool  # inputs are (anchors, tokens, hidden); else (anchors, hidden)
    default_tokens: int


_ENCODER = Family("encoder", ("encoder.layer",), "", True, 5)
_VIT = Family("vit", ("layers", "encoder.layer"), "", True, 5)  # transformers 5 / 4 names
_DECODER_MLP = Family("decoder-mlp", ("layers",), "mlp", False, 1)
FAMILIES: dict[str, Family] = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "xlm-roberta": _ENCODER,
    "vit": _VIT,
    "llama": _DECODER_MLP,
    "mistral": _DECODER_MLP,
    "qwen2": _DECODER_MLP,
}


@dataclass(frozen=True)
class Block:
    """One residual block of a model: its module (no weights of its own) and its names."""

    index: int
    path: str  # module path in AutoModel's model, e.g. 'encoder.layer.3'
    module: torch.nn.Module
    family: Family
    hidden: int
    checkpoint_path: str  # the block's prefix in the checkpoint, e.g. 'bert.encoder.layer.3'

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def parameter_names(self) -> list[str]:
        return [n for n, _ in self.module.named_parameters()]

    def checkpoint_names(self) -> dict[str, str]:
        """Block parameter name → tensor name in the checkpoint."""
        return {n: f"{self.checkpoint_path}.{n}" for n in self.parameter_names}

    def input_shape(self, anchors: int, tokens: int | None = None) -> tuple[int, ...]:
        if not self.family.has_tokens:
            return (anchors, self.hidden)
        return (anchors, tokens or self.family.default_tokens, self.hidden)

    def forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The block's output on ``x`` with parameters ``params`` (differentiable in both)."""
        out = functional_call(self.module, dict(params), (x,))
        return out[0] if isinstance(out, tuple) else out

    def read(
        self, model: Any, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Params:
        """This block's parameters from a lazy :class:`taskvec.Model` (or a state dict)."""
        get = model.__getitem__ if isinstance(model, Mapping) else model.tensor
        params = {n: get(c).to(device, dtype) for n, c in self.checkpoint_names().items()}
        for n, p in params.items():
            if not bool(torch.isfinite(p).all()):
                raise NumericError(f"block {self.index}: tensor {n!r} holds NaN or Inf")
        return params


class BlockModel:
    """The blocks of one architecture (from a config), mapped onto one checkpoint's names."""

    def __init__(self, config: Mapping[str, Any], checkpoint_names: Sequence[str]) -> None:
        model_type = str(config.get("model_type", ""))
        if model_type not in FAMILIES:
            raise IncompatibleError(
                f"model type {model_type!r} has no block interface; supported: "
                f"{', '.join(sorted(FAMILIES))}"
            )
        self.family = FAMILIES[model_type]
        self.config = dict(config)
        tf = transformers_module()
        hf_config = _hf_config(tf, config)
        hf_config._attn_implementation = "eager"  # double back-prop needs plain math attention
        with torch.device("meta"):
            skeleton = tf.AutoModel.from_config(hf_config)
        self._skeleton = skeleton
        self.hidden = int(hf_config.hidden_size)
        self._layers = next(p for p in self.family.blocks if _has(skeleton, p))
        self.num_blocks = len(skeleton.get_submodule(self._layers))
        self._names = set(checkpoint_names)
        self.prefix, self._checkpoint_layers = self._find_prefix()

    def _find_prefix(self) -> tuple[str, str]:
        """(prefix, block-list path) of the checkpoint's names: any of the family's paths, under
        any prefix (``bert.``, ``model.``...)."""
        first = self.block_path(0)
        probe = next(n for n, _ in self._skeleton.get_submodule(first).named_parameters())
        for layers in self.family.blocks:
            want = f"{self._path(layers, 0)}.{probe}"
            hits = [n[: -len(want)] for n in self._names if n == want or n.endswith("." + want)]
            if len(hits) > 1:
                raise IncompatibleError(f"the checkpoint has several tensors named like {want!r}")
            if hits:
                return hits[0], layers
        raise IncompatibleError(
            f"the checkpoint has no tensor named like {first}.{probe}; it does not match its "
            "config's architecture"
        )

    def _path(self, layers: str, index: int) -> str:
        inner = f".{self.family.inner}" if self.family.inner else ""
        return f"{layers}.{index}{inner}"

    def block_path(self, index: int) -> str:
        return self._path(self._layers, index)

    def block(self, index: int, device: torch.device | str = "cpu") -> Block:
        """Block ``index`` with an empty (uninitialised) module on ``device``, checked against
        the checkpoint's names."""
        if not 0 <= index < self.num_blocks:
            raise IncompatibleError(f"block {index} out of range: the model has {self.num_blocks}")
        path = self.block_path(index)
        module = self._skeleton.get_submodule(path).to_empty(device=device).eval()
        checkpoint_path = self.prefix + self._path(self._checkpoint_layers, index)
        block = Block(index, path, module, self.family, self.hidden, checkpoint_path)
        missing = [c for c in block.checkpoint_names().values() if c not in self._names]
        if missing:
            raise IncompatibleError(
                f"block {index}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}"
            )
        return block

    @property
    def indices(self) -> range:
        return range(self.num_blocks)

    def pick(self, blocks: Sequence[int] | None) -> list[int]:
        """``blocks`` (all when None), checked in full before any work starts."""
        if blocks is None:
            return list(self.indices)
        bad = [b for b in blocks if b not in self.indices]
        if bad:
            raise IncompatibleError(f"block {bad[0]} out of range: the model has {self.num_blocks}")
        return list(dict.fromkeys(blocks))

    @property
    def blocks(self) -> list[Block]:
        return [self.block(i) for i in range(self.num_blocks)]

    def block_tensor_names(self) -> set[str]:
        """Checkpoint names of every block parameter (what FDA may change)."""
        return {c for b in self.blocks for c in b.checkpoint_names().values()}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> BlockModel:
        """The block model of a Hugging Face folder (its config.json and tensor names)."""
        from taskvec.io.checkpoint import open_checkpoint

        ckpt = open_checkpoint(path)
        if ckpt.config is None:
            raise IncompatibleError(f"{path}: no config.json, so no architecture to run blocks of")
        return cls(ckpt.config, list(ckpt.tensors))


def _hf_config(tf: Any, config: Mapping[str, Any]) -> Any:
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    return tf.AutoConfig.for_model(str(config["model_type"]), **fields)


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True
