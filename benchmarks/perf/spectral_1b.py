"""Per-tensor time and exactness of tsv, iso_c, iso_cts (and wudi) on the 1.1B Llama shapes.

Reads one weight of each shape from the perf benchmark's bf16 models (``make_models.py``:
base + 3 fine-tunes in ``benchmarks/.cache/models``), runs each method on it with one
intra-op thread (as each engine worker does), and compares the merged task matrix with a
float64 reference: a transcription of the published algorithm on full float64 LAPACK SVDs
(``--reference``; slow on the large shapes; not for ``wudi``, whose golden tests check it).
Prints one Markdown row per (method, tensor).

    .venv/bin/python benchmarks/perf/spectral_1b.py [--methods tsv,iso_c,iso_cts]
        [--tensors q,k,gate,down,lm_head] [--reference] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from taskvec.engine import intra_op_threads
from taskvec.methods.registry import get_method

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "benchmarks" / ".cache" / "models"
LAYER = "model.layers.0."
TENSORS = {
    "q": LAYER + "self_attn.q_proj.weight",
    "k": LAYER + "self_attn.k_proj.weight",
    "gate": LAYER + "mlp.gate_proj.weight",
    "down": LAYER + "mlp.down_proj.weight",
    "lm_head": "lm_head.weight",
}
PER_MODEL = {"q": 44, "k": 44, "gate": 44, "down": 22, "lm_head": 1}  # q/o, k/v, gate/up, down


def load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, stacked fine-tunes) of one tensor, as float32 (the engine's working dtype)."""

    def read(model: str) -> torch.Tensor:
        index = json.loads((MODELS / model / "model.safetensors.index.json").read_text())
        path = MODELS / model / index["weight_map"][name]
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(name).float()

    return read("base"), torch.stack([read(f"ft{i}") for i in (1, 2, 3)])


def polar64(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def reference(method: str, taus: torch.Tensor) -> torch.Tensor:
    """The published algorithms on float64 full SVDs (methods.md §2.11, §2.12)."""
    t, m, n = taus.shape
    r = min(m, n)
    if method == "iso_c":
        u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
        return s.mean() * u @ vh
    if method == "tsv":
        k = r // t
        svds = [torch.linalg.svd(tau, full_matrices=False) for tau in taus]
        u = torch.cat([x[0][:, :k] for x in svds], 1)
        s = torch.cat([x[1][:k] for x in svds])
        vh = torch.cat([x[2][:k] for x in svds])
        return (polar64(u) * s) @ polar64(vh.mT).mT
    common = r - round((r - int(0.8 * r)) / t) * t
    per = (r - common) // t
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    uc = u[:, :common]
    us, ss, vs = [uc], [s[:common]], [vh[:common]]
    for tau in taus:
        ui, si, vhi = torch.linalg.svd(tau - uc @ (uc.mT @ tau), full_matrices=False)
        us.append(ui[:, :per])
        ss.append(si[:per])
        vs.append(vhi[:per])
    sigma = torch.cat(ss).sum() / r
    return sigma * polar64(torch.cat(us, 1)) @ polar64(torch.cat(vs).mT).mT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="tsv,iso_c,iso_cts")
    ap.add_argument("--tensors", default="q,k,gate,down,lm_head")
    ap.add_argument("--reference", action="store_true", help="compare with float64 SVDs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    with intra_op_threads(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    print("| method | tensor | shape | wall s | CPU s | CPU s × count | rel. error vs float64 |")
    print("|---|---|---|---:|---:|---:|---:|")
    totals: dict[str, float] = {}
    for key in args.tensors.split(","):
        name = TENSORS[key]
        base, xs = load(name)
        for method in args.methods.split(","):
            spec = get_method(method)
            start, cpu = time.perf_counter(), time.process_time()
            delta = spec.fn(xs.clone(), base.clone(), name=name, **spec.globals) - base
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            totals[method] = totals.get(method, 0.0) + cpu * PER_MODEL[key]
            err = ""
            if args.reference and method != "wudi":
                want = reference(method, (xs - base).double())
                err = f"{float((delta.double() - want).norm() / want.norm()):.1e}"
            shape = "×".join(map(str, base.shape))
            times = [f"{seconds:.2f}", f"{cpu:.2f}", f"{cpu * PER_MODEL[key]:.0f}"]
            cells = [method, key, shape, *times]
            print(f"| {' | '.join([*cells, err])} |", flush=True)
    for method, total in totals.items():
        print(f"{method}: {total:.0f} CPU s for the tensors' whole-model counts")


if __name__ == "__main__":
    main()
