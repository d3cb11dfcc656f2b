"""FDA anchor construction (Shi, Wen & Liu 2025, "Model Merging with Functional Dual Anchors",
arXiv 2510.21223; the authors' code ``Sphere-AI-Lab/FDA``).

For block l and expert i, find synthetic inputs X (the anchors) such that the gradient at θ0 of

    S(X; θ) = mean_j cos( flat f_l(x_j; θ), flat f_l(x_j; θ_i) )

points along the task vector τ_i, per parameter tensor:

    L(X) = Σ_p [1 − cos( vec ∇_{θ_p} S(X; θ)|θ0 , vec τ_i,p )]        (minimised over X)

(the gradient of the *similarity* aligns with +τ: descending the distance from θ0 moves along
τ_i, the sign the reference code uses). Optimiser: AdamW (lr 1e-2), keeping the lowest-loss X per
task. Initialisations: ``gauss`` (σ · N(0, I), σ = 0.01, the same draw for every task and block,
as the reference) and ``weight`` (rows of the expert block's 2-D weights whose input size is
the hidden size, sampled without replacement; midpoints of random row pairs pad a shortfall).

The T experts of a block are optimised together: θ0 is replicated per task and the block is
vectorised over tasks (``torch.func.vmap``), so one double back-propagation serves all of them.
A tensor the expert did not change (τ_p = 0) has no direction to align with and is left out.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.func import vmap

from taskvec.errors import IncompatibleError
from taskvec.fda.blocks import Block, Params

Init = Literal["gauss", "weight"]
INITS: tuple[str, ...] = ("gauss", "weight")


@dataclass(frozen=True)
class AnchorSettings:
    """How anchors are built. The reference uses 64 anchors and 1200 steps (NLU/vision); the
    defaults here are sized for a 2-core CPU (see docs/fda.md for the accuracy–cost curve)."""

    anchors: int = 64
    tokens: int | None = None  # per anchor; None: the family's default (5, as the NLU code)
    steps: int = 200
    lr: float = 1e-2
    init: Init = "gauss"
    sigma: float = 0.01  # scale of the gauss init
    seed: int = 0
    snapshots: int = 0  # anchor snapshots kept for the analysis (log-spaced steps)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise IncompatibleError(f"unknown anchor init {self.init!r}; use one of {INITS}")
        if self.anchors < 1 or self.steps < 0 or self.lr <= 0:
            raise IncompatibleError("anchors must be ≥ 1, steps ≥ 0 and lr > 0")


@dataclass
class AnchorSet:
    """The anchors of one block for every task, with what was reached."""

    block: int
    tasks: list[str]
    anchors: torch.Tensor  # (tasks, anchors, [tokens,] hidden)
    alignment: list[float]  # per task: mean over tensors of cos(∇S, τ) at the kept anchors
    start_alignment: list[float]  # the same at the initial anchors
    settings: AnchorSettings
    history: list[list[float]] = field(default_factory=list)  # per step, per task: alignment
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> anchors
    seconds: float = 0.0  # construction time

    def of(self, task: str) -> torch.Tensor:
        return self.anchors[self.tasks.index(task)]

    def save(self, path: str | os.PathLike[str], experts: Sequence[str] = ()) -> Path:
        """Write one safetensors file (anchors per task, snapshots) with the metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            f"anchors.{t}": self.anchors[i].cpu().contiguous() for i, t in enumerate(self.tasks)
        }
        for step, snap in self.snapshots.items():
            for i, t in enumerate(self.tasks):
                tensors[f"snapshot.{step}.{t}"] = snap[i].cpu().contiguous()
        meta = {
            "block": self.block,
            "tasks": self.tasks,
            "experts": list(experts),
            "alignment": self.alignment,
            "start_alignment": self.start_alignment,
            "settings": asdict(self.settings),
            "history": self.history,
            "seconds": self.seconds,
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"taskvec.fda": json.dumps(meta)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AnchorSet:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["taskvec.fda"])
                tasks = meta["tasks"]
                anchors = torch.stack([f.get_tensor(f"anchors.{t}") for t in tasks])
                keys = list(f.keys())  # noqa: SIM118 (safe_open is not a mapping)
                steps = sorted({int(k.split(".")[1]) for k in keys if k.startswith("snap")})
                snaps = {
                    s: torch.stack([f.get_tensor(f"snapshot.{s}.{t}") for t in tasks])
                    for s in steps
                }
        except (OSError, KeyError, ValueError) as e:
            raise IncompatibleError(f"{path}: not a taskvec anchor file ({e})") from None
        return cls(
            meta["block"],
            tasks,
            anchors,
            meta["alignment"],
            meta["start_alignment"],
            AnchorSettings(**meta["settings"]),
            meta["history"],
            snaps,
            meta.get("seconds", 0.0),
        )


def stack(params: Sequence[Params]) -> Params:
    """Per-task parameters stacked along a new first dimension (for ``vmap``)."""
    return {n: torch.stack([p[n] for p in params]) for n in params[0]}


def gauss_init(block: Block, tasks: int, s: AnchorSettings) -> torch.Tensor:
    """σ · N(0, I), one draw shared by every task (and every block: the seed is fixed)."""
    g = torch.Generator().manual_seed(s.seed)
    x = torch.randn(block.input_shape(s.anchors, s.tokens), generator=g) * s.sigma
    return x.expand(tasks, *x.shape).clone().to(block.device)


def weight_rows(block: Block, params: Params) -> torch.Tensor:
    """Every row of the block's 2-D weights whose input size is the hidden size."""
    rows = [p for n, p in params.items() if p.ndim == 2 and p.shape[1] == block.hidden]
    if not rows:
        raise IncompatibleError(f"block {block.index} has no weight with input size {block.hidden}")
    return torch.cat(rows)


def weight_init(block: Block, experts: Sequence[Params], s: AnchorSettings) -> torch.Tensor:
    """Anchor vectors sampled from each expert's weight rows (without replacement); a shortfall
    is padded with midpoints of random row pairs."""
    shape = block.input_shape(s.anchors, s.tokens)
    need = math.prod(shape[:-1])
    g = torch.Generator().manual_seed(s.seed)
    out = []
    for p in experts:
        rows = weight_rows(block, p)
        pick = rows[torch.randperm(len(rows), generator=g)[:need].to(rows.device)]
        if len(pick) < need:
            more = need - len(pick)
            i, j = torch.randint(len(rows), (2, more), generator=g).to(rows.device)
            pick = torch.cat([pick, (rows[i] + rows[j]) / 2])
        out.append(pick.reshape(shape))
    return torch.stack(out)


def _similarity(block: Block) -> Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]:
    def similarity(params: Params, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = block.forward(params, x)
        return F.cosine_similarity(out.flatten(1), target.flatten(1), dim=1).mean()

    return similarity


class AnchorObjective:
    """L(X) per task for one block: Σ_p 1 − cos(∇_θp S(X; θ0), τ_p) (module docstring)."""

    def __init__(self, block: Block, theta0: Params, experts: Sequence[Params]) -> None:
        self.block = block
        self.tasks = len(experts)
        self.theta0 = theta0
        self.experts = stack(experts)
        tau = {n: self.experts[n] - theta0[n] for n in theta0}
        # a tensor no expert changed has no direction; one some experts changed counts for
        # those (its cosine is 0 for the others, a constant)
        self.names = [n for n in theta0 if bool(tau[n].flatten(1).abs().amax() > 0)]
        if not self.names:
            raise IncompatibleError(f"block {block.index}: no expert changes any parameter")
        self.tau = {n: tau[n].flatten(1) for n in self.names}
        self.changed = torch.stack([self.tau[n].abs().amax(1) > 0 for n in self.names]).float()
        self._sim = vmap(_similarity(block))
        self._forward = vmap(block.forward)

    def induced_gradients(self, x: torch.Tensor, create_graph: bool) -> dict[str, torch.Tensor]:
        """∇_θ S_i(X_i; θ)|θ0 per task: {name: (tasks, numel)}."""
        theta = {
            n: v.detach().expand(self.tasks, *v.shape).clone().requires_grad_(True)
            for n, v in self.theta0.items()
        }
        target = self._forward(self.experts, x)
        s = self._sim(theta, x, target).sum()
        grads = torch.autograd.grad(
            s, [theta[n] for n in self.names], create_graph=create_graph, allow_unused=True
        )
        return {
            n: (g if g is not None else torch.zeros_like(theta[n])).flatten(1)
            for n, g in zip(self.names, grads, strict=True)
        }

    def loss(self, x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
        """(tasks,) anchor losses, Σ over changed tensors of 1 − cos."""
        g = self.induced_gradients(x, create_graph)
        cos = torch.stack(
            [F.cosine_similarity(g[n], self.tau[n], dim=1, eps=1e-30) for n in self.names]
        )
        return ((1 - cos) * self.changed).sum(0)

    def alignment(self, loss: torch.Tensor) -> torch.Tensor:
        """Mean cosine over the tensors each task changed, from its loss."""
        n = self.changed.sum(0)
        return (n - loss) / n


def _snapshot_steps(steps: int, count: int) -> set[int]:
    if count <= 0 or steps == 0:
        return set()
    return {0, steps} | {
        round(math.exp(math.log(steps) * k / (count - 1))) for k in range(count - 1)
    }


def construct_block(
    block: Block,
    theta0: Params,
    experts: Sequence[Params],
    tasks: Sequence[str],
    settings: AnchorSettings = AnchorSettings(),
    *,
    on_step: Callable[[int], None] | None = None,
) -> AnchorSet:
    """Optimise the anchors of every expert for ``block`` (see the module docstring)."""
    if len(experts) != len(tasks) or not experts:
        raise IncompatibleError("give one task name per expert, and at least one expert")
    s = settings
    objective = AnchorObjective(block, theta0, experts)
    x0 = gauss_init(block, len(experts), s) if s.init == "gauss" else weight_init(block, experts, s)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=s.lr)
    best_loss = torch.full((len(experts),), math.inf, device=x0.device)
    best = x0.clone()
    history: list[list[float]] = []
    snapshots: dict[int, torch.Tensor] = {}
    wanted = _snapshot_steps(s.steps, s.snapshots)
    start = None
    began = time.perf_counter()
    for step in range(s.steps + 1):
        loss = objective.loss(x, create_graph=step < s.steps)
        with torch.no_grad():
            better = loss < best_loss
            best_loss = torch.where(better, loss.detach(), best_loss)
            best[better] = x[better].detach()
            history.append(objective.alignment(loss.detach()).tolist())
            if start is None:
                start = history[0]
            if step in wanted:
                snapshots[step] = x.detach().clone()
        if step == s.steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1)
    return AnchorSet(
        block.index,
        list(tasks),
        best,
        objective.alignment(best_loss).tolist(),
        start or [],
        s,
        history,
        snapshots,
        time.perf_counter() - began,
    )
