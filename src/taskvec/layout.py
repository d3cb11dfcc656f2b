"""Where the layers are: decoding repeated-block names such as ``model.layers.7.mlp.up_proj``.

No architecture tables: the layer prefix is inferred from the names themselves, as the dotted
prefix followed by an integer that covers the most distinct indices (``model.layers.``,
``encoder.layer.``, ``transformer.h.``, ``gpt_neox.layers.``...).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

_NUMBERED = re.compile(r"^(.*?\.)(\d+)\.(.+)$")
_EMBED_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")


@dataclass(frozen=True)
class LayerLayout:
    prefix: str | None
    num_layers: int

    @classmethod
    def infer(cls, names: Iterable[str]) -> LayerLayout:
        seen: dict[str, set[int]] = defaultdict(set)
        for n in names:
            m = _NUMBERED.match(n)
            if m:
                seen[m.group(1)].add(int(m.group(2)))
        if not seen:
            return cls(None, 0)
        prefix = max(seen, key=lambda p: (len(seen[p]), -len(p)))
        return cls(prefix, max(seen[prefix]) + 1)

    def split(self, name: str) -> tuple[int | None, str]:
        """``(layer index, suffix)`` for a layer tensor, ``(None, name)`` otherwise."""
        if self.prefix and name.startswith(self.prefix):
            m = _NUMBERED.match(name)
            if m and m.group(1) == self.prefix:
                return int(m.group(2)), m.group(3)
        return None, name

    def name(self, layer: int, suffix: str) -> str:
        assert self.prefix is not None
        return f"{self.prefix}{layer}.{suffix}"

    @staticmethod
    def is_pre(name: str) -> bool:
        """Non-layer tensors that belong before the layers (embeddings)."""
        return any(h in name for h in _EMBED_HINTS)

    def relative_position(self, layer: int | None, start: int, length: int) -> float:
        """Gradient position of ``layer`` within a slice of ``length`` layers starting at
        ``start``: t = (layer − start) / (length − 1), and t = 1 in a one-layer slice (as in
        mergekit, so a gradient there takes its last value); t = 0 outside the layers."""
        if layer is None:
            return 0.0
        if length <= 1:
            return 1.0
        return (layer - start) / (length - 1)
