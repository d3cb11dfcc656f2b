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
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from taskvec import faults, methods
from taskvec.algebra import (
    TASK_VECTOR_KIND,
    AppliedModel,
    CheckpointModel,
    StoredVector,
    base_mismatch,
)
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
from taskvec.io.checkpoint import Checkpoint, TensorInfo, check_not_an_input, open_checkpoint
from taskvec.io.dtypes import computable, dtype_name, parse_dtype
from taskvec.io.manifest import describe_inputs
from taskvec.io.memory_sink import MemorySink
from taskvec.io.statistics import Statistics, open_statistics
from taskvec.io.writer import (
    DEFAULT_SHARD_SIZE,
    CheckpointWriter,
    check_output_path,
    finished_output,
)
from taskvec.layout import LayerLayout
from taskvec.methods.pipeline import PipelineMerge, PipelineMethod
from taskvec.methods.registry import REQUIRED, MergeMethod, TensorPass, WholeModelPass
from taskvec.model_card import merge_card
from taskvec.model_view import ModelView
from taskvec.output_config import config_changes, restack_layers, with_dtype

log = logging.getLogger("taskvec")

_FIRST_PASS = "first-pass.pt"  # the whole-model pass's results, kept by a resumable writer
_TOKENIZER_FILES = (
    "tokenizer",
    "vocab",
    "merges",
    "special_tokens_map",
    "added_tokens",
    "chat_template",
    "spiece",  # T5's SentencePiece model
    "sentencepiece",  # XLM-R's sentencepiece.bpe.model
)


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
    where: str = "parameters"  # names the slice in errors about its global parameters


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
    notes: list[str] = field(default_factory=list)  # facts --dry-run reports (task vectors...)
    side_files: dict[str, Path] = field(default_factory=dict)  # copied into the output
    refs: dict[str, Checkpoint] = field(default_factory=dict)  # config name -> what it holds

    @property
    def whole_model_pass(self) -> bool:
        """Whether the method needs a streamed first pass over every tensor."""
        return bool(self.tasks) and _first_pass(self.method, self.tasks[0].global_) is not None

    @property
    def context(self) -> dict[str, Any]:
        """The extra globals the whole-model pass produced (empty before :meth:`prepare`)."""
        return self.run.context

    def prepare(
        self, threads: int, progress: bool = True, writer: CheckpointWriter | None = None
    ) -> None:
        """Run the whole-model pass, if any, filling the context the tensor jobs receive.

        A resumable ``writer`` keeps the results, and gives back those an earlier run kept."""
        if not self.whole_model_pass:
            return
        kept = writer.load_state(_FIRST_PASS) if writer is not None else None
        if kept is not None:
            self.context.update(kept)
            log.info("whole-model pass of %s: kept from the interrupted run", self.method.name)
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
            faults.reached("first-pass")
        bar.close()
        first = self.tasks[0]
        self.context.update(first_pass.finalize(total, **first.per_model, **first.global_))
        if writer is not None:
            writer.save_state(_FIRST_PASS, self.context)
        faults.reached("first-pass-done")
        log.info("whole-model pass of %s done", self.method.name)

    def summary(self, threads: int) -> PlanSummary:
        return summarize(self.jobs, threads)

    def config_lines(self) -> list[str]:
        """What the output's config.json will be: each key that differs from the reference's
        (``key: old -> new``), for ``--dry-run``."""
        if self.out_config is None:
            return ["config.json:       none (the reference model has none)"]
        changes = config_changes(self.reference.config or {}, self.out_config)
        return [f"config.json:       {c}" for c in changes] or [
            f"config.json:       {self.reference.root / 'config.json'} as it is"
        ]


class _Planner:
    def __init__(self, cfg: MergeConfig, config_dir: Path | None, random_seed: int | None):
        self.cfg = cfg
        self.config_dir = config_dir
        self.seed = random_seed
        method = methods.get_method(cfg.merge_method)
        if isinstance(method, PipelineMethod):
            raise ConfigError(f"{method.name} is a whole-model pipeline method: use merge()")
        self.method = method
        self._open: dict[str, Checkpoint] = {}  # the model each config name stands for
        # what each config name's path holds (a task vector itself, where _open has base + τ)
        self.opened: dict[str, Checkpoint] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []  # what --dry-run reports besides the summary
        self._bases = {cfg.base_model, *(sl.base_model for sl in cfg.slices or [])} - {None}
        self._statistics: dict[str, Statistics] = {}  # config name -> its checked statistics

    # --- inputs ----------------------------------------------------------------------------
    def checkpoint(self, ref: str) -> Checkpoint:
        if ref not in self._open:
            from taskvec.references import open_reference  # store:NAME, model+adapter

            if (special := open_reference(ref, self._local)) is not None:
                self.opened[ref] = special
                self._open[ref] = self._as_model(ref, special)
                return self._open[ref]
            if "+" in ref and not self._local(ref).exists():
                raise ConfigError(
                    f"model {ref!r}: MODEL+ADAPTER needs a PEFT LoRA adapter folder (with "
                    f"adapter_config.json) after the '+': {ref.rpartition('+')[2]!r} is not one"
                )
            path = self._local(ref)
            if not path.exists():
                raise CheckpointError(
                    f"model {ref!r}: no such local file or folder (taskvec reads local "
                    "checkpoints; download hub models first)"
                )
            self.opened[ref] = open_checkpoint(path)
            self._open[ref] = self._as_model(ref, self.opened[ref])
        return self._open[ref]

    def _local(self, ref: str) -> Path:
        """The path ``ref`` names: as given, else relative to the config file's folder."""
        path = Path(ref).expanduser()
        if not path.exists() and self.config_dir is not None and not path.is_absolute():
            alt = self.config_dir / path
            path = alt if alt.exists() else path
        return path

    def statistics(self, sources: list[_Source]) -> list[Statistics] | None:
        """Each source's statistics (its ``statistics:`` folder, checked against its model),
        when the method uses statistics; ``None`` when it does not."""
        kind, m = self.method.statistics, self.method
        given = {im.model: im.statistics for im in self.cfg.models or [] if im.statistics}
        if kind is None:
            if given:
                log.warning("%s uses no statistics: the models' statistics are ignored", m.name)
            return None
        for src in sources:
            if src.ref in self._statistics:
                continue
            if src.ref not in given:
                raise ConfigError(
                    f"model {src.ref!r}: {m.name} needs {kind} statistics of every model it "
                    f"merges: give `statistics:` (a taskvec stats --kind {kind} folder) next to "
                    "it under models"
                )
            path = self._local(given[src.ref])
            self._statistics[src.ref] = open_statistics(path, src.ckpt, kind, f"model {src.ref!r}")
            examples = self._statistics[src.ref].ckpt.metadata.get("taskvec.examples", "?")
            self.notes.append(f"model {src.ref!r}: {kind} statistics {path} ({examples} examples)")
        return [self._statistics[src.ref] for src in sources]

    def _as_model(self, ref: str, ckpt: Checkpoint) -> Checkpoint:
        """``ckpt``, or for a saved task vector τ the model ``base + τ`` it stands for (the
        top-level base_model's; τ must have been extracted from it)."""
        if ckpt.metadata.get("taskvec.kind") != TASK_VECTOR_KIND:
            return ckpt
        if ref in self._bases:
            raise ConfigError(f"base_model {ref!r} is a task vector; the base must be a model")
        base_ref = self.cfg.base_model
        if base_ref is None:
            raise ConfigError(f"model {ref!r} is a task vector; a base_model is needed to merge it")
        base, tau = CheckpointModel(self.checkpoint(base_ref)), StoredVector(ckpt)
        problem = base_mismatch(base, tau)
        if problem is not None:
            raise IncompatibleError(
                f"model {ref!r}: {problem}; apply it to its own base (or with taskvec apply "
                "--any-base) and merge that model"
            )
        self.notes.append(f"model {ref!r}: task vector applied to base {base_ref!r}")
        return ModelView(AppliedModel(base, tau, allow_other_base=True), ckpt.path)

    def inputs(self) -> list[Checkpoint]:
        """The checkpoints the merge reads (for a task vector, it and its base; statistics)."""
        read = [*self.opened.values(), *(st.ckpt for st in self._statistics.values())]
        return list({id(c): c for c in read}.values())

    def check_parameters(self) -> None:
        m, cfg = self.method, self.cfg
        for im in cfg.models or []:
            if im.data is not None:  # not silently ignored
                raise ConfigError(f"model {im.model!r}: {m.name} runs no data; drop `data:`")
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
        return _Slice(sources, base, sl.parameters, length, f"slices[{i}]")

    # --- per tensor -----------------------------------------------------------------------
    def parameters(
        self, sl: _Slice, name: str, t: float
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every parameter's value for tensor ``name`` at layer position ``t``, each checked
        against the method's declared valid values (see :mod:`taskvec.methods.params`)."""
        top, n = self.cfg.parameters, len(sl.sources)
        per_model: dict[str, torch.Tensor] = {}
        for key in self.method.per_model:
            values = [
                self._value(key, [s.parameters, sl.parameters, top], f"model {s.ref!r}", name, t, n)
                for s in sl.sources
            ]
            per_model[key] = torch.tensor(values, dtype=torch.float64)
        global_ = {
            key: self._value(key, [sl.parameters, top], sl.where, name, t, n)
            for key in self.method.globals
        }
        return per_model, global_

    def _value(
        self, key: str, levels: list[Parameters], where: str, name: str, t: float, n: int
    ) -> Any:
        """One parameter's value (the most specific level's, else its default), checked."""
        spec = self.method.params[key]
        found, v = lookup(key, levels, name, t)
        if not found and spec.default is REQUIRED:
            unmatched = (
                f" (no filter matches tensor {name!r})" if any(key in p for p in levels) else ""
            )
            raise ConfigError(
                f"{where}: missing required parameter {key!r} of {self.method.name}{unmatched}"
            )
        try:
            return spec.check(key, v if found else spec.default, n)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}{'' if found else ' (the default value)'}") from None


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
    stats: tuple[tuple[Checkpoint, str], ...] = ()  # each input's statistic, if it has one

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
        """The base tensor (its rows ``[start, stop)`` for a row block) as stored (float8 as
        float16, which torch computes with), on ``device``."""
        if self.base is None:
            return None
        return computable(self.base[0].read(self.base[1], self.rows)).to(device)

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
            self.load_stats(stacked.device),
        )

    def load_stats(self, device: torch.device) -> torch.Tensor | None:
        """The inputs' statistics of this tensor stacked as ``(N, *statistic shape)`` in
        float32 on ``device``, or ``None`` when it has none."""
        if not self.stats:
            return None
        ckpt, key = self.stats[0]
        stacked = torch.empty((len(self.stats), *ckpt.tensors[key].shape), dtype=torch.float32)
        for i, (ckpt, key) in enumerate(self.stats):
            stacked[i].copy_(ckpt.read(key))
        return stacked.to(device)

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
        extra = {"stats": self.load_stats(stacked.device)} if self.method.statistics else {}
        return first_pass.collect(stacked, base, **per_model, **self.global_, **extra).cpu()


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
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    extra: dict[str, Any] = {}
    if method.statistics is not None:
        extra["stats"] = stats
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
            extra = {"stats": None} if method.statistics else {}
            total = first_pass.collect(x.clone(), base, **per_model, **global_, **extra)
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
    :func:`_donor`), with one log message for all such tensors; a float tensor an input has
    and the base lacks is a problem (see :func:`_check_kept`). A saved task vector τ given as
    a model is the model ``base_model + τ`` (see :meth:`_Planner._as_model`): its base is
    hashed once (cached) to check τ's recorded fingerprint.
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
    statistics = {id(sl): planner.statistics(sl.sources) for sl in slices}
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
        stats = _tensor_statistics(planner, sl.sources, names, statistics[id(sl)])
        if stats is None:
            continue
        t = layout.relative_position(layer, 0, sl.length)
        try:
            per_model, global_ = planner.parameters(sl, out_name, t)
        except ConfigError as e:  # once, however many tensors it concerns
            if str(e) not in planner.problems:
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
                stats,
            )
            inputs_bytes = 4 * ref_info.numel * (2 * n_in + 2) * (block_share or part)
            jobs.append(
                Job(
                    name=out_name,
                    shape=ref_info.shape,
                    dtype=dtype,
                    read_bytes=int(sum(i.nbytes for i in infos) * part)
                    + sum(ckpt.tensors[key].nbytes for ckpt, key in stats),
                    work_bytes=int(inputs_bytes)
                    + (_kept_bytes(infos, sl.base is not None) if blocks else 0)
                    + _stats_bytes(stats),
                    compute=_bind(task, run),
                    rows=rows,
                )
            )
            tasks.append(task)

    role = "base" if ref_slice.base or (cfg.models is not None and cfg.base_model) else "model"
    _check_kept(planner, slices, reference, role, layout_of, stacked=cfg.models is None)
    if copied:
        floats = [n for n, i in copied if i.is_float]
        (log.warning if floats else log.info)(
            "%d tensor(s) missing from some inputs copied from the %s: %s%s",
            len(copied),
            "base model" if any(sl.base for sl in slices) else "inputs that have them",
            ", ".join(n for n, _ in copied[:5]),
            f" (and {len(copied) - 5} more)" if len(copied) > 5 else "",
        )
    _check_configs(planner)
    tokenizer_source = _tokenizer_source(planner, cfg, reference)
    return MergePlan(
        config=cfg,
        method=method,
        jobs=jobs,
        reference=reference,
        tokenizer_source=tokenizer_source,
        out_config=_out_config(reference, slices if cfg.slices else None, layout, out_dtype),
        side_files=_side_files(reference, tokenizer_source),
        refs=dict(planner.opened),
        problems=planner.problems,
        tasks=tasks,
        run=run,
        inputs=planner.inputs(),
        notes=planner.notes,
    )


def _tensor_statistics(
    planner: _Planner,
    srcs: list[_Source],
    names: list[tuple[Checkpoint, str]],
    statistics: list[Statistics] | None,
) -> tuple[tuple[Checkpoint, str], ...] | None:
    """Where each source's statistic of its tensor is: all of them, or none (``()``) when
    the method uses none or no source has one; ``None`` (a problem noted) when some sources
    have one and others lack it."""
    if statistics is None:
        return ()
    inputs = names[: len(srcs)]  # without the base, which has no statistics
    keys = [st.keys.get(tname) for st, (_, tname) in zip(statistics, inputs, strict=True)]
    if all(k is None for k in keys):
        return ()
    if any(k is None for k in keys):
        have = next(s.ref for s, k in zip(srcs, keys, strict=True) if k is not None)
        lack = next(s.ref for s, k in zip(srcs, keys, strict=True) if k is None)
        planner.problems.append(
            f"tensor {names[0][1]!r}: the statistics of model {lack!r} lack it, those of model "
            f"{have!r} have it"
        )
        return None
    return tuple((st.ckpt, k) for st, k in zip(statistics, keys, strict=True) if k is not None)


def _stats_bytes(stats: tuple[tuple[Checkpoint, str], ...]) -> int:
    """A job's memory for its statistics: stacked in float32, plus a float64 workspace of
    three statistics (RegMean's summed, shrunk and factorised Gram matrices)."""
    if not stats:
        return 0
    ckpt, key = stats[0]
    return 4 * ckpt.tensors[key].numel * (len(stats) + 6)


def _check_configs(planner: _Planner) -> None:
    """Read every input's config.json now: the output's config and model card use them, so a
    corrupt one is a problem of the plan, not a failure after the merge."""
    for ckpt in planner.inputs():
        try:
            _ = ckpt.config
        except CheckpointError as e:
            planner.problems.append(str(e))


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
    if len({i.is_float for i in infos}) > 1:  # an integer tensor would be merged as numbers
        detail = ", ".join(
            f"{s.ref}: {dtype_name(i.dtype)}" for s, i in zip(srcs, infos, strict=True)
        )
        planner.problems.append(
            f"tensor {names[0][1]!r} is floating point in some inputs only: {detail}"
        )
        return None
    return infos


def _check_kept(
    planner: _Planner,
    slices: list[_Slice],
    reference: Checkpoint,
    role: str,
    layout_of: Callable[[Checkpoint], LayerLayout],
    stacked: bool,
) -> None:
    """Refuse a float tensor of an input that the output has no place for, as it would be
    dropped: the output takes the tensor names of the reference (the ``role`` "base", else the
    first "model"), or for slices (``stacked``) its names outside the layers and its layer
    suffixes, within the layers each input contributes. A non-float one (a buffer such as
    ``position_ids``) is left out with a warning."""
    ref_layout = layout_of(reference)
    places = {
        (layer is not None, key)
        for n in reference.tensors
        for layer, key in [ref_layout.split(n) if stacked else (None, n)]
    }
    left: dict[tuple[int, str], TensorInfo] = {}
    for sl in slices:
        for src in [*sl.sources, *([sl.base] if sl.base else [])]:
            layout = layout_of(src.ckpt)
            for name, info in src.ckpt.tensors.items():
                layer, key = layout.split(name) if stacked else (None, name)
                if layer is not None and not src.start <= layer < src.start + sl.length:
                    continue  # a layer this input does not contribute
                if (layer is not None, key) not in places:
                    left.setdefault((id(src.ckpt), name), info)
    for info in left.values():
        if info.is_float:
            planner.problems.append(
                f"tensor {info.name!r} of {info.file} is missing from the {role} "
                f"{reference.path}, whose tensors the output has: it would be dropped"
            )
    buffers = sorted({i.name for i in left.values() if not i.is_float})
    if buffers:
        log.warning(
            "left out %d non-float tensor(s) that the %s %s lacks: %s",
            len(buffers),
            role,
            reference.path,
            ", ".join(buffers[:5]) + (" ..." if len(buffers) > 5 else ""),
        )


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
            list(f) == list(files[0])
            and all(filecmp.cmp(f[n], files[0][n], shallow=False) for n in f)
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


def _tokenizer_files(ckpt: Checkpoint) -> dict[str, Path]:
    return {n: p for n, p in ckpt.side_files().items() if n.startswith(_TOKENIZER_FILES)}


def _side_files(reference: Checkpoint, tokenizer_source: Checkpoint) -> dict[str, Path]:
    """The files copied into the output: the reference's, but the tokenizer files of the
    tokenizer source, and no config.json (the plan writes its own)."""
    ours = {
        n: p
        for n, p in reference.side_files().items()
        if n != "config.json" and not n.startswith(_TOKENIZER_FILES)
    }
    return {**ours, **_tokenizer_files(tokenizer_source)}


def _out_config(
    reference: Checkpoint,
    slices: list[_Slice] | None,
    layout: LayerLayout,
    dtype: torch.dtype | None,
) -> dict[str, Any] | None:
    """The output's config.json: the reference's, with the output dtype and, for a
    layer-stacking merge, the layers of ``slices`` (see :mod:`taskvec.output_config`)."""
    config = reference.config
    if config is None:
        return None
    if slices is not None:
        configs: dict[int, dict[str, Any] | None] = {}
        origins: list[tuple[dict[str, Any] | None, int]] = []
        for sl in slices:
            donor = sl.base or sl.sources[0]
            if id(donor.ckpt) not in configs:
                configs[id(donor.ckpt)] = donor.ckpt.config
            origins += [(configs[id(donor.ckpt)], donor.start + k) for k in range(sl.length)]
        config = restack_layers(config, origins, layout.num_layers)
    return with_dtype(config, dtype)


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
    resume: bool = False,
) -> MergePlan | PipelineMerge:
    """Plan, validate and (unless ``dry_run``) run a merge into the folder ``out``.

    A whole-model pipeline method (``fda``, ``emr``: :mod:`taskvec.methods.pipeline`) plans
    and runs itself; its plan comes back as a :class:`~taskvec.methods.pipeline.PipelineMerge`.

    ``device`` is where the methods compute (e.g. ``"cuda"``); reading, writing and random
    draws stay on the CPU, so the output does not depend on it beyond float rounding.

    With ``resume`` the merge is built in ``.OUT.partial``, which an interrupted or killed run
    keeps; the next run with ``resume`` (same config, inputs and options) continues it, and
    writes the same bytes as an uninterrupted run."""
    cfg = parse_config(config)
    method = methods.get_method(cfg.merge_method)
    if isinstance(method, PipelineMethod):
        if resume:
            raise ConfigError(f"merge_method {method.name} cannot be resumed (drop --resume)")
        config_dir = Path(config).parent if isinstance(config, str | os.PathLike) else None
        pipeline = PipelineMerge(method, method.plan(cfg, config_dir, random_seed))
        run = {"threads": threads, "progress": progress, "device": device}
        return _run_pipeline(pipeline, Path(out), dry_run, overwrite, run)
    plan = plan_merge(config, random_seed=random_seed)
    plan.run.device = _device(device)
    out_path = Path(out).expanduser().absolute()
    n_threads = threads or default_threads()
    metadata = {"taskvec.merge_method": plan.method.name}
    producer = {
        "operation": "merge",
        "method": plan.method.name,
        "config": cfg.model_dump(mode="json", exclude_none=True),
        "seed": random_seed,
        "device": str(plan.run.device),
    }
    if (
        resume
        and not (dry_run or overwrite or plan.problems)
        and out_path.is_dir()
        and finished_output(
            out_path,
            planned_tensors(plan.jobs),
            shard_size=shard_size,
            metadata=metadata,
            producer={**producer, "inputs": describe_inputs(plan.inputs, n_threads)},
        )
    ):
        log.info("%s is already this merge's output: nothing left to do", out_path)
        return plan
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
    writer = CheckpointWriter(
        out_path,
        planned_tensors(plan.jobs),
        shard_size=shard_size,
        overwrite=overwrite,
        metadata=metadata,
        producer=lambda: {**producer, "inputs": describe_inputs(plan.inputs, n_threads)},
        resume=resume,
    )
    with writer:
        jobs = [j for j in plan.jobs if not (resume and writer.resumed(j.name, j.rows))]
        if jobs:
            plan.prepare(n_threads, progress, writer)
        execute(jobs, writer, threads=n_threads, progress=progress, description="merging")
        writer.add_files(plan.side_files)
        writer.add_text("README.md", merge_card(plan, out_path.name, random_seed))
        if plan.out_config is not None:
            writer.add_json("config.json", plan.out_config)
        writer.commit()
    log.info("merged %s tensors into %s", len(planned_tensors(plan.jobs)), out_path)
    return plan


class MergedTensors(NamedTuple):
    """A merge held in memory: its tensors by name, and the folder whose config and
    tokenizer describe them (the reference model a saved merge would copy them from)."""

    tensors: dict[str, torch.Tensor]
    reference: Path


def merge_tensors(
    config: str | os.PathLike[str] | dict[str, Any] | MergeConfig,
    *,
    threads: int | None = None,
    random_seed: int | None = None,
) -> MergedTensors:
    """Plan and run a per-tensor merge into memory, nothing written (the inputs are read
    through the page cache, so merging the same inputs again, as a coefficient search does,
    reads no disk). Whole-model pipeline methods are refused."""
    plan = plan_merge(config, random_seed=random_seed)  # a pipeline method: one line
    if plan.problems:
        raise IncompatibleError(plan.problems[0])
    n_threads = threads or default_threads()
    sink = MemorySink(planned_tensors(plan.jobs))
    plan.prepare(n_threads, progress=False)
    execute(plan.jobs, sink, threads=n_threads, progress=False, description="merging")
    return MergedTensors(sink.tensors, plan.reference.root)


def _run_pipeline(
    pipeline: PipelineMerge, out: Path, dry_run: bool, overwrite: bool, run: dict[str, Any]
) -> PipelineMerge:
    """Check the output path, then (unless ``dry_run``, and only without problems) run."""
    out_path = out.expanduser().absolute()
    try:
        check_output_path(out_path, overwrite)
    except TaskvecError as e:
        pipeline.problems.append(str(e))
    if dry_run:
        return pipeline
    if pipeline.problems:
        raise IncompatibleError(pipeline.problems[0])
    pipeline.method.run(pipeline.plan, out_path, overwrite=overwrite, **run)
    log.info("wrote %s with %s to %s", pipeline.method.output, pipeline.method.name, out_path)
    return pipeline
