"""Check FDA's CUDA path: construct anchors and adapt a tiny BERT on the CPU and on CUDA with the
same settings, and compare (alignment reached, anchors, adapted parameters), plus time a
MiniLM-sized block on both devices.

    PYTHONPATH=src python3 benchmarks/device/fda_on_cuda.py --out fda-on-cuda.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from taskvec.fda.adapt import AdaptSettings, adapt_coefficients, adapt_parameters, targets
from taskvec.fda.anchors import AnchorSettings, construct_block
from taskvec.fda.blocks import BlockModel


def family(hidden: int, inter: int, heads: int, experts: int) -> tuple[BlockModel, dict, list]:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_hidden_layers=1,
        vocab_size=64,
        max_position_embeddings=64,
    )
    sd = {k: v.detach().clone() for k, v in BertModel(cfg).state_dict().items()}
    fts = [{k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()} for _ in range(experts)]
    return BlockModel(cfg.to_dict(), list(sd)), sd, fts


def run(device: str, bm: BlockModel, sd: dict, fts: list, settings: AnchorSettings) -> dict:
    block = bm.block(0, device)
    theta0 = block.read(sd, device=device)
    experts = [block.read(f, device=device) for f in fts]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    made = construct_block(block, theta0, experts, [f"t{i}" for i in range(len(fts))], settings)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    target = targets(block, experts, made)
    quick = AdaptSettings(epochs=3)
    full = adapt_parameters(block, theta0, made, target, quick)
    tau = [{n: e[n] - theta0[n] for n in theta0} for e in experts]
    coef = adapt_coefficients(block, theta0, tau, 0.3, made, target, quick)
    return {
        "seconds": seconds,
        "alignment": made.alignment,
        "anchors": made.anchors.cpu(),
        "full": {n: v.cpu() for n, v in full.items()},
        "coef": {n: v.cpu() for n, v in coef.items()},
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("fda-on-cuda.json"))
    args = ap.parse_args()
    report: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    bm, sd, fts = family(32, 64, 4, 2)
    s = AnchorSettings(anchors=8, tokens=4, steps=20)
    cpu, gpu = run("cpu", bm, sd, fts, s), run("cuda", bm, sd, fts, s)
    report["tiny"] = {
        "alignment_cpu": cpu["alignment"],
        "alignment_cuda": gpu["alignment"],
        "anchors_rel": rel(gpu["anchors"], cpu["anchors"]),
        "adapt_params_rel": max(rel(gpu["full"][n], cpu["full"][n]) for n in cpu["full"]),
        "adapt_coef_rel": max(rel(gpu["coef"][n], cpu["coef"][n]) for n in cpu["coef"]),
    }
    bm, sd, fts = family(384, 1536, 12, 6)  # a MiniLM block, 6 experts, 64 anchors × 5 tokens
    s = AnchorSettings(anchors=64, steps=10)
    report["minilm_block_10_steps_seconds"] = {
        d: run(d, bm, sd, fts, s)["seconds"] for d in ("cpu", "cuda")
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
