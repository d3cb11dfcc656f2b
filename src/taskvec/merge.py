"""Config-driven merges: plan from headers, validate everything, then stream.

:func:`plan_merge` turns a :class:`~taskvec.config.MergeConfig` into engine jobs, reading only
headers and config files: it opens every input, maps output tensors to input tensors (layer
slices included), resolves every parameter for every tensor, and probes the method on tiny
tensors with those parameters, so that a typo, a missing tensor, a shape mismatch or a
parameter set that would produce NaN is reported before any tensor data is read.
:func:`merge` then runs the plan with the streaming engine.
"""

from __future__ import annotations

import filecmp
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from taskvec import methods
from taskvec.config import MergeConfig, OutputSlice, Parameters, lookup, parse_config
from taskvec.engine import (
    Job,
    JobResult,
    PlanSummary,
    default_threads,
    execute,
    job_parts,
    parallel_map,
    planned_tensors,
    summarize,
)
from taskvec.errors import CheckpointError, ConfigError, IncompatibleError, TaskvecError
from taskvec.fda.config import METHOD as FDA_METHOD
from taskvec.fda.config import FdaMerge
from taskvec.io.checkpoint import Checkpoint, TensorInfo, check_not_an_input, open_checkpoint
from taskvec.io.dtypes import dtype_name, parse_dtype
from taskvec.io.writer import DEFAULT_SHARD_SIZE, CheckpointWriter, check_output_path
from taskvec.layout import LayerLayout
from taskvec.methods.registry import REQUIRED, MergeMethod, TensorPass, WholeModelPass

log = logging.getLogger("taskvec")

_TOKENIZER_FILES = (
    "tokenizer",
    "vocab",
    "merges",
    "special_tokens_map",
    "added_tokens",
    "chat_template",
)
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class _Source:
    """One input of a slice: a checkpoint and the first layer it contributes."""

    ref: str
    ckpt: Checkpoint
    start: int
    parameters: Parameters


@dataclass(frozen=True)
class _Slice:
    sources: list[_Source]
    base: _Source | None
    parameters: Parameters
    length: int


@dataclass
class _Run:
    """What every job of a plan shares at run time: the whole-model pass's results and the
    device the methods compute on."""

    context: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class MergePlan:
    """Everything a merge will do, known before any tensor is read."""

    config: MergeConfig
    method: MergeMethod
    jobs: list[Job]
    reference: Checkpoint
    tokenizer_source: Checkpoint
    out_config: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)
    tasks: list[_TensorTask] = field(default_factory=list)
    run: _Run = field(default_factory=_Run)
    inputs: list[Checkpoint] = field(default_factory=list)

    @property
    def whole_model_pass(self) -> bool:
        """Whether the method needs a streamed first pass over every tensor."""
        return bool(self.tasks) and _first_pass(self.method, self.tasks[0].global_) is not None

    @property
    def context(self) -> dict[str, Any]:
        """The extra globals the whole-model pass produced (empty before :meth:`prepare`)."""
        return self.run.context

    def prepare(self, threads: int, progress: bool = True) -> None:
        """Run the whole-model pass, if any, filling the context the tensor jobs receive."""
        if not self.whole_model_pass:
            return
        first_pass = _first_pass(self.method, self.tasks[0].global_)
        assert first_pass is not None
        bar = tqdm(
            total=len(self.tasks),
            desc="whole-model pass",
            disable=not progress,
            leave=False,
            unit="tensor",
        )
        device = self.run.device
        total: torch.Tensor | None = None
        for part in parallel_map(
            lambda task: task.collect(first_pass, device), self.tasks, threads
        ):
            total = part if total is None else total + part
            bar.update()
        bar.close()
        first = self.tasks[0]
        self.context.update(first_pass.finalize(total, **first.per_model, **first.global_))
        log.info("whole-model pass of %s done", self.method.name)

    def summary(self, threads: int) -> PlanSummary:
        return summarize(self.jobs, threads)


class _Planner:
    def __init__(self, cfg: MergeConfig, config_dir: Path | None, random_seed: int | None):
        self.cfg = cfg
        self.config_dir = config_dir
        self.seed = random_seed
        self.method = methods.get_method(cfg.merge_method)
        self._open: dict[str, Checkpoint] = {}
        self.problems: list[str] = []

    # --- inputs ----------------------------------------------------------------------------
    def checkpoint(self, ref: str) -> Checkpoint:
        if ref not in self._open:
            if "+" in ref and not Path(ref).exists():
                raise ConfigError(
                    f"model {ref!r}: LoRA references (model+lora) are not supported yet"
                )
            path = Path(ref).expanduser()
            if not path.exists() and self.config_dir is not None and not path.is_absolute():
                alt = self.config_dir / path
                path = alt if alt.exists() else path
            if not path.exists():
                raise CheckpointError(
                    f"model {ref!r}: no such local file or folder (taskvec reads local "
                    "checkpoints; download hub models first)"
                )
            self._open[ref] = open_checkpoint(path)
        return self._open[ref]

    def check_parameters(self) -> None:
        m, cfg = self.method, self.cfg
        for key in cfg.parameters:
            m.check_parameter(key, "parameters")
        entries: list[tuple[str, Parameters, str]] = []
        for im in cfg.models or []:
            entries.append((im.model, im.parameters, f"model {im.model!r}"))
        for i, sl in enumerate(cfg.slices or []):
            for key in sl.parameters:
                m.check_parameter(key, f"slices[{i}].parameters")
            for s in sl.sources:
                entries.append((s.model, s.parameters, f"slices[{i}] source {s.model!r}"))
        for _, params, where in entries:
            for key in params:
                if m.check_parameter(key, where) == "global":
                    raise ConfigError(
                        f"{where}: {key!r} is a global parameter of {m.name}; set it under "
                        "the top-level (or slice) parameters, not per model"
                    )

    def slices(self, layout_of: Callable[[Checkpoint], LayerLayout]) -> list[_Slice]:
        cfg, m = self.cfg, self.method
        if cfg.models is not None:
            base_ref = cfg.base_model if m.base != "unused" else None
            sources = [
                _Source(im.model, self.checkpoint(im.model), 0, im.parameters)
                for im in cfg.models
                if im.model != base_ref
            ]
            base = _Source(base_ref, self.checkpoint(base_ref), 0, {}) if base_ref else None
            listed = {im.model for im in cfg.models}
            if m.base == "unused" and cfg.base_model and cfg.base_model not in listed:
                # as mergekit does, a base_model missing from `models` becomes one more input
                # (last, with only the top-level parameters) of a method without a base role
                log.info(
                    "%s has no base role: base_model %r is merged as one more input",
                    m.name,
                    cfg.base_model,
                )
                sources.append(_Source(cfg.base_model, self.checkpoint(cfg.base_model), 0, {}))
            ref = base.ckpt if base else sources[0].ckpt
            return [_Slice(sources, base, {}, layout_of(ref).num_layers)]
        out = []
        for i, sl in enumerate(cfg.slices or []):
            out.append(self._slice(i, sl))
        return out

    def _slice(self, i: int, sl: OutputSlice) -> _Slice:
        base_ref = (sl.base_model or self.cfg.base_model) if self.method.base != "unused" else None
        sources, base = [], None
        for s in sl.sources:
            src = _Source(s.model, self.checkpoint(s.model), s.layer_range[0], s.parameters)
            if s.model == base_ref:
                base = src
            else:
                sources.append(src)
        if base_ref and base is None:
            raise ConfigError(
                f"slices[{i}]: base model {base_ref!r} must be one of the slice's sources "
                "(give its layer_range)"
            )
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        return _Slice(sources, base, sl.parameters, length)

    # --- per tensor -----------------------------------------------------------------------
    def parameters(
        self, sl: _Slice, name: str, t: float
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        m, top = self.method, self.cfg.parameters
        per_model: dict[str, torch.Tensor] = {}
        for key, default in m.per_model.items():
            values = []
            for src in sl.sources:
                found, v = lookup(key, [src.parameters, sl.parameters, top], name, t)
                if not found:
                    if default is REQUIRED:
                        raise ConfigError(
                            f"model {src.ref!r}: missing required parameter {key!r} "
                            f"for tensor {name!r}"
                        )
                    v = default
                values.append(_number(key, v))
            per_model[key] = torch.tensor(values, dtype=torch.float64)
        global_: dict[str, Any] = {}
        for key, default in m.globals.items():
            found, v = lookup(key, [sl.parameters, top], name, t)
            global_[key] = _typed(key, v, default) if found else default
        return per_model, global_


def _number(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"parameter {key!r} must be a number, got {v!r}")
    return float(v)


def _typed(key: str, v: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(v, bool | str):  # strings name a mode (rescale: expectation)
            raise ConfigError(f"parameter {key!r} must be true or false, got {v!r}")
        return v
    if isinstance(default, int | float) and default is not REQUIRED:
        return _number(key, v)
    return v


def _seed_for(seed: int | None, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class _TensorTask:
    """One output tensor of a merge: which inputs, which method, which parameters."""

    method: MergeMethod
    inputs: list[tuple[Checkpoint, str]]
    base: tuple[Checkpoint, str] | None
    per_model: dict[str, torch.Tensor]
    global_: dict[str, Any]
    seed: int | None
    name: str
    rows: tuple[int, int] | None = None
    blocks: tuple[tuple[int, int], ...] = ()  # row blocks of a two-phase tensor (TensorPass)

    def load(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inputs stacked as ``(N, *shape)`` in the working dtype on ``device``, and the
        base tensor (only rows ``[start, stop)`` for a row chunk of an elementwise method)."""
        stacked = self.load_models(device)
        stored = self.read_base(stacked.device)
        return stacked, None if stored is None else stored.to(stacked.dtype)

    def load_models(self, device: torch.device | None = None) -> torch.Tensor:
        """The inputs stacked as ``(N, *shape)`` in the working dtype on ``device``."""
        ckpt, tname = self.inputs[0]
        first = ckpt.read(tname, self.rows)
        work = torch.float64 if first.dtype == torch.float64 else torch.float32
        stacked = torch.empty((len(self.inputs), *first.shape), dtype=work)
        stacked[0].copy_(first)
        del first
        for i, (ckpt, tname) in enumerate(self.inputs[1:], start=1):
            stacked[i].copy_(ckpt.read(tname, self.rows))
        if device is not None and device.type != "cpu":
            stacked = stacked.to(device)
        return stacked

    def read_base(self, device: torch.device) -> torch.Tensor | None:
        """The base tensor (its rows ``[start, stop)`` for a row block) as stored, on
        ``device``."""
        if self.base is None:
            return None
        return self.base[0].read(self.base[1], self.rows).to(device)

    def run(self, run: _Run) -> JobResult:
        if self.blocks:
            assert self.method.tensor_pass is not None
            return self._run_in_two_phases(self.method.tensor_pass, run.device)
        stacked, base = self.load(run.device)
        return _call(
            self.method,
            stacked,
            base,
            _on(self.per_model, stacked.device),
            {**self.global_, **run.context},
            self.seed,
            self.name,
        )

    def _run_in_two_phases(
        self, tensor_pass: TensorPass, device: torch.device
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The tensor's merged row blocks, ``(first row, rows)``, reading each input once:
        every block's partial result and share of the statistic, then every block's rows (the
        base's rows are kept as stored in between)."""
        per_model = _on(self.per_model, device)
        partials: torch.Tensor | None = None
        total: torch.Tensor | None = None
        bases: list[torch.Tensor | None] = []  # kept as stored for the second phase
        for start, stop in self.blocks:
            block = replace(self, rows=(start, stop), blocks=())
            stacked = block.load_models(device)
            bases.append(block.read_base(stacked.device))
            if partials is None:
                shape = (self.blocks[-1][1], *stacked.shape[2:])
                partials = torch.empty(shape, dtype=stacked.dtype, device=device)
            share = tensor_pass.collect(
                stacked, bases[-1], partials[start:stop], **per_model, **self.global_
            )
            total = share if total is None else total + share
            del stacked
        assert partials is not None and total is not None
        bases.reverse()  # popped in block order, so each block's base rows go once finished
        for start, stop in self.blocks:
            part = partials[start:stop]
            yield start, tensor_pass.finish(part, bases.pop(), total, **per_model, **self.global_)

    def collect(
        self, first_pass: WholeModelPass, device: torch.device | None = None
    ) -> torch.Tensor:
        stacked, base = self.load(device)
        per_model = _on(self.per_model, stacked.device)
        return first_pass.collect(stacked, base, **per_model, **self.global_).cpu()


def _on(params: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-model parameters on the device the tensors are on."""
    if device.type == "cpu":
        return params
    return {k: v.to(device) for k, v in params.items()}


def _call(
    method: MergeMethod,
    stacked: torch.Tensor,
    base: torch.Tensor | None,
    per_model: dict[str, torch.Tensor],
    global_: dict[str, Any],
    seed: int | None,
    name: str,
) -> torch.Tensor:
    extra: dict[str, Any] = {}
    if method.random:
        extra["generator"] = torch.Generator().manual_seed(_seed_for(seed, name))
    if method.wants_name:
        extra["name"] = name
    return method.fn(stacked, base, **per_model, **global_, **extra)


def _first_pass(method: MergeMethod, global_: dict[str, Any]) -> WholeModelPass | None:
    """The method's whole-model pass if these globals want it."""
    first_pass = method.whole_model
    return first_pass if first_pass is not None and first_pass.wanted(**global_) else None


def _kept_bytes(infos: list[TensorInfo], has_base: bool) -> int:
    """What a two-phase job keeps between its phases: the partial result in float32 and the
    base tensor as stored (``infos[-1]`` when there is a base)."""
    return 4 * infos[0].numel + (infos[-1].nbytes if has_base else 0)


def _two_phases(method: MergeMethod, global_: dict[str, Any]) -> bool:
    """Whether the method merges a tensor split into row blocks in two phases."""
    return method.tensor_pass is not None and method.tensor_pass.wanted(**global_)


def _probe(
    method: MergeMethod,
    n: int,
    has_base: bool,
    per_model: dict[str, torch.Tensor],
    global_: dict[str, Any],
) -> str | None:
    """Run the method (and its whole-model pass) on tiny tensors with these parameters;
    an error message if it fails."""
    x = torch.linspace(0.5, 1.5, n * 4).reshape(n, 4)
    base = torch.full((4,), 0.25) if has_base else None
    try:
        context: dict[str, Any] = {}
        first_pass = _first_pass(method, global_)
        if first_pass is not None:
            total = first_pass.collect(x.clone(), base, **per_model, **global_)
            context = first_pass.finalize(total, **per_model, **global_)
        out = _call(method, x, base, per_model, {**global_, **context}, 0, "probe")
    except TaskvecError as e:
        return str(e)
    if not bool(torch.isfinite(out).all()):
        return "these parameters produce NaN/Inf"
    return None


def plan_merge(
    config: str | os.PathLike[str] | dict[str, Any] | MergeConfig,
    *,
    random_seed: int | None = None,
) -> MergePlan:
    """Validate a merge and build its jobs from headers alone (no tensor data is read).

    Inputs follow mergekit: a method without a base role (linear, karcher, passthrough) gets a
    ``base_model`` that ``models`` does not list as its last input. A tensor that the base has
    and the other inputs lack (e.g. a non-float buffer) is copied from the base (see
    :func:`_donor`), with one log message for all such tensors.
    """
    config_dir = Path(config).parent if isinstance(config, str | os.PathLike) else None
    cfg = parse_config(config)
    planner = _Planner(cfg, config_dir, random_seed)
    method = planner.method
    planner.check_parameters()
    layouts: dict[int, LayerLayout] = {}

    def layout_of(ckpt: Checkpoint) -> LayerLayout:
        if id(ckpt) not in layouts:
            layouts[id(ckpt)] = LayerLayout.infer(ckpt.tensors)
        return layouts[id(ckpt)]

    if method.base == "required" and not (
        cfg.base_model or any(s.base_model for s in cfg.slices or [])
    ):
        raise ConfigError(f"{method.name} needs a base_model")
    slices = planner.slices(layout_of)
    for sl in slices:
        if len(sl.sources) < method.min_models:
            raise ConfigError(
                f"{method.name} needs at least {method.min_models} model(s) besides the base, "
                f"got {len(sl.sources)}"
            )
    ref_slice = slices[0]
    if ref_slice.base:
        reference = ref_slice.base.ckpt
    elif cfg.models is not None and cfg.base_model:
        reference = planner.checkpoint(cfg.base_model)  # mergekit writes the base's config
    else:
        reference = ref_slice.sources[0].ckpt
    layout = layout_of(reference)
    out_dtype = parse_dtype(cfg.out_dtype or cfg.dtype)

    # Output tensors: (output name, slice, layer offset in the slice, input suffix or name).
    items: list[tuple[str, _Slice, int | None, str]] = []
    if len(slices) == 1 and cfg.models is not None:
        for name in reference.tensors:
            layer, _ = layout.split(name)
            items.append((name, ref_slice, layer, name))
    else:
        if layout.prefix is None:
            raise ConfigError("slices need layered models, but no numbered layers were found")
        pre = [n for n in reference.tensors if layout.split(n)[0] is None and layout.is_pre(n)]
        post = [n for n in reference.tensors if layout.split(n)[0] is None and n not in pre]
        items += [(n, slices[0], None, n) for n in pre]
        suffixes = list(
            dict.fromkeys(
                suffix
                for n in reference.tensors
                for layer, suffix in [layout.split(n)]
                if layer is not None
            )
        )
        out_layer = 0
        for sl in slices:
            for k in range(sl.length):
                for suffix in suffixes:
                    items.append((layout.name(out_layer, suffix), sl, k, suffix))
                out_layer += 1
        items += [(n, slices[-1], None, n) for n in post]

    jobs: list[Job] = []
    tasks: list[_TensorTask] = []
    run = _Run()
    probed: dict[tuple[Any, ...], str | None] = {}
    copied: list[tuple[str, TensorInfo]] = []
    for out_name, sl, layer, key in items:
        srcs = sl.sources + ([sl.base] if sl.base else [])
        if cfg.models is not None or layer is None:
            names = [(s.ckpt, key) for s in srcs]
        else:
            names = [(s.ckpt, layout_of(s.ckpt).name(s.start + layer, key)) for s in srcs]
        donor = _donor(names, sl.base is not None)
        if donor is not None:
            info = names[donor][0].tensors[names[donor][1]]
            dtype = (out_dtype or info.dtype) if info.is_float else info.dtype
            jobs.append(_copy_job(out_name, names[donor], info, dtype))
            copied.append((out_name, info))
            continue
        infos = _infos(planner, srcs, names)
        if infos is None:
            continue
        ref_info = infos[-1] if sl.base else infos[0]
        if not ref_info.is_float:
            jobs.append(_copy_job(out_name, names[-1] if sl.base else names[0], ref_info))
            continue
        t = layout.relative_position(layer, 0, sl.length)
        try:
            per_model, global_ = planner.parameters(sl, out_name, t)
        except ConfigError as e:
            planner.problems.append(str(e))
            continue
        sig = (len(sl.sources), sl.base is not None, repr(per_model), repr(global_))
        if sig not in probed:
            probed[sig] = _probe(method, len(sl.sources), sl.base is not None, per_model, global_)
        if probed[sig] is not None:
            planner.problems.append(f"tensor {out_name!r}: {method.name}: {probed[sig]}")
            continue
        dtype = out_dtype or ref_info.dtype
        n_in = len(names)
        parts = job_parts(ref_info.shape, by_rows=method.elementwise)
        blocks: tuple[tuple[int, int], ...] = ()
        block_share = 0.0  # a two-phase job holds one block's inputs at a time
        if len(parts) > 1 and _two_phases(method, global_):  # one job over all the blocks
            blocks = tuple(rows for rows, _ in parts if rows is not None)
            block_share = parts[0][1]
            parts = [(None, 1.0)]
        for rows, part in parts:
            task = _TensorTask(
                method,
                names[: len(sl.sources)],
                names[-1] if sl.base else None,
                per_model,
                global_,
                random_seed,
                out_name,
                rows,
                blocks,
            )
            inputs_bytes = 4 * ref_info.numel * (2 * n_in + 2) * (block_share or part)
            jobs.append(
                Job(
                    name=out_name,
                    shape=ref_info.shape,
                    dtype=dtype,
                    read_bytes=int(sum(i.nbytes for i in infos) * part),
                    work_bytes=int(inputs_bytes)
                    + (_kept_bytes(infos, sl.base is not None) if blocks else 0),
                    compute=_bind(task, run),
                    rows=rows,
                )
            )
            tasks.append(task)

    if copied:
        floats = [n for n, i in copied if i.is_float]
        (log.warning if floats else log.info)(
            "%d tensor(s) missing from some inputs copied from the %s: %s%s",
            len(copied),
            "base model" if any(sl.base for sl in slices) else "inputs that have them",
            ", ".join(n for n, _ in copied[:5]),
            f" (and {len(copied) - 5} more)" if len(copied) > 5 else "",
        )
    out_config = reference.config
    if out_config is not None:
        out_config = dict(out_config)
        if out_dtype is not None:
            out_config["torch_dtype"] = dtype_name(out_dtype)
            if "dtype" in out_config:
                out_config["dtype"] = dtype_name(out_dtype)
        if cfg.slices is not None:
            total = sum(sl.length for sl in slices)
            for k in _LAYER_COUNT_KEYS:
                if k in out_config:
                    out_config[k] = total
    return MergePlan(
        config=cfg,
        method=method,
        jobs=jobs,
        reference=reference,
        tokenizer_source=_tokenizer_source(planner, cfg, reference),
        out_config=out_config,
        problems=planner.problems,
        tasks=tasks,
        run=run,
        inputs=list(planner._open.values()),
    )


def _infos(
    planner: _Planner, srcs: list[_Source], names: list[tuple[Checkpoint, str]]
) -> list[TensorInfo] | None:
    infos: list[TensorInfo] = []
    for src, (ckpt, tname) in zip(srcs, names, strict=True):
        if tname not in ckpt.tensors:
            planner.problems.append(f"model {src.ref!r} has no tensor {tname!r}")
            return None
        infos.append(ckpt.tensors[tname])
    shapes = {i.shape for i in infos}
    if len(shapes) > 1:
        detail = ", ".join(f"{s.ref}: {list(i.shape)}" for s, i in zip(srcs, infos, strict=True))
        planner.problems.append(f"shape mismatch for tensor {names[0][1]!r}: {detail}")
        return None
    return infos


def _donor(names: list[tuple[Checkpoint, str]], has_base: bool) -> int | None:
    """Which input to copy a tensor from when some inputs lack it (``None``: all have it, or
    the gap is an error for :func:`_infos` to report).

    With a base (the last input), a tensor the base has is copied from it when every other
    input lacks it, or when it is not floating point (a buffer such as ``position_ids``, which
    transformers 5 no longer saves): mergekit likewise takes such a buffer from the base, and
    merges only the inputs that have an optional weight (here: only the base). Without a
    base, a non-float tensor is copied from the first input that has it, as mergekit copies
    a buffer the inputs that have it agree on. A float tensor missing from some, but not all,
    of the other inputs stays an error.
    """
    present = [tname in ckpt.tensors for ckpt, tname in names]
    if all(present) or not any(present):
        return None
    if has_base:
        ckpt, tname = names[-1]
        if present[-1] and (not any(present[:-1]) or not ckpt.tensors[tname].is_float):
            return len(names) - 1
        return None
    first = present.index(True)
    ckpt, tname = names[first]
    return None if ckpt.tensors[tname].is_float else first


def _bind(task: _TensorTask, run: _Run) -> Callable[[], JobResult]:
    return lambda: task.run(run)


def _copy_job(
    out_name: str, where: tuple[Checkpoint, str], info: TensorInfo, dtype: torch.dtype | None = None
) -> Job:
    ckpt, name = where
    return Job(
        out_name, info.shape, dtype or info.dtype, info.nbytes, info.nbytes, lambda: ckpt.read(name)
    )


def _tokenizer_source(planner: _Planner, cfg: MergeConfig, reference: Checkpoint) -> Checkpoint:
    if cfg.chat_template is not None:
        raise ConfigError("chat_template is not supported yet; the tokenizer source's is copied")
    unsupported = sorted(set(cfg.tokenizer or {}) - {"source"})
    if unsupported:
        raise ConfigError(f"tokenizer: {', '.join(unsupported)} not supported yet (only source)")
    source = cfg.tokenizer_source or (cfg.tokenizer or {}).get("source") or "base"
    if source == "base":
        return reference
    if source == "union":
        inputs = list(planner._open.values())
        files = [_tokenizer_files(c) for c in inputs]
        same = all(
            [p.name for p in f] == [p.name for p in files[0]]
            and all(filecmp.cmp(a, b, shallow=False) for a, b in zip(f, files[0], strict=True))
            for f in files
        )
        if not same:
            raise ConfigError(
                "tokenizer_source: union of different tokenizers is not supported yet; "
                "name one model (or 'base') as tokenizer_source"
            )
        return reference
    return planner.checkpoint(str(source))


def _device(spec: str | torch.device) -> torch.device:
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {spec!r} (examples: cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {spec!r}: only cpu and cuda are supported")
    return device


def _tokenizer_files(ckpt: Checkpoint) -> list[Path]:
    return [p for p in ckpt.side_files() if p.name.startswith(_TOKENIZER_FILES)]


def merge(
    config: str | os.PathLike[str] | dict[str, Any] | MergeConfig,
    out: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    threads: int | None = None,
    overwrite: bool = False,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    random_seed: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> MergePlan | FdaMerge:
    """Plan, validate and (unless ``dry_run``) run a merge into the folder ``out``.

    ``merge_method: fda`` runs :mod:`taskvec.fda` (forward passes, not a per-tensor method) and
    returns its validated :class:`~taskvec.fda.config.FdaMerge` instead of a plan.

    ``device`` is where the methods compute (e.g. ``"cuda"``); reading, writing and random
    draws stay on the CPU, so the output does not depend on it beyond float rounding."""
    cfg = parse_config(config)
    if cfg.merge_method == FDA_METHOD:
        return _merge_fda(
            config, cfg, out, dry_run, threads, overwrite, random_seed, progress, device
        )
    plan = plan_merge(config, random_seed=random_seed)
    plan.run.device = _device(device)
    out_path = Path(out).expanduser().absolute()
    try:
        check_output_path(out_path, overwrite)
        check_not_an_input(out_path, plan.inputs)
    except TaskvecError as e:
        plan.problems.append(str(e))
    if dry_run:
        return plan
    if plan.problems:
        more = f" (and {len(plan.problems) - 1} more problem(s))" if len(plan.problems) > 1 else ""
        raise IncompatibleError(plan.problems[0] + more)
    n_threads = threads or default_threads()
    plan.prepare(n_threads, progress)
    writer = CheckpointWriter(
        out_path,
        planned_tensors(plan.jobs),
        shard_size=shard_size,
        overwrite=overwrite,
        metadata={"taskvec.merge_method": plan.method.name},
    )
    with writer:
        execute(plan.jobs, writer, threads=n_threads, progress=progress, description="merging")
        tok = set(_tokenizer_files(plan.tokenizer_source))
        for f in plan.reference.side_files():
            if f.name != "config.json" and not f.name.startswith(_TOKENIZER_FILES):
                writer.add_file(f)
        for f in tok:
            writer.add_file(f)
        if plan.out_config is not None:
            writer.add_json("config.json", plan.out_config)
        writer.commit()
    log.info("merged %s tensors into %s", len(planned_tensors(plan.jobs)), out_path)
    return plan


def _merge_fda(
    source: str | os.PathLike[str] | dict[str, Any] | MergeConfig,
    cfg: MergeConfig,
    out: str | os.PathLike[str],
    dry_run: bool,
    threads: int | None,
    overwrite: bool,
    random_seed: int | None,
    progress: bool,
    device: str | torch.device,
) -> FdaMerge:
    from taskvec.fda.config import parse_fda, run_fda  # torch.func etc. only when used

    config_dir = Path(source).parent if isinstance(source, str | os.PathLike) else None
    plan = parse_fda(cfg, config_dir, random_seed)
    out_path = Path(out).expanduser().absolute()
    try:
        check_output_path(out_path, overwrite)
    except TaskvecError as e:
        plan.problems.append(str(e))
    if not plan.problems:
        run_fda(plan, out_path, dry_run=True)
    if plan.problems and not dry_run:
        raise IncompatibleError(plan.problems[0])
    if dry_run:
        return plan
    return run_fda(
        plan, out_path, overwrite=overwrite, threads=threads, progress=progress, device=device
    )
