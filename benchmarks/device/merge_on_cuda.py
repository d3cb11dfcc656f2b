"""Check that every merge method gives the same model with ``device="cuda"`` as on the CPU.

Builds a tiny Llama-shaped base and three fine-tunes (random, seeded), merges them with
every registered method on both devices (same seed: random draws happen on the CPU, so the
masks agree) and compares the outputs tensor by tensor. Run on a machine with a GPU:

    PYTHONPATH=src python3 benchmarks/device/merge_on_cuda.py [--out results.json]

Prints one line per method and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from taskvec import merge
from taskvec.errors import TaskvecError
from taskvec.methods import REQUIRED, all_methods

HIDDEN, LAYERS, VOCAB, INTER = 64, 2, 96, 160
SHAPES = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
for i in range(LAYERS):
    p = f"model.layers.{i}"
    SHAPES |= {
        f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
        f"{p}.mlp.down_proj.weight": (HIDDEN, INTER),
        f"{p}.input_layernorm.weight": (HIDDEN,),
    }
SHAPES["lm_head.weight"] = (VOCAB, HIDDEN)
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": LAYERS,
    "hidden_size": HIDDEN,
}


def make_models(root: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in SHAPES.items()}
    out = {}
    for name in ("base", "ft1", "ft2", "ft3"):
        sd = (
            base
            if name == "base"
            else {k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}
        )
        folder = root / name
        folder.mkdir()
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(CONFIG))
        out[name] = folder
    return out


def config_for(name: str, n: int, models: dict[str, Path]) -> dict[str, Any]:
    m = all_methods()[name]
    per = {k: 1.0 for k, v in m.per_model.items() if v is REQUIRED}
    if "density" in m.per_model:
        per["density"] = 0.5
    if "epsilon" in m.per_model:
        per["epsilon"] = 0.1
    glob = {k: 0.5 for k, v in m.globals.items() if v is REQUIRED}
    cfg: dict[str, Any] = {
        "merge_method": name,
        "models": [{"model": str(models[f"ft{i + 1}"]), "parameters": per} for i in range(n)],
        "parameters": glob,
    }
    if m.base != "unused":
        cfg["base_model"] = str(models["base"])
    return cfg


def run(name: str, models: dict[str, Path], root: Path, other: str) -> dict[str, Any]:
    last = ""
    for n in (3, 2, 1):
        cfg = config_for(name, n, models)
        outs = {}
        try:
            for key, device in (("cpu", "cpu"), ("cuda", other)):
                out = root / f"{name}-{n}-{key}"
                start = time.perf_counter()
                merge(cfg, out, progress=False, random_seed=7, device=device, overwrite=True)
                outs[key] = (
                    load_file(str(out / "model.safetensors")),
                    time.perf_counter() - start,
                )
        except TaskvecError as e:
            last = str(e)
            continue
        worst = 0.0
        for k, a in outs["cpu"][0].items():
            b = outs["cuda"][0][k]
            scale = float(a.abs().max()) or 1.0
            worst = max(worst, float((a - b).abs().max()) / scale)
        return {
            "method": name,
            "models": n,
            "max_rel_diff": worst,
            "cpu_s": outs["cpu"][1],
            "cuda_s": outs["cuda"][1],
            "ok": worst <= 1e-4,
        }
    return {"method": name, "error": last, "ok": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(Path(tmp))
        for name in all_methods():
            row = run(name, models, Path(tmp), args.device)
            rows.append(row)
            diff = row.get("max_rel_diff", math.nan)
            print(
                f"{name:18s} {'ok ' if row['ok'] else 'BAD'} max rel diff {diff:.2e} "
                f"{row.get('error', '')}",
                flush=True,
            )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else args.device
    result = {"device": gpu, "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    bad = [r["method"] for r in rows if not r["ok"]]
    print("all methods agree" if not bad else f"disagree or fail: {', '.join(bad)}")


if __name__ == "__main__":
    main()
