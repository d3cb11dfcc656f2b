"""FDA on whole models: construct every block's anchors, adapt every block, write a checkpoint.

Blocks are independent (the reference's layer-wise algorithm): block l uses only its own anchors
and targets, so memory holds one block of θ0 and of each expert at a time. Everything outside
the blocks (embeddings, final norms, heads) is copied from the starting model: θ0 when adapting
from the base, the merged model when adapting a merge's coefficients.

Anchor files (``block-<l>.safetensors``, see :class:`taskvec.fda.anchors.AnchorSet`) are written
as each block finishes; a construction rerun with the same experts and settings reuses them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from taskvec.algebra import Model, load_model
from taskvec.errors import IncompatibleError
from taskvec.fda.adapt import AdaptSettings, adapt_coefficients, adapt_parameters, targets
from taskvec.fda.anchors import AnchorSet, AnchorSettings, construct_block
from taskvec.fda.blocks import Block, BlockModel, Params
from taskvec.io.checkpoint import check_not_an_input
from taskvec.io.writer import check_output_path

log = logging.getLogger(__name__)

BASE = "base"
TASK_ARITHMETIC = "task_arithmetic"


@dataclass(frozen=True)
class Start:
    """Where adaptation starts: ``base`` (train every block parameter from θ0),
    ``task_arithmetic`` (train coefficients of the experts' vectors, each starting at
    ``scaling``), or a merged ``model`` folder (train the coefficient of its one vector
    τ_m = θ_m − θ0, starting at ``scaling``, 1.0 by default)."""

    kind: str = BASE
    scaling: float = 0.3
    model: Path | None = None

    @classmethod
    def parse(cls, spec: str | os.PathLike[str], scaling: float | None = None) -> Start:
        if str(spec) == BASE:
            return cls(BASE)
        if str(spec) == TASK_ARITHMETIC:
            return cls(TASK_ARITHMETIC, 0.3 if scaling is None else scaling)
        path = Path(spec).expanduser()
        if not path.exists():
            raise IncompatibleError(
                f"FDA start {str(spec)!r} is neither 'base', 'task_arithmetic' nor a model folder"
            )
        return cls("model", 1.0 if scaling is None else scaling, path)

    def describe(self) -> str:
        if self.kind == "model":
            return f"coefficients of the merge {self.model} (from {self.scaling:g})"
        if self.kind == TASK_ARITHMETIC:
            return f"coefficients of the task vectors (from {self.scaling:g})"
        return "every block parameter, from the base"


@dataclass
class Report:
    """What a construction or adaptation did, per block (for logs, JSON and the benchmark)."""

    seconds: dict[str, float] = field(default_factory=dict)
    alignment: dict[int, dict[str, float]] = field(default_factory=dict)
    start_alignment: dict[int, dict[str, float]] = field(default_factory=dict)
    reused: list[int] = field(default_factory=list)


class FDA:
    """The base model, the experts (task name → folder) and the blocks they share, checked
    before any optimisation starts: every expert has every block tensor with the base's shape."""

    def __init__(
        self,
        base: str | os.PathLike[str],
        experts: Mapping[str, str | os.PathLike[str]],
        device: str | torch.device = "cpu",
    ) -> None:
        if not experts:
            raise IncompatibleError("FDA needs at least one expert model")
        self.device = torch.device(device)
        self.base_path = Path(base)
        self.base = load_model(base)
        self.blocks = BlockModel.open(base)
        self.tasks = list(experts)
        self.expert_paths = {t: Path(p) for t, p in experts.items()}
        self.experts = {t: load_model(p) for t, p in experts.items()}
        specs = self.base.specs
        for task, model in self.experts.items():
            for name in self.blocks.block_tensor_names():
                if name not in model.specs:
                    raise IncompatibleError(f"expert {task!r} lacks block tensor {name!r}")
                if model.specs[name].shape != specs[name].shape:
                    raise IncompatibleError(
                        f"shape mismatch for tensor {name!r}: {list(specs[name].shape)} (base) "
                        f"vs {list(model.specs[name].shape)} (expert {task!r})"
                    )

    def _params(self, block: Block) -> tuple[Params, list[Params]]:
        d = self.device
        return block.read(self.base, device=d), [
            block.read(self.experts[t], device=d) for t in self.tasks
        ]

    # --- construction -----------------------------------------------------------------------
    def construct(
        self,
        out: str | os.PathLike[str],
        settings: AnchorSettings | None = None,
        *,
        blocks: list[int] | None = None,
        progress: bool = True,
        echo: Callable[[str], None] = log.info,
    ) -> Report:
        """Build and save the anchors of every (or the listed) block; reuse matching files."""
        settings = settings or AnchorSettings()
        folder = Path(out)
        indices = self.blocks.pick(blocks)
        folder.mkdir(parents=True, exist_ok=True)
        report = Report()
        experts = [str(self.expert_paths[t]) for t in self.tasks]
        for i in indices:
            block = self.blocks.block(i, self.device)
            path = anchor_file(folder, i)
            old = _reusable(path, self.tasks, experts, settings)
            if old is not None:
                report.reused.append(i)
                _record(report, old)
                echo(f"block {i}: reusing {path.name}")
                continue
            theta0, params = self._params(block)
            with tqdm(
                total=settings.steps, desc=f"anchors, block {i}", disable=not progress, leave=False
            ) as bar:
                made = construct_block(
                    block, theta0, params, self.tasks, settings, on_step=lambda _: bar.update()
                )
            made.save(path, experts)
            report.seconds[f"block {i}"] = made.seconds
            _record(report, made)
            summary = ", ".join(
                f"{t} {a:.3f}→{b:.3f}"
                for t, a, b in zip(self.tasks, made.start_alignment, made.alignment, strict=True)
            )
            echo(
                f"block {i}: alignment cos(∇S, τ) {summary} ({report.seconds[f'block {i}']:.0f} s)"
            )
        return report

    # --- adaptation -------------------------------------------------------------------------
    def adapt(
        self,
        anchors: str | os.PathLike[str],
        out: str | os.PathLike[str],
        start: Start = Start(),
        settings: AdaptSettings | None = None,
        *,
        overwrite: bool = False,
        threads: int | None = None,
        progress: bool = True,
        echo: Callable[[str], None] = log.info,
    ) -> Report:
        """Adapt every block on the saved anchors and write the model to ``out``."""
        settings = settings or AdaptSettings()
        out_path = Path(out).expanduser().absolute()
        check_output_path(out_path, overwrite)
        origin = load_model(start.model) if start.model is not None else None
        leaves = [self.base, *self.experts.values()] + ([origin] if origin else [])
        check_not_an_input(out_path, [c for m in leaves for c in m._leaves()])
        sets = [AnchorSet.load(anchor_file(Path(anchors), i)) for i in self.blocks.indices]
        for s in sets:
            if s.tasks != self.tasks:
                raise IncompatibleError(
                    f"anchors of block {s.block} are for tasks {s.tasks}, not {self.tasks}"
                )
        if origin is not None:
            self._check_like_base(origin, str(start.model))
        report = Report()
        patches: dict[str, torch.Tensor] = {}
        echo(f"adapting {start.describe()}, {len(sets)} blocks")
        for anchor_set in sets:
            block = self.blocks.block(anchor_set.block, self.device)
            anchor_set.anchors = anchor_set.anchors.to(self.device)
            begin = time.perf_counter()
            theta0, params = self._params(block)
            target = targets(block, params, anchor_set)
            with tqdm(
                total=settings.epochs,
                desc=f"adapting block {block.index}",
                disable=not progress,
                leave=False,
            ) as bar:
                new = self._adapt_block(
                    block,
                    theta0,
                    params,
                    origin,
                    start,
                    anchor_set,
                    target,
                    settings,
                    lambda *_: bar.update(),
                )
            names = block.checkpoint_names()
            patches.update({names[n]: v.cpu() for n, v in new.items()})
            report.seconds[f"block {block.index}"] = time.perf_counter() - begin
        model = (origin or self._start_model(start)).patched(patches)
        model.save(out_path, overwrite=overwrite, threads=threads, progress=False)
        echo(f"wrote {out_path}")
        return report

    def _adapt_block(
        self,
        block: Block,
        theta0: Params,
        params: list[Params],
        origin: Model | None,
        start: Start,
        anchor_set: AnchorSet,
        target: torch.Tensor,
        settings: AdaptSettings,
        on_epoch: Callable[[int, float], None],
    ) -> Params:
        if start.kind == BASE:
            return adapt_parameters(block, theta0, anchor_set, target, settings, on_epoch=on_epoch)
        if origin is not None:
            vectors = [
                {n: v - theta0[n] for n, v in block.read(origin, device=self.device).items()}
            ]
        else:
            vectors = [{n: p[n] - theta0[n] for n in theta0} for p in params]
        return adapt_coefficients(
            block, theta0, vectors, start.scaling, anchor_set, target, settings, on_epoch=on_epoch
        )

    def _start_model(self, start: Start) -> Model:
        if start.kind == TASK_ARITHMETIC:
            vectors = [m - self.base for m in self.experts.values()]
            return self.base + start.scaling * sum(vectors[1:], vectors[0])
        return self.base

    def _check_like_base(self, model: Model, what: str) -> None:
        specs = self.base.specs
        for name in self.blocks.block_tensor_names():
            if name not in model.specs or model.specs[name].shape != specs[name].shape:
                raise IncompatibleError(f"{what}: tensor {name!r} missing or shaped differently")

    # --- both -------------------------------------------------------------------------------
    def merge(
        self,
        out: str | os.PathLike[str],
        anchor_settings: AnchorSettings | None = None,
        adapt_settings: AdaptSettings | None = None,
        start: Start = Start(),
        *,
        anchors: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        threads: int | None = None,
        progress: bool = True,
        echo: Callable[[str], None] = log.info,
    ) -> Report:
        """Construct (into ``anchors``, or a temporary folder) and adapt: the whole method."""
        out_path = Path(out).expanduser().absolute()
        check_output_path(out_path, overwrite)
        tmp = None if anchors is not None else Path(tempfile.mkdtemp(prefix="taskvec-fda-"))
        folder = Path(anchors) if anchors is not None else tmp
        assert folder is not None
        try:
            built = self.construct(folder, anchor_settings, progress=progress, echo=echo)
            done = self.adapt(
                folder,
                out_path,
                start,
                adapt_settings,
                overwrite=overwrite,
                threads=threads,
                progress=progress,
                echo=echo,
            )
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        done.alignment, done.start_alignment = built.alignment, built.start_alignment
        done.seconds = {f"construct {k}": v for k, v in built.seconds.items()} | {
            f"adapt {k}": v for k, v in done.seconds.items()
        }
        return done


def anchor_file(folder: Path, block: int) -> Path:
    return folder / f"block-{block:03d}.safetensors"


def _reusable(
    path: Path, tasks: list[str], experts: list[str], settings: AnchorSettings
) -> AnchorSet | None:
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("taskvec.fda", "{}"))
    except (OSError, ValueError):
        return None
    same = (
        meta.get("tasks") == tasks
        and meta.get("experts") == experts
        and meta.get("settings") == asdict(settings)
    )
    return AnchorSet.load(path) if same else None


def _record(report: Report, made: AnchorSet) -> None:
    report.alignment[made.block] = dict(zip(made.tasks, made.alignment, strict=True))
    report.start_alignment[made.block] = dict(zip(made.tasks, made.start_alignment, strict=True))
