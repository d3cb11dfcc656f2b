"""Analysis of FDA anchors: the paper's three observations, as numbers and plots.

For every block l, every task i and every anchor folder (e.g. both initialisations):

1. **Spectrum** — the singular values of the anchors X_i reshaped to (n·tokens, hidden),
   divided by the largest, next to those of the real inputs of block l (every non-pad token
   state entering block l when θ0 runs on task i's training texts).
2. **Subspace alignment over optimisation** — at every snapshot step, the overlap of the
   anchors' top-k right-singular subspace V_a (in hidden space) with the real inputs' V_r:
   ‖V_aᵀ V_r‖²_F / k (1: the same subspace; k/hidden on average for a random one).
3. **Cone energy** — the FDA-induced update u = −∇_θ Σ_j ‖f_l(x_ij; θ) − y_ij‖² at θ0
   (y_ij = f_l(x_ij; θ_i)) against K real-data updates r_k, the same gradient on K mini-batches
   of real inputs with the expert's outputs on them as targets: ‖Π_cone(u)‖² / ‖u‖², Π_cone the
   projection onto {Σ_k c_k r_k, c ≥ 0}, over the block's parameters flattened together. For
   scale, the same energy of: the update of one more, held-out real mini-batch (how much of a
   real update K others explain: the ceiling), the task vector τ_i, a Gaussian direction of the
   same size (the floor), and the FDA update at the initial anchors (what optimisation added).

Real inputs come from the base encoder's ``hidden_states`` (entry l is block l's input), so
only the encoder families of :mod:`taskvec.fda.blocks` are supported. Plots are drawn from the
JSON-able result of :func:`analyze`, so they can be redrawn from ``fda-analysis.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from taskvec.errors import IncompatibleError
from taskvec.fda.adapt import distance, targets
from taskvec.fda.anchors import AnchorSet, gauss_init, weight_init
from taskvec.fda.blocks import Block, Params
from taskvec.fda.pipeline import FDA, anchor_file

log = logging.getLogger(__name__)

Result = dict[str, Any]
FILES = ("fda-spectrum.png", "fda-subspace.png", "fda-cone.png", "fda-analysis.json")


# --- the measures ------------------------------------------------------------------------------
def spectrum(x: torch.Tensor) -> torch.Tensor:
    """s_i / s_1: the singular values of ``x`` reshaped to (rows, hidden), descending."""
    s = torch.linalg.svdvals(x.reshape(-1, x.shape[-1]).double())
    return s / s[0]


def effective_rank(s: torch.Tensor) -> float:
    """exp(H(p)) with p_i = s_i / Σ s (Roy & Vetterli): how many directions carry the mass."""
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def tail_energy(s: torch.Tensor, k: int) -> float:
    """Σ_{i>k} s_i² / Σ_i s_i²: the energy outside the top-k directions."""
    e = s.pow(2)
    return (e[k:].sum() / e.sum()).item()


def top_subspace(x: torch.Tensor, k: int) -> torch.Tensor:
    """(hidden, k): the top-k right-singular vectors of ``x`` reshaped to (rows, hidden)."""
    _, _, vh = torch.linalg.svd(x.reshape(-1, x.shape[-1]).double(), full_matrices=False)
    return vh[:k].T


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖Aᵀ B‖²_F / k for two orthonormal (hidden, k) bases: 1 if they span the same subspace."""
    return (a.T @ b).pow(2).sum().item() / a.shape[1]


def flat(params: Params) -> torch.Tensor:
    """Every tensor of ``params`` flattened and concatenated (in the mapping's order)."""
    return torch.cat([v.detach().flatten() for v in params.values()])


def update(block: Block, theta: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """u = −∇_θ Σ_j ‖f_l(x_j; θ) − y_j‖² at ``theta``, flattened like :func:`flat`: the
    direction one gradient step of FDA's adaptation (mse) would move the block."""
    p = {n: v.detach().clone().requires_grad_(True) for n, v in theta.items()}
    loss = distance(block.forward(p, x), y, "mse")
    grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
    return -torch.cat(
        [
            (g if g is not None else torch.zeros_like(v)).flatten()
            for g, v in zip(grads, p.values(), strict=True)
        ]
    )


class Cone:
    """The convex cone {Σ_k c_k r_k, c ≥ 0} of the rows of ``rays`` (K, N).

    The projection solves the NNLS min_{c ≥ 0} ‖R c − v‖ (scipy's ``nnls``) in the K-dimensional
    column space of R: with R = Q S (thin QR), ‖R c − v‖² = ‖S c − Qᵀv‖² + ‖(I − QQᵀ) v‖², so
    NNLS on (S, Qᵀv) gives the same c and ‖Π(v)‖ = ‖S c‖, without a K × N matrix in scipy.
    Rays and v are scaled to unit norm first (the cone does not change)."""

    def __init__(self, rays: torch.Tensor) -> None:
        r = rays.double()
        norms = r.norm(dim=1, keepdim=True)
        r = r[norms.squeeze(1) > 0] / norms[norms.squeeze(1) > 0]
        if not len(r):
            raise IncompatibleError("a cone needs at least one non-zero ray")
        self._q, self._s = torch.linalg.qr(r.T)

    def energy(self, v: torch.Tensor) -> float:
        """‖Π_cone(v)‖² / ‖v‖² ∈ [0, 1]."""
        from scipy.optimize import nnls

        v = v.double()
        b = self._q.T @ (v / v.norm())
        s = self._s.cpu()
        c, _ = nnls(s.numpy(), b.cpu().numpy())
        return float(((s @ torch.from_numpy(c)).pow(2).sum()).clamp(max=1.0))


# --- real inputs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealInputs:
    """What enters each block when θ0 runs on one task's texts.

    ``tokens`` holds every non-pad token state (for the spectrum and the subspace). ``windows``
    holds, per sequence long enough, one window of ``window`` consecutive non-pad token states
    (at a seeded random start; the same positions for every block), used to compute real-data
    updates. Windows rather than a masked forward: the anchors are ``window``-token inputs that
    attend to each other without a mask, so windows put the real updates in the same regime as
    the FDA updates, and :meth:`Block.forward` stays mask-free. Each token's state is exact (it
    comes from the full, masked forward of θ0); only block l's own attention sees the window."""

    tokens: dict[int, torch.Tensor]  # block -> (non-pad tokens, hidden)
    windows: dict[int, torch.Tensor]  # block -> (sequences, window, hidden)


def real_inputs(
    encoder: torch.nn.Module,
    ids: Sequence[Sequence[int]],
    pad_id: int,
    blocks: Sequence[int],
    window: int,
    *,
    seed: int = 0,
    batch: int = 32,
) -> RealInputs:
    """Run the encoder on token ``ids`` (on its device) and keep each block's inputs, on the
    CPU (see :class:`RealInputs`)."""
    from taskvec.forward import collate

    device = next(encoder.parameters()).device

    g = torch.Generator().manual_seed(seed)
    starts = [
        int(torch.randint(len(s) - window + 1, (), generator=g)) if len(s) >= window else -1
        for s in ids
    ]
    tokens: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    windows: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    for first in range(0, len(ids), batch):
        chunk = ids[first : first + batch]
        input_ids, mask = collate(chunk, pad_id)
        with torch.no_grad():
            states = encoder(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                output_hidden_states=True,
            ).hidden_states
        for b in blocks:
            h = states[b].float().cpu()
            tokens[b].append(h[mask.bool()])
            windows[b] += [
                h[i, s : s + window] for i, s in enumerate(starts[first : first + batch]) if s >= 0
            ]
    if not any(s >= 0 for s in starts):
        raise IncompatibleError(f"no sequence has the {window} tokens an anchor has")
    return RealInputs(
        {b: torch.cat(t) for b, t in tokens.items()},
        {b: torch.stack(w) for b, w in windows.items()},
    )


@dataclass(frozen=True)
class Sources:
    """The models and real texts (as token ids) to analyse anchors against."""

    base: Path
    experts: dict[str, Path]
    ids: dict[str, list[list[int]]]  # task -> token ids of its training texts
    pad_id: int


# --- the analysis ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnalysisSettings:
    """k of the subspace overlap and the spectrum's tail energy; K, the number of real-data
    updates spanning the cone; the seed of the windows and the random direction."""

    rank: int = 16
    cone_batches: int = 16
    seed: int = 0


def _labels(sets: Sequence[AnchorSet], folders: Sequence[Path]) -> list[str]:
    inits = [s.settings.init for s in sets]
    return inits if len(set(inits)) == len(inits) else [f.name for f in folders]


def _load(path: Path, device: torch.device) -> AnchorSet:
    """An anchor file with its anchors and snapshots on ``device``."""
    a = AnchorSet.load(path)
    a.anchors = a.anchors.to(device)
    a.snapshots = {step: x.to(device) for step, x in a.snapshots.items()}
    return a


def _initial(anchor_set: AnchorSet, block: Block, experts: Sequence[Params]) -> torch.Tensor:
    """The anchors at step 0: the snapshot, or the init recomputed (it is deterministic)."""
    if 0 in anchor_set.snapshots:
        return anchor_set.snapshots[0]
    s = anchor_set.settings
    if s.init == "gauss":
        return gauss_init(block, len(experts), s)
    return weight_init(block, experts, s)


def _trajectory(anchor_set: AnchorSet, initial: torch.Tensor) -> dict[int, torch.Tensor]:
    """Step → anchors: the snapshots, else the initial and the kept anchors."""
    if anchor_set.snapshots:
        return dict(sorted(anchor_set.snapshots.items()))
    return {0: initial, anchor_set.settings.steps: anchor_set.anchors}


def _summary(s: torch.Tensor, k: int) -> dict[str, float]:
    return {"effective_rank": effective_rank(s), "tail_energy": tail_energy(s, k)}


def _sig(values: torch.Tensor) -> list[float]:
    """Three significant digits (a spectrum, for plotting)."""
    return [float(f"{v:.3g}") for v in values.tolist()]


def _analyze_block(
    block: Block,
    theta0: Params,
    experts: dict[str, Params],
    sets: dict[str, AnchorSet],
    real: dict[str, RealInputs],
    settings: AnalysisSettings,
) -> dict[str, Any]:
    k = settings.rank
    tasks = next(iter(sets.values())).tasks
    params = [experts[t] for t in tasks]
    layer = block.index
    out: dict[str, Any] = {
        "spectrum": {"anchors": {}, "anchors_init": {}, "real": {}},
        "summary": {"anchors": {}, "anchors_init": {}, "real": {}},
        "subspace": {},
        "cone": {"fda": {}, "fda_init": {}},
    }
    real_basis = {}
    for t in tasks:
        s = spectrum(real[t].tokens[layer])
        out["spectrum"]["real"][t] = _sig(s)
        out["summary"]["real"][t] = _summary(s, k)
        real_basis[t] = top_subspace(real[t].tokens[layer], k).to(block.device)
    initial = {label: _initial(a, block, params) for label, a in sets.items()}
    for label, a in sets.items():
        spectra = {t: spectrum(a.anchors[i]) for i, t in enumerate(tasks)}
        start = {t: spectrum(initial[label][i]) for i, t in enumerate(tasks)}
        out["spectrum"]["anchors"][label] = {t: _sig(s) for t, s in spectra.items()}
        out["spectrum"]["anchors_init"][label] = _sig(torch.stack(list(start.values())).mean(0))
        out["summary"]["anchors"][label] = {t: _summary(s, k) for t, s in spectra.items()}
        out["summary"]["anchors_init"][label] = {t: _summary(s, k) for t, s in start.items()}
        path = _trajectory(a, initial[label])
        out["subspace"][label] = {
            "steps": list(path),
            "overlap": {
                t: [overlap(top_subspace(x[i], k), real_basis[t]) for x in path.values()]
                for i, t in enumerate(tasks)
            },
        }
    g = torch.Generator().manual_seed(settings.seed + layer)
    found = {label: targets(block, params, a) for label, a in sets.items()}
    out["cone"] |= {"held_out_real": {}, "task_vector": {}, "random": {}}
    for i, t in enumerate(tasks):
        x = real[t].windows[layer].to(block.device)
        with torch.no_grad():
            y = block.forward(experts[t], x)
        parts = settings.cone_batches + 1  # the last batch is held out, as a ceiling
        rays = [
            update(block, theta0, xb, yb)
            for xb, yb in zip(x.tensor_split(parts), y.tensor_split(parts), strict=True)
            if len(xb)
        ]
        cone = Cone(torch.stack(rays[:-1]))
        out["cone"]["held_out_real"][t] = cone.energy(rays[-1])
        for label, a in sets.items():
            u = update(block, theta0, a.anchors[i], found[label][i])
            out["cone"]["fda"].setdefault(label, {})[t] = cone.energy(u)
            x0 = initial[label][i]
            with torch.no_grad():
                y0 = block.forward(experts[t], x0)
            out["cone"]["fda_init"].setdefault(label, {})[t] = cone.energy(
                update(block, theta0, x0, y0)
            )
        tau = flat(experts[t]) - flat(theta0)
        out["cone"]["task_vector"][t] = cone.energy(tau)
        out["cone"]["random"][t] = cone.energy(torch.randn(tau.shape, generator=g).to(tau))
    return out


def analyze(
    sources: Sources,
    anchor_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    settings: AnalysisSettings = AnalysisSettings(),
    *,
    blocks: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    echo: Callable[[str], None] = log.info,
) -> Result:
    """Analyse the anchor folders against ``sources`` (see the module docstring) with the
    encoder and blocks on ``device``; with ``out``, write the three plots and
    ``fda-analysis.json`` there. Returns the JSON's content."""
    from taskvec.forward import load_model

    begin = time.perf_counter()
    folders = [Path(d) for d in anchor_dirs]
    if not folders:
        raise IncompatibleError("give at least one anchor folder")
    first = [AnchorSet.load(anchor_file(f, 0)) for f in folders]
    labels = _labels(first, folders)
    tasks = first[0].tasks
    if any(a.tasks != tasks for a in first):
        raise IncompatibleError("the anchor folders are for different tasks")
    missing = [t for t in tasks if t not in sources.experts or t not in sources.ids]
    if missing:
        raise IncompatibleError(f"no expert or texts for the anchors' tasks {missing}")
    window = first[0].anchors.shape[-2]
    if first[0].anchors.ndim != 4 or any(a.anchors.shape[-2] != window for a in first):
        raise IncompatibleError(
            "the analysis needs (anchors, tokens, hidden) anchors with one "
            "token count across folders (an encoder family)"
        )
    fda = FDA(sources.base, {t: sources.experts[t] for t in tasks}, device)
    picked = fda.blocks.pick(blocks)
    encoder = load_model(sources.base, "base").to(fda.device)
    real = {
        t: real_inputs(encoder, sources.ids[t], sources.pad_id, picked, window, seed=settings.seed)
        for t in tasks
    }
    del encoder
    counts = ", ".join(f"{t} {len(r.tokens[picked[0]])}" for t, r in real.items())
    echo(f"real input tokens: {counts}")
    result: Result = {
        "tasks": tasks,
        "blocks": picked,
        "hidden": fda.blocks.hidden,
        "settings": asdict(settings),
        "random_overlap": settings.rank / fda.blocks.hidden,
        "sets": {
            label: {"folder": str(f), **asdict(a.settings)}
            for label, f, a in zip(labels, folders, first, strict=True)
        },
        "real": {
            t: {
                "sequences": len(sources.ids[t]),
                "tokens": len(r.tokens[picked[0]]),
                "windows": len(r.windows[picked[0]]),
            }
            for t, r in real.items()
        },
        "per_block": {},
    }
    for layer in picked:
        block = fda.blocks.block(layer, fda.device)
        sets = {
            label: _load(anchor_file(f, layer), fda.device)
            for label, f in zip(labels, folders, strict=True)
        }
        theta0 = block.read(fda.base, device=fda.device)
        experts = {t: block.read(fda.experts[t], device=fda.device) for t in tasks}
        start = time.perf_counter()
        done = _analyze_block(block, theta0, experts, sets, real, settings)
        result["per_block"][str(layer)] = done
        echo(f"block {layer}: {time.perf_counter() - start:.0f} s; " + _headline(result, layer))
    result["seconds"] = time.perf_counter() - begin
    if out is not None:
        write(result, Path(out))
    return result


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values)


def _headline(result: Result, block: int) -> str:
    r = result["per_block"][str(block)]
    parts = []
    for label, sub in r["subspace"].items():
        start = _mean({t: v[0] for t, v in sub["overlap"].items()})
        end = _mean({t: v[-1] for t, v in sub["overlap"].items()})
        cone = _mean(r["cone"]["fda"][label])
        parts.append(f"{label}: overlap {start:.3f}→{end:.3f}, cone {cone:.3f}")
    tau, rand = _mean(r["cone"]["task_vector"]), _mean(r["cone"]["random"])
    held = _mean(r["cone"]["held_out_real"])
    parts.append(f"cone of held-out real {held:.3f}, τ {tau:.3f}, random {rand:.1e}")
    return "; ".join(parts)


# --- output ------------------------------------------------------------------------------------
def write(result: Result, folder: Path) -> list[Path]:
    """Write ``fda-analysis.json`` and the three plots into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in FILES]
    plot_spectrum(result, paths[0])
    plot_subspace(result, paths[1])
    plot_cone(result, paths[2])
    paths[3].write_text(_dumps(result) + "\n")
    return paths


def _dumps(result: Result) -> str:
    """Indented JSON with every list of numbers on one line."""
    text = json.dumps(result, indent=1)
    return re.sub(r"\[([^\[\]{}\"]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt: Any, rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    fig, axes = plt.subplots(
        rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False, sharey=True
    )
    return fig, axes


def _save(fig: Any, plt: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectrum(result: Result, path: Path) -> None:
    """One panel per anchor set and block: s_i/s_1 of each task's anchors (solid), of its real
    inputs (dashed) and of the initial anchors (dotted, mean over tasks), log scale."""
    plt = _pyplot()
    labels, blocks, tasks = list(result["sets"]), result["blocks"], result["tasks"]
    fig, axes = _grid(plt, len(labels), len(blocks), (2.6, 2.3))
    colors = plt.get_cmap("tab10")
    for row, label in enumerate(labels):
        for col, layer in enumerate(blocks):
            ax = axes[row][col]
            spec = result["per_block"][str(layer)]["spectrum"]
            for j, t in enumerate(tasks):
                ax.semilogy(spec["anchors"][label][t], color=colors(j), lw=1, label=t)
                ax.semilogy(spec["real"][t], color=colors(j), lw=0.8, ls="--")
            ax.semilogy(
                spec["anchors_init"][label], color="black", lw=0.8, ls=":", label="initial anchors"
            )
            ax.set_title(f"{label} anchors, block {layer}", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == len(labels) - 1:
                ax.set_xlabel("index i", fontsize=7)
        axes[row][0].set_ylabel("s_i / s_1", fontsize=7)
    axes[0][-1].legend(
        fontsize=5.5, loc="lower left", title="solid: anchors\ndashed: real", title_fontsize=6
    )
    _save(fig, plt, path)


def plot_subspace(result: Result, path: Path) -> None:
    """Per block: the overlap ‖V_aᵀV_r‖²_F/k against the step (symlog x, step 0 = the init),
    mean over tasks with a min–max band, one line per anchor set; dotted: a random subspace."""
    plt = _pyplot()
    blocks = result["blocks"]
    fig, axes = _grid(plt, 1, len(blocks), (2.6, 2.5))
    colors = plt.get_cmap("tab10")
    k = result["settings"]["rank"]
    for col, layer in enumerate(blocks):
        ax = axes[0][col]
        for j, (label, sub) in enumerate(result["per_block"][str(layer)]["subspace"].items()):
            curves = torch.tensor(list(sub["overlap"].values()))
            ax.plot(sub["steps"], curves.mean(0), color=colors(j), marker="o", ms=2, label=label)
            ax.fill_between(
                sub["steps"], curves.amin(0), curves.amax(0), color=colors(j), alpha=0.2
            )
        ax.axhline(result["random_overlap"], color="gray", ls=":", lw=1, label="random")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_title(f"block {layer}", fontsize=8)
        ax.set_xlabel("construction step", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(f"top-{k} overlap with real inputs", fontsize=7)
    axes[0][-1].legend(fontsize=6)
    _save(fig, plt, path)


def plot_cone(result: Result, path: Path) -> None:
    """Grouped bars per block: mean over tasks of ‖Π_cone(v)‖²/‖v‖² for the FDA update of
    each anchor set (tick: at the initial anchors), a held-out real update (the ceiling), τ and
    a random direction; dots: tasks."""
    plt = _pyplot()
    blocks = result["blocks"]
    cone = [result["per_block"][str(layer)]["cone"] for layer in blocks]
    series: list[tuple[str, list[dict[str, float]], list[dict[str, float]] | None]] = [
        (f"FDA ({s})", [c["fda"][s] for c in cone], [c["fda_init"][s] for c in cone])
        for s in result["sets"]
    ]
    series += [
        (name, [c[key] for c in cone], None)
        for key, name in [
            ("held_out_real", "held-out real update"),
            ("task_vector", "task vector τ"),
            ("random", "random direction"),
        ]
    ]
    fig, ax = plt.subplots(figsize=(1.3 * len(blocks) + 2.5, 3.2))
    colors = plt.get_cmap("tab10")
    width = 0.8 / len(series)
    for j, (name, values, init) in enumerate(series):
        xs = [b + (j - (len(series) - 1) / 2) * width for b in range(len(blocks))]
        ax.bar(xs, [_mean(v) for v in values], width, color=colors(j), label=name)
        for x, v in zip(xs, values, strict=True):
            ax.plot([x] * len(v), list(v.values()), "k.", ms=2)
        if init is not None:
            ax.plot(
                xs,
                [_mean(v) for v in init],
                "_",
                color="black",
                ms=10,
                mew=1.5,
                label="at the initial anchors" if j == 0 else None,
            )
    ax.set_xticks(range(len(blocks)), [f"block {layer}" for layer in blocks], fontsize=8)
    ax.set_ylabel("‖Π_cone(v)‖² / ‖v‖²", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(
        f"energy in the cone of {result['settings']['cone_batches']} real-data "
        "updates (bars: mean over tasks, dots: tasks)",
        fontsize=8,
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    _save(fig, plt, path)
