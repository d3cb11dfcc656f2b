"""The module type of a tensor, from its name: attention, MLP, embeddings, norms or other.

Name fragments, tried in this order, cover the Hugging Face families (Llama/Mistral/Qwen
``self_attn``/``mlp``, BERT ``attention``/``intermediate``/``output``, GPT-2 ``attn``/``mlp``,
``wte``/``wpe``, ``ln_*``); a tensor matching none is "other" (heads, poolers).
"""

from __future__ import annotations

import re

KINDS = ("attention", "mlp", "embeddings", "norms", "other")

_RULES = [
    ("norms", re.compile(r"(norm|(^|\.)ln(_\w+)?\.)", re.IGNORECASE)),
    ("attention", re.compile(r"(attn|attention|\.(q|k|v|o)_proj\.|\.(query|key|value)\.)")),
    ("mlp", re.compile(r"(mlp|ffn|feed_forward|intermediate|(^|\.)output\.|\.fc\d|experts)")),
    ("embeddings", re.compile(r"(embed|(^|\.)wte\.|(^|\.)wpe\.)")),
]


def module_kind(name: str) -> str:
    """One of :data:`KINDS` for the tensor ``name``."""
    for kind, pattern in _RULES:
        if pattern.search(name):
            return kind
    return "other"
