"""Generate synthetic Llama-shaped bf16 checkpoints for the performance benchmark.

Writes a base model and N "fine-tunes" (base + structured noise) as Hugging Face
``save_pretrained``-style folders: sharded ``model-0000i-of-0000n.safetensors`` files,
``model.safetensors.index.json`` and a ``config.json`` for ``LlamaForCausalLM``.

Generation streams tensor by tensor: each tensor of the base is drawn once, written,
and each fine-tune's version is derived from it and written straight into that model's
shard. The safetensors headers are computed up front from the shapes, so no shard is
ever buffered in RAM (peak memory is a few copies of the largest tensor).

Everything is seeded per (model, tensor name), so the output is bit-for-bit reproducible.
Finished folders carry a ``.complete`` marker holding the spec; a folder whose marker
matches the requested spec is skipped.

    python benchmarks/perf/make_models.py            # TinyLlama shape, 3 fine-tunes
    python benchmarks/perf/make_models.py --layers 2 --out /tmp/tiny   # quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE.parent / ".cache" / "models"
BF16_BYTES = 2


@dataclass(frozen=True)
class ModelSpec:
    """Shape and noise settings of the synthetic model family."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    finetunes: int = 3
    shard_bytes: int = 1_000_000_000
    seed: int = 1234
    init_std: float = 0.02  # std of the base's matrices
    noise_rel: float = 0.01  # dense noise std, relative to the base tensor's std
    lowrank_rel: float = 0.01  # RMS of the low-rank part, relative to the base tensor's std
    lowrank_rank: int = 8
    norm_noise: float = 0.01  # absolute std of the change to RMSNorm weights
    version: int = 1  # bump when the generator's output changes


def tensor_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in ``LlamaForCausalLM.state_dict()`` order (untied lm_head)."""
    h, i = spec.hidden, spec.intermediate
    head_dim = h // spec.heads
    kv = spec.kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (spec.vocab, h))]
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_shards(
    shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in order, like ``save_pretrained``: start a new shard when full."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = numel(shape) * BF16_BYTES
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The 8-byte length prefix plus the JSON header, padded to 8 bytes, for bf16 data
    laid out contiguously in the given order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = numel(shape) * BF16_BYTES
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def llama_config(spec: ModelSpec) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": spec.hidden // spec.heads,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": spec.init_std,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": spec.vocab,
    }


def model_names(spec: ModelSpec) -> list[str]:
    return ["base"] + [f"ft{k}" for k in range(1, spec.finetunes + 1)]


def _generator(spec: ModelSpec, model_index: int, name: str) -> torch.Generator:
    seed = (spec.seed * 1_000_003 + model_index * 7_919 + zlib.crc32(name.encode())) % (2**63)
    return torch.Generator().manual_seed(seed)


def base_tensor(spec: ModelSpec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 base values: N(0, init_std) matrices; RMSNorm weights near 1."""
    g = _generator(spec, 0, name)
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) == 1:
        return t.mul_(0.05).add_(1.0)
    return t.mul_(spec.init_std)


def finetune_delta(
    spec: ModelSpec, k: int, name: str, shape: tuple[int, ...], base_std: float
) -> torch.Tensor:
    """Task vector of fine-tune ``k``: dense noise N(0, (noise_rel·σ)²) plus a random
    rank-r term with RMS lowrank_rel·σ (σ = the base tensor's std); norms get N(0, norm_noise²)."""
    g = _generator(spec, k, name)
    if len(shape) == 1:
        return torch.randn(shape, generator=g).mul_(spec.norm_noise)
    delta = torch.randn(shape, generator=g).mul_(spec.noise_rel * base_std)
    r = spec.lowrank_rank
    u = torch.randn((shape[0], r), generator=g)
    v = torch.randn((r, shape[1]), generator=g)
    # each entry of u @ v has variance r, so divide by sqrt(r) for unit RMS
    scale = spec.lowrank_rel * base_std / (r**0.5)
    delta.addmm_(u, v, alpha=scale)
    return delta


def _write_bf16(f: BinaryIO, t: torch.Tensor) -> None:
    data = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    f.write(memoryview(data).cast("B"))


def spec_marker(spec: ModelSpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True)


def is_complete(folder: Path, spec: ModelSpec) -> bool:
    marker = folder / ".complete"
    return marker.is_file() and marker.read_text() == spec_marker(spec)


def generate(spec: ModelSpec, out: Path, force: bool = False, quiet: bool = False) -> list[Path]:
    """Create (or reuse) the base and fine-tune folders under ``out``; return their paths."""
    names = model_names(spec)
    folders = [out / n for n in names]
    if not force and all(is_complete(f, spec) for f in folders):
        if not quiet:
            print(f"models already present in {out}", file=sys.stderr)
        return folders
    for f in folders:
        if f.exists():
            shutil.rmtree(f)
        f.mkdir(parents=True)

    shapes = tensor_shapes(spec)
    shards = plan_shards(shapes, spec.shard_bytes)
    n_shards = len(shards)
    shard_files = [f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors" for s in range(n_shards)]
    total_bytes = sum(numel(s) for _, s in shapes) * BF16_BYTES
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": {n: shard_files[s] for s, shard in enumerate(shards) for n, _ in shard},
    }
    config = llama_config(spec)
    for f in folders:
        (f / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (f / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    t0 = time.perf_counter()
    done = 0
    for s, shard in enumerate(shards):
        header = safetensors_header(shard)
        handles = [open(f / shard_files[s], "wb") for f in folders]  # noqa: SIM115
        try:
            for h in handles:
                h.write(header)
            for name, shape in shard:
                base = base_tensor(spec, name, shape)
                _write_bf16(handles[0], base)
                std = float(base.std()) if base.dim() > 1 else 0.0
                for k in range(1, len(folders)):
                    delta = finetune_delta(spec, k, name, shape, std)
                    _write_bf16(handles[k], delta.add_(base))
                    del delta
                done += numel(shape) * BF16_BYTES
                if not quiet and name.endswith("down_proj.weight"):
                    el = time.perf_counter() - t0
                    print(f"{done / total_bytes:6.1%}  {el:6.1f}s  {name}", file=sys.stderr)
        finally:
            for h in handles:
                h.close()
    marker = spec_marker(spec)
    for f in folders:
        (f / ".complete").write_text(marker)
    if not quiet:
        el = time.perf_counter() - t0
        print(
            f"\nwrote {len(folders)} models × {total_bytes / 1e9:.2f} GB in {el:.1f}s to {out}",
            file=sys.stderr,
        )
    return folders


def main(argv: list[str] | None = None) -> int:
    d = ModelSpec()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}")
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--intermediate", type=int, default=d.intermediate)
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--kv-heads", type=int, default=d.kv_heads)
    ap.add_argument("--vocab", type=int, default=d.vocab)
    ap.add_argument("--finetunes", type=int, default=d.finetunes)
    ap.add_argument("--shard-bytes", type=int, default=d.shard_bytes)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--force", action="store_true", help="regenerate even if present")
    a = ap.parse_args(argv)
    spec = ModelSpec(
        hidden=a.hidden,
        intermediate=a.intermediate,
        layers=a.layers,
        heads=a.heads,
        kv_heads=a.kv_heads,
        vocab=a.vocab,
        finetunes=a.finetunes,
        shard_bytes=a.shard_bytes,
        seed=a.seed,
    )
    for f in generate(spec, a.out, force=a.force):
        print(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
