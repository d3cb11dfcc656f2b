"""Singular spectra of the task vectors' 2-D tensors in sampled layers, and how much the tasks'
dominant subspaces overlap (``taskvec analyze --spectra``).

For each 2-D tensor τ (m × n) of the sampled layers and each task, the Gram matrix of its
smaller side, G = τ τᵀ (m ≤ n) or τᵀ τ, gives the singular values s_i = √λ_i(G) (``eigvalsh``
in float32, far cheaper than an SVD of τ; values below about 3·10⁻⁴ s_1 are not resolved), the
effective rank exp(H(s / Σ s)) (Roy & Vetterli 2007) and the share of ‖τ‖²_F in the top-k
directions. The top-k singular subspace U_t (of the smaller side) comes from a randomized range
finder on G (Halko et al. 2011; q = max(4k, 64) columns, 4 power iterations, a fixed seed; exact
when q reaches the side's dimension), and two tasks' overlap is ‖U_aᵀ U_b‖²_F / k: 1 for the
same subspace, about k / d for unrelated ones (the measure of Task Singular Vectors, Gargiulo
et al. 2025, of whether tasks interfere).

Each tensor is read whole (the largest 2-D tensor of a layer, times the task count, is the
working set) and the tensors run on the thread pool.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from taskvec.analyze.inputs import Inputs
from taskvec.analyze.stream import Block, evaluate
from taskvec.engine import default_threads, parallel_map
from taskvec.fda.analysis import effective_rank, overlap

SPECTRUM_POINTS = 128  # s_i / s_1 kept per tensor and task, for the plot


def sampled_layers(num_layers: int, count: int) -> list[int]:
    """``count`` layers spread evenly from the first to the last."""
    if num_layers == 0 or count <= 0:
        return []
    if count == 1 or num_layers == 1:
        return [num_layers // 2]
    return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x


def top_subspace(gram: torch.Tensor, k: int) -> torch.Tensor:
    """(d, k) orthonormal: the top-k eigenvectors of the PSD ``gram``, randomized (docstring)."""
    d = gram.shape[0]
    q = min(d, max(4 * k, 64))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        u, _, _ = torch.svd_lowrank(gram, q=q, niter=4)
    return u[:, :k]


def tensor_spectra(x: list[torch.Tensor], rank: int) -> dict[str, Any]:
    """Spectra, effective ranks, top-k energy and pairwise overlap of one tensor's task vectors."""
    grams = [_gram(t) for t in x]
    k = min(rank, grams[0].shape[0])
    spectra, eff, energy, bases = [], [], [], []
    for g in grams:
        lam = torch.linalg.eigvalsh(g).flip(0).clamp(min=0)
        s = lam.sqrt()
        spectra.append((s / s[0] if s[0] > 0 else s)[:SPECTRUM_POINTS].tolist())
        eff.append(effective_rank(s) if s[0] > 0 else 0.0)
        energy.append(float(lam[:k].sum() / lam.sum()) if lam.sum() > 0 else 0.0)
        bases.append(top_subspace(g, k))
    over = [[overlap(a, b) for b in bases] for a in bases]
    return {
        "shape": list(x[0].shape),
        "side": grams[0].shape[0],
        "spectrum": spectra,
        "effective_rank": eff,
        "top_k_energy": energy,
        "overlap": over,
    }


def spectra(
    inputs: Inputs,
    layers: int,
    rank: int,
    *,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The ``spectra`` section of ``analysis.json`` (see the module docstring)."""
    chosen = sampled_layers(inputs.layout.num_layers, layers)
    specs = inputs.vectors[0].specs
    names = [
        n for n in inputs.names if len(specs[n].shape) == 2 and inputs.layout.split(n)[0] in chosen
    ]
    tasks = list(inputs.tasks.values())

    def one(name: str) -> dict[str, Any]:
        block = Block(name, None, 0, 0, 0)
        x = evaluate(tasks, block).reshape(len(tasks), *specs[name].shape)
        return {"layer": inputs.layout.split(name)[0], **tensor_spectra(list(x), rank)}

    found = {}
    with tqdm(names, desc="spectra", disable=not progress, leave=False) as bar:
        for name, r in zip(
            names, parallel_map(one, names, threads or default_threads()), strict=True
        ):
            found[name] = r
            bar.update(1)
    return {"layers": chosen, "rank": rank, "tensors": found}
