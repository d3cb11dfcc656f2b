"""The merge-method interface and registry.

A merge method is a small pure function over the stacked tensors of one parameter::

    @merge_method("linear", base="unused", per_model={"weight": Param(REQUIRED)},
                  globals={"normalize": True}, reference="Wortsman et al. 2022")
    def linear(tensors, base, *, weight, normalize): ...

Every parameter is declared with its default and valid values (a
:class:`~taskvec.methods.params.Param`, or a plain bool for a true/false switch); the planner
checks every resolved value against them before any tensor is read.

* ``tensors``: float tensor of shape ``(N, *shape)``, one row per input model. The base model
  is not among them unless the config lists it under ``models``, or the method has no base
  role (``base="unused"``): then, as in mergekit, a ``base_model`` that ``models`` does not
  list is the last input;
  ``tensors`` and ``base`` are the call's own buffers: a method may overwrite them
  (``tensors.sub_(base)``) to save copies of the largest things in memory;
* ``base``: the base model's tensor (``*shape``), or ``None`` when the method uses no base;
* per-model parameters arrive as float64 tensors of shape ``(N,)`` (so ⌊density·n⌋ uses the
  config's exact value), global ones as Python scalars;
* methods marked ``random=True`` also get ``generator``, a seeded ``torch.Generator``;
* methods marked ``wants_name=True`` also get ``name``, the output tensor's name (for methods
  whose rule depends on what the tensor is, e.g. embeddings); they must default it to ``None``.

A method that needs a whole-model statistic (a global magnitude threshold, the Gram matrix of
the task vectors) declares a :class:`WholeModelPass`: the engine first streams every tensor
through ``collect`` and sums the results, then ``finalize`` turns the sum into extra global
parameters that every call of the method receives. The method stays per-tensor and pure.

A method that is elementwise once it knows a statistic of the whole tensor (Model Stock's
cosines between the task vectors) declares ``elementwise=True`` and a :class:`TensorPass`.
A tensor too large for one block of elementwise work is then merged by one job in two phases
over its row blocks, reading each input once: ``collect`` writes each block's partial result
into ``partial`` (the block's rows of a buffer the size of the tensor, in the working dtype)
and returns the block's share of the statistic (summed over the blocks); ``finish`` turns each
partial result, the block's base rows and the summed statistic into the merged rows, which the
engine writes block by block. Both phases get the base rows as stored (e.g. bfloat16, kept
between the phases); the method converts them, or lets torch's mixed-dtype arithmetic do it
(``finish`` can then skip a converted copy). A tensor done in one piece is a plain call of
the method, which computes the statistic itself. The working set is the tensor in float32 and
its base rows, plus one block's inputs.

A method that needs per-model statistics computed on data (``taskvec stats``) declares their
kind, ``statistics="gram"`` or ``"fisher"``; each model of the config then names its statistics
folder (``statistics:``), checked against the model before any tensor is read, and every call
gets ``stats``: the statistics of all the inputs stacked, ``(N, in, in)`` for the Gram matrix
of a Linear weight's input, ``(N, *shape)`` for a diagonal Fisher, or ``None`` for a tensor
that has none (e.g. a bias); so does the ``collect`` of its whole-model pass, if any.

The function returns the merged tensor (``*shape``). It never reads files, picks dtypes or
devices, or knows about other tensors: the engine streams, schedules and writes.

A method that is no function per tensor (FDA's forward passes, EMR's folder of masks) is a
whole-model :class:`~taskvec.methods.pipeline.PipelineMethod`, in this same registry
(:func:`register_method`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from taskvec.errors import ConfigError
from taskvec.methods.params import REQUIRED as REQUIRED  # re-exported: methods import it here
from taskvec.methods.params import Param

if TYPE_CHECKING:
    from taskvec.methods.pipeline import PipelineMethod

BaseUse = Literal["required", "optional", "unused"]
StatisticsKind = Literal["gram", "fisher"]
MethodFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class WholeModelPass:
    """A streamed first pass over every tensor (see the module docstring).

    ``collect(tensors, base, **params) -> Tensor`` (summed over tensors; like the method, it
    gets its own buffers and may overwrite them), ``finalize(total, **params) -> dict`` of
    extra globals (``params`` of the first tensor),
    ``wanted(**globals) -> bool`` says whether this configuration needs the pass at all.
    """

    collect: Callable[..., torch.Tensor]
    finalize: Callable[..., dict[str, Any]]
    wanted: Callable[..., bool] = lambda **_: True


@dataclass(frozen=True)
class TensorPass:
    """Two phases over the row blocks of one large tensor (see the module docstring).

    ``collect(tensors, base, partial, **params) -> share`` for one row block fills ``partial``
    (it gets its own buffers and may overwrite them, but not ``base``, which it gets as
    stored); ``finish(partial, base, total, **params) -> rows``, where ``total`` is the sum of
    the blocks' shares, ``base`` the block's base rows as stored and ``finish`` may overwrite
    ``partial``;
    ``wanted(**globals) -> bool`` says whether this configuration needs the two phases at all.
    """

    collect: Callable[..., torch.Tensor]
    finish: Callable[..., torch.Tensor]
    wanted: Callable[..., bool] = lambda **_: True


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, what it needs and its documented parameters
    (``per_model`` and ``globals`` map each name to its default, ``params`` to its
    :class:`Param`)."""

    name: str
    fn: MethodFn
    base: BaseUse
    per_model: dict[str, Any] = field(default_factory=dict)
    globals: dict[str, Any] = field(default_factory=dict)
    reference: str = ""
    random: bool = False
    min_models: int = 1
    whole_model: WholeModelPass | None = None
    elementwise: bool = False
    wants_name: bool = False
    tensor_pass: TensorPass | None = None
    params: dict[str, Param] = field(default_factory=dict)
    statistics: StatisticsKind | None = None

    @property
    def formula(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def check_parameter(self, key: str, where: str) -> Literal["per_model", "global"]:
        if key in self.per_model:
            return "per_model"
        if key in self.globals:
            return "global"
        known = sorted({*self.per_model, *self.globals})
        hint = difflib.get_close_matches(key, known, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(
            f"{where}: {key!r} is not a parameter of {self.name} "
            f"(it takes: {', '.join(known) or 'none'}){suggestion}"
        )


_REGISTRY: dict[str, MergeMethod | PipelineMethod] = {}


def register_method(method: MergeMethod | PipelineMethod) -> None:
    """Add ``method`` under its name: a per-tensor method (see :func:`merge_method`) or a
    whole-model pipeline method (:mod:`taskvec.methods.pipeline`), one registry for both."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _REGISTRY[method.name] = method


def merge_method(
    name: str,
    *,
    base: BaseUse,
    per_model: dict[str, Param] | None = None,
    globals: dict[str, Param | bool] | None = None,
    reference: str = "",
    random: bool = False,
    min_models: int = 1,
    whole_model: WholeModelPass | None = None,
    elementwise: bool = False,
    wants_name: bool = False,
    tensor_pass: TensorPass | None = None,
    statistics: StatisticsKind | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` under ``name`` (see the module docstring for the calling convention)."""

    def register(fn: MethodFn) -> MethodFn:
        if whole_model is not None and tensor_pass is not None:
            raise ValueError(f"merge method {name!r}: whole_model or tensor_pass, not both")
        if statistics is not None and (tensor_pass or elementwise):
            raise ValueError(f"merge method {name!r}: statistics come with whole tensors only")
        params = _declared(name, per_model or {}, globals or {})
        register_method(
            MergeMethod(
                name,
                fn,
                base,
                {k: params[k].default for k in per_model or {}},
                {k: params[k].default for k in globals or {}},
                reference,
                random,
                min_models,
                whole_model,
                elementwise,
                wants_name,
                tensor_pass,
                params,
                statistics,
            )
        )
        return fn

    return register


def _declared(
    name: str, per_model: dict[str, Param], globals: dict[str, Param | bool]
) -> dict[str, Param]:
    """Every parameter as a :class:`Param` (a bool default is a plain switch); per-model
    parameters are numbers, and nothing is left without its valid values."""
    params: dict[str, Param] = {}
    for key, spec in [*per_model.items(), *globals.items()]:
        if isinstance(spec, bool):
            spec = Param(spec)
        if not isinstance(spec, Param) or (key in per_model and spec.kind != "number"):
            raise ValueError(
                f"merge method {name!r}: declare parameter {key!r} as a Param with its valid "
                "values (per-model parameters are numbers)"
            )
        params[key] = spec
    return params


def get_method(name: str) -> MergeMethod | PipelineMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(
            f"unknown merge_method {name!r} (known: {', '.join(sorted(_REGISTRY))}){suggestion}"
        ) from None


def all_methods() -> dict[str, MergeMethod | PipelineMethod]:
    return dict(sorted(_REGISTRY.items()))
