"""CUDA check and per-matrix timings of tsv / iso_c / iso_cts / wudi (run on a GPU machine).

1. Agreement: each method on the same random low-rank-plus-noise problems on CPU and on CUDA
   (float32 matrices above SMALL_NUMEL and float64-sized small ones).
2. Timings per weight shape of a 1.1B Llama (hidden 2048, intermediate 5632, 4 KV heads of 64,
   vocab 32000, 22 layers) and of MiniLM, 3 experts, and the projected whole-model time.
3. WUDI: the Gram-space optimiser against the reference loop (autograd + torch.optim.Adam on
   the loss as written) on one matrix, same device.

    PYTHONPATH=src python3 benchmarks/perf/spectral_gpu_check.py [--device cuda] [--small]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from pathlib import Path

import torch

if importlib.util.find_spec("pydantic") is None:  # GPU image: load the methods without the
    pkg = types.ModuleType("taskvec")  # config layer (taskvec/__init__ imports pydantic)
    pkg.__path__ = [str(Path(__file__).resolve().parents[2] / "src" / "taskvec")]
    sys.modules["taskvec"] = pkg

from taskvec.methods import get_method  # noqa: E402

METHODS = ["tsv", "iso_c", "iso_cts", "wudi"]
LLAMA = {"q_proj/o_proj": (2048, 2048, 2), "k_proj/v_proj": (256, 2048, 2)}
LLAMA |= {"gate_proj/up_proj": (5632, 2048, 2), "down_proj": (2048, 5632, 1)}
LLAMA_HEAD = (32000, 2048)
MINILM = {"q/k/v/o": (384, 384, 4), "intermediate": (1536, 384, 1), "output": (384, 1536, 1)}


def problem(shape, n=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    m, k = shape
    base = torch.randn(m, k, generator=g)
    taus = [
        (
            torch.randn(m, 16, generator=g) @ torch.randn(16, k, generator=g) / 4
            + 0.3 * torch.randn(m, k, generator=g)
        )
        * 0.01
        for _ in range(n)
    ]
    return (base + torch.stack(taus)).to(device), base.to(device)


def run(name, xs, base, **params):
    m = get_method(name)
    return m.fn(xs, base, **{**m.globals, **params})


def timed(name, xs, base, device, **params):
    run(name, xs[:, :64, :64].contiguous(), base[:64, :64].contiguous(), **params)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = run(name, xs, base, **params)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def reference_wudi(xs, base, steps=300):
    tvs = xs - base
    merged = torch.nn.Parameter(tvs.sum(0))
    opt = torch.optim.Adam([merged], lr=1e-5, weight_decay=0)
    norms = tvs.reshape(tvs.shape[0], -1).norm(dim=-1).square()
    for _ in range(steps):
        loss = (((merged[None] - tvs) @ tvs.mT).square() / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base + merged.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test)")
    args = ap.parse_args()
    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 products, as on CPU
    print(
        f"device {dev}: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, "
        f"torch {torch.__version__}"
    )

    print("\n## CPU vs device agreement (max |Δ| / max |θ − θ₀|)")
    for shape in [(40, 30), (600, 300)]:
        xs, base = problem(shape, seed=1)
        for name in METHODS:
            cpu = run(name, xs, base)
            got = run(name, xs.to(dev), base.to(dev)).cpu()
            rel = float((got - cpu).abs().max() / (cpu - base).abs().max())
            print(f"{name:8s} {shape}: {rel:.1e}")

    llama = (
        {k: (8 * (a > 300) + 8, 16, c) for k, (a, b, c) in LLAMA.items()} if args.small else LLAMA
    )
    minilm = {k: (a // 8, b // 8, c) for k, (a, b, c) in MINILM.items()} if args.small else MINILM
    head = (64, 16) if args.small else LLAMA_HEAD
    for label, shapes, layers in [
        ("MiniLM (6 layers)", minilm, 6),
        ("Llama 1.1B (22 layers)", llama, 22),
    ]:
        print(f"\n## {label}: seconds per matrix, 3 experts")
        print("| shape | " + " | ".join(METHODS) + " |")
        print("|---|" + "---|" * len(METHODS))
        totals = dict.fromkeys(METHODS, 0.0)
        for key, (m, k, count) in shapes.items():
            xs, base = problem((m, k), device=dev)
            row = []
            for name in METHODS:
                sec, _ = timed(name, xs, base, dev)
                totals[name] += sec * count * layers
                row.append(f"{sec:.3f}")
            print(f"| {key} {m}×{k} | " + " | ".join(row) + " |", flush=True)
            del xs, base
        if "Llama" in label:
            xs, base = problem(head, device=dev)
            row = []
            for name in METHODS:
                sec, _ = timed(name, xs, base, dev)
                totals[name] += sec
                row.append(f"{sec:.3f}")
            print(f"| lm_head {head[0]}×{head[1]} | " + " | ".join(row) + " |", flush=True)
            del xs, base
        print(
            "| **projected 2-D total** | " + " | ".join(f"{totals[n]:.1f}" for n in METHODS) + " |"
        )

    print("\n## WUDI: Gram-space optimiser vs the reference loop (300 steps, same device)")
    for shape in [(1536, 384), (384, 1536)] + ([] if args.small else [(5632, 2048)]):
        xs, base = problem(shape, device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ref = reference_wudi(xs, base)
        if dev == "cuda":
            torch.cuda.synchronize()
        rsec = time.perf_counter() - t
        start = base + (xs - base).sum(0)
        moved = float((ref - start).norm())
        for label, tol in (("exact (step_tol 0)", 0.0), ("windowed (step_tol 0.1)", 0.1)):
            sec, ours = timed("wudi", xs, base, dev, step_tol=tol)
            rel = float((ours - ref).norm()) / moved
            print(
                f"{shape} {label}: {sec:.3f} s, reference {rsec:.3f} s ({rsec / sec:.1f}×); "
                f"‖ours − ref‖ / ‖ref − Σ τ‖ = {rel:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
