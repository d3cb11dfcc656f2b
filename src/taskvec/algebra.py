"""Lazy task-vector algebra (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

``Model`` and ``TaskVector`` are expressions, not tensors. Building ``base + 0.3 * (ft_a - base)``
reads nothing but headers; names, shapes and compatibility are checked at once. Tensors are
computed one name at a time when the expression is saved, reduced (``norm``, ``dot``) or
materialised, each checkpoint tensor being read once per name however often it appears.

Semantics by name:

* ``ft - base`` (a :class:`TaskVector`) covers the floating-point tensors the two models share;
  tensors only one of them has (a task head, say) are left out, with a log message.
* ``tv_a + tv_b`` covers the union of their names; a tensor missing from one counts as zero.
* ``base + tv`` has the names of ``base``; ``tv``'s tensors must all exist in ``base`` with the
  same shape, and tensors ``tv`` lacks are copied from ``base``. A task vector loaded from disk
  must come from ``base`` itself (same content fingerprint) unless asked otherwise: see
  :func:`base_mismatch` and :func:`apply`.
* ``(m1 + m2) / 2`` or ``0.5 * m1 + 0.5 * m2`` is a weighted average of models (a model soup);
  the weights must sum to 1.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from taskvec.engine import (
    Job,
    default_threads,
    execute,
    job_parts,
    parallel_map,
    planned_tensors,
)
from taskvec.errors import CheckpointError, IncompatibleError
from taskvec.io.checkpoint import Checkpoint, check_not_an_input, open_checkpoint
from taskvec.io.dtypes import element_size, parse_dtype
from taskvec.io.fingerprint import content_fingerprint
from taskvec.io.manifest import describe_inputs
from taskvec.io.writer import DEFAULT_SHARD_SIZE, CheckpointWriter, check_output_path
from taskvec.model_card import CardInput, expression_card
from taskvec.output_config import with_dtype

log = logging.getLogger("taskvec")

TASK_VECTOR_KIND = "task_vector"


class _Cache(dict[int, torch.Tensor]):
    """The tensors read while evaluating one name (or one row range of it), by checkpoint."""

    def __init__(self, rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.rows = rows


@dataclass(frozen=True)
class Spec:
    """Shape and native dtype of one tensor of an expression."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _read(ckpt: Checkpoint, name: str, cache: _Cache) -> torch.Tensor:
    """Read ``name`` from ``ckpt`` once per evaluation, upcast to the compute dtype if float."""
    key = id(ckpt)
    if key not in cache:
        t = ckpt.read(name, cache.rows)
        cache[key] = t.to(_compute_dtype(t.dtype)) if t.is_floating_point() else t
    return cache[key]


def _fingerprint(specs: dict[str, Spec]) -> str:
    """Structural fingerprint: a hash of the float tensors' names and shapes (what task
    vectors saved by older taskvec recorded as their base's fingerprint: 16 hex digits)."""
    h = hashlib.sha256()
    for name in sorted(specs):
        if specs[name].dtype.is_floating_point:
            h.update(f"{name}:{list(specs[name].shape)};".encode())
    return h.hexdigest()[:16]


def _check_shapes(name: str, a: Spec, b: Spec, what: str) -> None:
    if a.shape != b.shape:
        raise IncompatibleError(
            f"shape mismatch for tensor {name!r}: {list(a.shape)} vs {list(b.shape)} ({what})"
        )


class _Expr:
    """Shared machinery of lazy expressions: name specs and streamed evaluation."""

    @property
    def specs(self) -> dict[str, Spec]:
        raise NotImplementedError

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        raise NotImplementedError

    def _leaves(self) -> list[Checkpoint]:
        raise NotImplementedError

    # --- public, shared by models and task vectors -----------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Compute one tensor, or its rows ``[start, stop)`` (float32, or float64 if an input
        is float64)."""
        if name not in self.specs:
            raise KeyError(name)
        return self._eval(name, _Cache(rows))

    def state_dict(self, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Materialise every tensor (in ``dtype``, default each tensor's native dtype)."""
        want = parse_dtype(dtype)
        out = {}
        for name, spec in self.specs.items():
            t = self._eval(name, _Cache())
            out[name] = t.to(want or spec.dtype) if t.is_floating_point() else t
        return out

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def _jobs(self, dtype: torch.dtype | None) -> list[Job]:
        leaves = self._leaves()
        jobs = []
        for name, spec in self.specs.items():
            read = sum(c.tensors[name].nbytes for c in leaves if name in c)
            floating = spec.dtype.is_floating_point
            out = dtype if (dtype is not None and floating) else spec.dtype
            # every operation is elementwise, so large tensors are evaluated in row chunks
            for rows, part in job_parts(spec.shape, by_rows=floating):
                numel = int(math.prod(spec.shape) * part)
                jobs.append(
                    Job(
                        name=name,
                        shape=spec.shape,
                        dtype=out,
                        read_bytes=int(read * part),
                        work_bytes=int(read * part) + 4 * numel * (len(leaves) + 1),
                        compute=_bind(self._eval, name, rows),
                        rows=rows,
                    )
                )
        return jobs

    def _save(
        self,
        path: str | os.PathLike[str],
        *,
        dtype: str | torch.dtype | None,
        shard_size: int | str,
        overwrite: bool,
        threads: int | None,
        progress: bool,
        metadata: dict[str, str],
        side_files: Mapping[str, Path],
        config: dict[str, Any] | None,
        description: str,
        card: Callable[[], str] | None = None,
        records: Mapping[str, dict[str, Any] | bytes] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> Path:
        """Evaluate and write the output; ``records`` are files written into it (a dict as
        JSON, bytes as they are), ``provenance`` extra keys of the manifest's producer."""
        want = parse_dtype(dtype)
        jobs = self._jobs(want)
        n_threads = threads or default_threads()
        out = Path(path).expanduser().absolute()
        check_not_an_input(out, self._leaves())
        check_output_path(out, overwrite)
        writer = CheckpointWriter(
            out,
            planned_tensors(jobs),
            shard_size=shard_size,
            metadata=metadata,
            overwrite=overwrite,
            producer=lambda: {
                "operation": description,
                "expression": repr(self),
                "inputs": describe_inputs(_unique(self._leaves()), n_threads),
                **(provenance or {}),
            },
        )
        with writer:
            execute(jobs, writer, threads=n_threads, progress=progress, description=description)
            writer.add_files({n: p for n, p in side_files.items() if n != "config.json"})
            if card is not None:
                writer.add_text("README.md", card())
            if config is not None:
                writer.add_json("config.json", config)
            for name, record in (records or {}).items():
                if isinstance(record, bytes):
                    writer.add_bytes(name, record)
                else:
                    writer.add_json(name, record)
            return writer.commit()


def _bind(
    fn: Callable[[str, _Cache], torch.Tensor], name: str, rows: tuple[int, int] | None
) -> Callable[[], torch.Tensor]:
    return lambda: fn(name, _Cache(rows))


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


class Model(_Expr):
    """Full model weights, lazily evaluated. ``tv.load(path)`` returns one for a checkpoint."""

    def __sub__(self, other: object) -> TaskVector:
        if isinstance(other, Model):
            return DiffVector(self, other)
        if isinstance(other, TaskVector):
            return AppliedModel(self, -other)  # type: ignore[return-value]
        return NotImplemented

    def __add__(self, other: object) -> Any:
        if isinstance(other, TaskVector):
            return AppliedModel(self, other)
        if isinstance(other, Model | WeightedModels):
            return WeightedModels([(1.0, self)]) + other
        return NotImplemented

    def __mul__(self, c: float) -> Model | WeightedModels:
        if not isinstance(c, int | float):
            return NotImplemented
        return WeightedModels([(float(c), self)])._settle()  # 1·m is m itself

    __rmul__ = __mul__

    @property
    def primary(self) -> Checkpoint:
        """The checkpoint whose layout and side files (config, tokenizer) this model carries."""
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        """The content fingerprint (``c1:…``, see :mod:`taskvec.io.fingerprint`) of a model
        read from a checkpoint; ``None`` for an expression (a soup, ``base + τ``…), which has
        no file content: save it to get one."""
        return None

    def _anchor(self) -> CheckpointModel | None:
        """The checkpoint this model is built on by adding task vectors (itself for a
        checkpoint): the base a stored task vector applied to it must come from."""
        return None

    def patched(self, tensors: Mapping[str, torch.Tensor]) -> Model:
        """This model with the named tensors replaced by ``tensors`` (same shapes)."""
        return PatchedModel(self, tensors)

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        dtype: str | torch.dtype | None = None,
        shard_size: int | str = DEFAULT_SHARD_SIZE,
        overwrite: bool = False,
        threads: int | None = None,
        progress: bool = True,
        records: Mapping[str, dict[str, Any] | bytes] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> Path:
        """Evaluate tensor by tensor and write a ``save_pretrained``-style folder atomically.

        The side files of :attr:`primary` (config, tokenizer, remote code...: see
        :mod:`taskvec.io.side_files`) are copied alongside, with the config's dtype updated
        when ``dtype`` is given, and a model card (``README.md``) names the expression and its
        inputs. ``records`` are extra files of the output (a dict is written as JSON, bytes as
        they are; ``/`` makes folders), e.g. a method's learned coefficients; ``provenance``
        adds keys to what ``taskvec-manifest.json`` says produced the output.
        """
        config = self.primary.config
        want = parse_dtype(dtype)
        return self._save(
            path,
            dtype=want,
            shard_size=shard_size,
            overwrite=overwrite,
            threads=threads,
            progress=progress,
            metadata={},
            side_files=self.primary.side_files(),
            config=None if config is None else with_dtype(config, want),
            description="saving model",
            card=lambda: self._card(Path(path).name),
            records=records,
            provenance=provenance,
        )

    def _card(self, title: str) -> str:
        """The model card of this model saved as ``title``."""
        inputs = [
            CardInput(
                "task vector" if "taskvec.kind" in c.metadata else "model",  # or EMR's
                str(c.path),
                c,
            )
            for c in self._leaves()
        ]
        return expression_card(title, repr(self), inputs, self.primary)


class CheckpointModel(Model):
    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    @cached_property
    def specs(self) -> dict[str, Spec]:  # type: ignore[override]
        return {n: Spec(i.shape, i.dtype) for n, i in self.ckpt.tensors.items()}

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        return _read(self.ckpt, name, cache)

    def _leaves(self) -> list[Checkpoint]:
        return [self.ckpt]

    @property
    def primary(self) -> Checkpoint:
        return self.ckpt

    def fingerprint(self) -> str:
        return content_fingerprint(self.ckpt)

    def _anchor(self) -> CheckpointModel:
        return self

    def __repr__(self) -> str:
        return f"Model({str(self.ckpt.path)!r})"


class AppliedModel(Model):
    """``base + tv``: the base's tensors, shifted by the task vector where it has them.

    A stored task vector (see :func:`base_mismatch`) must come from this base, unless
    ``allow_other_base``."""

    def __init__(self, base: Model, tv: TaskVector, allow_other_base: bool = False) -> None:
        self.base, self.tv = base, tv
        base_specs = base.specs
        for name, spec in tv.specs.items():
            if name not in base_specs:
                raise IncompatibleError(
                    f"task vector tensor {name!r} does not exist in the base model "
                    f"({base_specs and next(iter(base_specs))!r}... has {len(base_specs)} tensors)"
                )
            _check_shapes(name, base_specs[name], spec, "base vs task vector")
        problem = None if allow_other_base else base_mismatch(base, tv)
        if problem is not None:
            raise IncompatibleError(
                f"{problem}; to apply it anyway: apply(..., allow_other_base=True), "
                "or taskvec apply --any-base"
            )

    @property
    def specs(self) -> dict[str, Spec]:  # type: ignore[override]
        return self.base.specs

    def _anchor(self) -> CheckpointModel | None:
        return self.base._anchor()

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        base = self.base._eval(name, cache)
        if name not in self.tv.specs:
            return base
        return base + self.tv._eval(name, cache)

    def _leaves(self) -> list[Checkpoint]:
        return _unique(self.base._leaves() + self.tv._leaves())

    @property
    def primary(self) -> Checkpoint:
        return self.base.primary

    def __repr__(self) -> str:
        return f"({self.base!r} + {self.tv!r})"


class PatchedModel(Model):
    """A model with some tensors replaced by in-memory values (e.g. blocks a method retrained)."""

    def __init__(self, model: Model, patches: Mapping[str, torch.Tensor]) -> None:
        specs = model.specs
        for name, t in patches.items():
            if name not in specs:
                raise IncompatibleError(f"patched tensor {name!r} does not exist in the model")
            _check_shapes(name, specs[name], Spec(tuple(t.shape), t.dtype), "model vs patch")
        self.model = model
        self.patches = dict(patches)

    @property
    def specs(self) -> dict[str, Spec]:  # type: ignore[override]
        return self.model.specs

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        if name not in self.patches:
            return self.model._eval(name, cache)
        t = self.patches[name]
        t = t if cache.rows is None else t[cache.rows[0] : cache.rows[1]]
        return t.to(_compute_dtype(t.dtype)) if t.is_floating_point() else t

    def _leaves(self) -> list[Checkpoint]:
        return self.model._leaves()

    @property
    def primary(self) -> Checkpoint:
        return self.model.primary

    def __repr__(self) -> str:
        return f"{self.model!r}.patched({len(self.patches)} tensors)"


class SoupModel(Model):
    """A weighted average of models, Σ cᵢ θᵢ with Σ cᵢ = 1 (Wortsman et al., model soups)."""

    def __init__(self, terms: list[tuple[float, Model]]) -> None:
        self.terms = terms
        first = terms[0][1].specs
        common = dict(first)
        for _, m in terms[1:]:
            other = m.specs
            for name in list(common):
                if name not in other:
                    del common[name]
                elif common[name].dtype.is_floating_point:
                    _check_shapes(name, common[name], other[name], "between averaged models")
        if not common:
            raise IncompatibleError("the averaged models have no tensor name in common")
        self._specs = common

    @property
    def specs(self) -> dict[str, Spec]:  # type: ignore[override]
        return self._specs

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        first = self.terms[0][1]._eval(name, cache)
        if not first.is_floating_point():
            return first
        out = torch.zeros_like(first)
        for c, m in self.terms:
            out.add_(m._eval(name, cache), alpha=c)
        return out

    def _leaves(self) -> list[Checkpoint]:
        return _unique([leaf for _, m in self.terms for leaf in m._leaves()])

    def _anchor(self) -> CheckpointModel | None:
        anchors = [m._anchor() for _, m in self.terms]  # a soup of base + τᵢ is built on base
        if any(a is None for a in anchors):
            return None
        return anchors[0] if len({a.fingerprint() for a in anchors if a}) == 1 else None

    @property
    def primary(self) -> Checkpoint:
        return self.terms[0][1].primary

    def __repr__(self) -> str:
        return " + ".join(f"{c:g}*{m!r}" for c, m in self.terms)


class WeightedModels:
    """An intermediate ``c₁·m₁ + c₂·m₂ + …``; becomes a :class:`SoupModel` once Σcᵢ = 1."""

    def __init__(self, terms: list[tuple[float, Model]]) -> None:
        self.terms = terms

    @property
    def total(self) -> float:
        return sum(c for c, _ in self.terms)

    def _settle(self) -> Model | WeightedModels:
        if len(self.terms) > 1 and math.isclose(self.total, 1.0, abs_tol=1e-9):
            return SoupModel(self.terms)
        if len(self.terms) == 1 and math.isclose(self.terms[0][0], 1.0):
            return self.terms[0][1]
        return self

    def __add__(self, other: object) -> Model | WeightedModels:
        if isinstance(other, Model):
            other = WeightedModels([(1.0, other)])
        if not isinstance(other, WeightedModels):
            return NotImplemented
        return WeightedModels(self.terms + other.terms)._settle()

    __radd__ = __add__

    def __mul__(self, c: float) -> Model | WeightedModels:
        if not isinstance(c, int | float):
            return NotImplemented
        return WeightedModels([(w * c, m) for w, m in self.terms])._settle()

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> Model | WeightedModels:
        return self * (1.0 / c)

    def __repr__(self) -> str:
        return f"<weighted models, weights sum to {self.total:g}: divide by it to get a model soup>"


# ------------------------------------------------------------------------------------------------
# Task vectors
# ------------------------------------------------------------------------------------------------


class TaskVector(_Expr):
    """τ = θ_ft − θ_base as a lazy expression; supports ``+``, ``-``, unary ``-``, ``*``, ``/``."""

    def __add__(self, other: object) -> Any:
        if isinstance(other, TaskVector):
            return CombinedVector(_terms(self) + _terms(other))
        if isinstance(other, Model):
            return AppliedModel(other, self)
        return NotImplemented

    def __radd__(self, other: object) -> TaskVector:
        if other == 0:  # so that sum([tv_a, tv_b]) works
            return self
        return NotImplemented

    def __sub__(self, other: object) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return CombinedVector(_terms(self) + [(-c, v) for c, v in _terms(other)])

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def __mul__(self, c: float) -> TaskVector:
        if not isinstance(c, int | float) or isinstance(c, bool):
            return NotImplemented
        return CombinedVector([(w * float(c), v) for w, v in _terms(self)])

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> TaskVector:
        if not isinstance(c, int | float):
            return NotImplemented
        return self * (1.0 / c)

    def select(self, include: str | Iterable[str], exclude: str | Iterable[str] = ()) -> TaskVector:
        """Keep the tensors whose names match ``include`` and not ``exclude``.

        Patterns are shell globs (``"encoder.layer.*.attention.*"``) or, prefixed with ``re:``,
        regular expressions searched in the name.
        """
        return SelectedVector(self, _matcher(include), _matcher(exclude, empty=False))

    # --- streamed reductions -----------------------------------------------------------------
    def _reduce(
        self, fn: Callable[[str], float], threads: int | None = None, names: list[str] | None = None
    ) -> float:
        """Σ fn(name) over names in a fixed order (identical results for any thread count)."""
        names = names if names is not None else self.names
        return math.fsum(parallel_map(fn, names, threads or default_threads()))

    def dot(self, other: TaskVector, threads: int | None = None) -> float:
        """⟨τ_a, τ_b⟩ over the tensors both vectors have, accumulated in float64."""
        shared = [n for n in self.specs if n in other.specs]
        for n in shared:
            _check_shapes(n, self.specs[n], other.specs[n], "dot product")

        def part(n: str) -> float:
            a = self._eval(n, _Cache()).reshape(-1).double()
            b = other._eval(n, _Cache()).reshape(-1).double()
            return float(torch.dot(a, b))

        return self._reduce(part, threads, shared)

    def norm(self, threads: int | None = None) -> float:
        """‖τ‖₂ over all tensors."""

        def part(n: str) -> float:
            a = self._eval(n, _Cache()).reshape(-1).double()
            return float(torch.dot(a, a))

        return math.sqrt(self._reduce(part, threads))

    def cosine(self, other: TaskVector, threads: int | None = None) -> float:
        """cos(τ_a, τ_b) = ⟨τ_a, τ_b⟩ / (‖τ_a‖ ‖τ_b‖); 0 if either vector is zero."""
        denom = self.norm(threads) * other.norm(threads)
        return self.dot(other, threads) / denom if denom > 0 else 0.0

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        dtype: str | torch.dtype | None = None,
        shard_size: int | str = DEFAULT_SHARD_SIZE,
        overwrite: bool = False,
        threads: int | None = None,
        progress: bool = True,
        base: Model | None = None,
    ) -> Path:
        """Save the task vector on its own (safetensors, tagged as a task vector).

        ``base`` (default: the model it was computed from, when known) is recorded by its
        content fingerprint and path, so that applying the vector to another base is refused
        (see :func:`base_mismatch`). A base that is not one saved checkpoint (an expression)
        has no fingerprint: none is recorded, with a warning.
        """
        record = _record_of(base) if base is not None else self._base_record()
        meta = {"taskvec.kind": TASK_VECTOR_KIND}
        info: dict[str, Any] = {"kind": TASK_VECTOR_KIND, "tensors": len(self.specs)}
        if record is None:
            log.warning(
                "%s: no base fingerprint recorded (the base is not one saved checkpoint), so "
                "applying this task vector cannot be checked",
                path,
            )
        else:
            meta["taskvec.base_fingerprint"] = info["base_fingerprint"] = record.fingerprint
            meta["taskvec.base_path"] = info["base_path"] = record.path
        out = self._save(
            path,
            dtype=dtype,
            shard_size=shard_size,
            overwrite=overwrite,
            threads=threads,
            progress=progress,
            metadata=meta,
            side_files={},
            config=None,
            description="saving task vector",
            records={"taskvec.json": info},
        )
        return out

    def _base_record(self) -> BaseRecord | None:
        """The base this vector was extracted from, when known."""
        return None

    def _stored(self) -> list[StoredVector]:
        """The stored task vectors this expression reads."""
        return []


@dataclass(frozen=True)
class BaseRecord:
    """The base a task vector was extracted from: its fingerprint and where it was read."""

    fingerprint: str
    path: str


def _record_of(model: Model) -> BaseRecord | None:
    fp = model.fingerprint()
    return None if fp is None else BaseRecord(fp, str(model.primary.path))


def is_structural(fingerprint: str) -> bool:
    """Whether a recorded base fingerprint is an older, structural one (16 hex digits)."""
    return re.fullmatch(r"[0-9a-f]{16}", fingerprint) is not None


def base_mismatch(model: Model, tv: TaskVector) -> str | None:
    """Why the stored task vectors in ``tv`` may not be applied to ``model``; ``None`` if they
    may.

    A stored vector records its base's content fingerprint: ``model`` must be a checkpoint with
    the same one, or be built on one by adding task vectors (``base + τ₁`` takes τ₂ of the
    same base). A vector saved by older taskvec records a structural fingerprint (tensor names
    and shapes): only those are compared, as a log line says. A vector recording no
    fingerprint cannot be checked: it is applied with a warning.
    """
    for v in tv._stored():
        record = v._base_record()
        if record is None:
            log.warning("%r records no base fingerprint: not checked against %r", v, model)
        elif is_structural(record.fingerprint):
            log.info(
                "%r records a structural base fingerprint (older taskvec): only tensor names "
                "and shapes are compared",
                v,
            )
            have = _fingerprint(model.specs)
            if have != record.fingerprint:
                return (
                    f"task vector {v.ckpt.path} was extracted from {record.path} (structural "
                    f"fingerprint {record.fingerprint}), whose tensor names or shapes differ "
                    f"from those of {model!r} ({have})"
                )
        elif (anchor := model._anchor()) is None:
            return (
                f"cannot check that task vector {v.ckpt.path} (extracted from {record.path}, "
                f"{record.fingerprint}) fits {model!r}: it is not a saved checkpoint plus "
                "task vectors"
            )
        elif (have := anchor.fingerprint()) != record.fingerprint:
            return (
                f"task vector {v.ckpt.path} was extracted from {record.path} "
                f"({record.fingerprint}), not from the base {anchor.ckpt.path} ({have})"
            )
    return None


def _terms(tv: TaskVector) -> list[tuple[float, TaskVector]]:
    return list(tv.terms) if isinstance(tv, CombinedVector) else [(1.0, tv)]


def _unique(leaves: list[Checkpoint]) -> list[Checkpoint]:
    return list({id(c): c for c in leaves}.values())


class DiffVector(TaskVector):
    """``ft - base``, over the floating-point tensors both models have."""

    def __init__(self, ft: Model, base: Model) -> None:
        self.ft, self.base = ft, base
        fs, bs = ft.specs, base.specs
        specs: dict[str, Spec] = {}
        for name, spec in fs.items():
            if name in bs and spec.dtype.is_floating_point:
                _check_shapes(name, spec, bs[name], "fine-tuned vs base")
                specs[name] = spec
        if not specs:
            raise IncompatibleError(
                f"{ft!r} and {base!r} share no floating-point tensor name; "
                "are they the same architecture?"
            )
        only_ft = [n for n in fs if n not in bs]
        if only_ft:
            log.info(
                "task vector leaves out %d tensor(s) only in the fine-tuned model, e.g. %s",
                len(only_ft),
                only_ft[0],
            )
        self._specs = specs

    @property
    def specs(self) -> dict[str, Spec]:  # type: ignore[override]
        return self._specs

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        return self.ft._eval(name, cache) - self.base._eval(name, cache)

    def _leaves(self) -> list[Checkpoint]:
        return _unique(self.ft._leaves() + self.base._leaves())

    def _base_record(self) -> BaseRecord | None:
        return _record_of(self.base)

    def __repr__(self) -> str:
        return f"({self.ft!r} - {self.base!r})"


class StoredVector(TaskVector):
    """A task vector saved on its own with :meth:`TaskVector.save`."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    @cached_property
    def specs(self) -> dict[str, Spec]:  # type: ignore[override]
        return {n: Spec(i.shape, i.dtype) for n, i in self.ckpt.tensors.items() if i.is_float}

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        return _read(self.ckpt, name, cache)

    def _leaves(self) -> list[Checkpoint]:
        return [self.ckpt]

    @property
    def base_fingerprint(self) -> str | None:
        return self.ckpt.metadata.get("taskvec.base_fingerprint")

    def _base_record(self) -> BaseRecord | None:
        fp = self.base_fingerprint
        if fp is None:
            return None
        path = self.ckpt.metadata.get("taskvec.base_path")
        if path is None:  # saved by older taskvec: the path is only in taskvec.json
            try:
                path = json.loads((self.ckpt.root / "taskvec.json").read_text())["base_path"]
            except (OSError, ValueError, KeyError, TypeError):
                path = "an unrecorded base"
        return BaseRecord(fp, str(path))

    def _stored(self) -> list[StoredVector]:
        return [self]

    def __repr__(self) -> str:
        return f"TaskVector({str(self.ckpt.path)!r})"


class CombinedVector(TaskVector):
    """Σ cᵢ τᵢ over the union of the vectors' tensors (a missing tensor counts as zero)."""

    def __init__(self, terms: list[tuple[float, TaskVector]]) -> None:
        self.terms = terms
        specs: dict[str, Spec] = {}
        for _, v in terms:
            for name, spec in v.specs.items():
                if name in specs:
                    _check_shapes(name, specs[name], spec, "between added task vectors")
                else:
                    specs[name] = spec
        self._specs = specs

    @property
    def specs(self) -> dict[str, Spec]:  # type: ignore[override]
        return self._specs

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        out: torch.Tensor | None = None
        for c, v in self.terms:
            if name in v.specs:
                term = v._eval(name, cache) * c
                out = term if out is None else out.add_(term)
        assert out is not None  # every name comes from at least one term
        return out

    def _leaves(self) -> list[Checkpoint]:
        return _unique([leaf for _, v in self.terms for leaf in v._leaves()])

    def _base_record(self) -> BaseRecord | None:
        records = [v._base_record() for _, v in self.terms]
        if any(r is None for r in records) or len({r.fingerprint for r in records if r}) > 1:
            return None
        return records[0]

    def _stored(self) -> list[StoredVector]:
        return [s for _, v in self.terms for s in v._stored()]

    def __repr__(self) -> str:
        return " + ".join(f"{c:g}*{v!r}" for c, v in self.terms)


class SelectedVector(TaskVector):
    """The tensors of a task vector whose names pass a filter."""

    def __init__(
        self, tv: TaskVector, keep: Callable[[str], bool], drop: Callable[[str], bool]
    ) -> None:
        self.tv = tv
        self._specs = {n: s for n, s in tv.specs.items() if keep(n) and not drop(n)}
        if not self._specs:
            raise IncompatibleError("the name filter selects no tensor of the task vector")

    @property
    def specs(self) -> dict[str, Spec]:  # type: ignore[override]
        return self._specs

    def _eval(self, name: str, cache: _Cache) -> torch.Tensor:
        return self.tv._eval(name, cache)

    def _leaves(self) -> list[Checkpoint]:
        return self.tv._leaves()

    def _base_record(self) -> BaseRecord | None:
        return self.tv._base_record()

    def _stored(self) -> list[StoredVector]:
        return self.tv._stored()


def _matcher(patterns: str | Iterable[str], empty: bool = True) -> Callable[[str], bool]:
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    if not pats:
        return lambda _: empty
    regexes = []
    for p in pats:
        src = p[3:] if p.startswith("re:") else fnmatch.translate(p)
        try:
            regexes.append(re.compile(src))
        except re.error as e:
            raise IncompatibleError(f"bad name pattern {p!r}: {e}") from None
    return lambda name: any(
        (r.search(name) if p.startswith("re:") else r.match(name))
        for r, p in zip(regexes, pats, strict=True)
    )


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Model | TaskVector:
    """Open a checkpoint lazily: a :class:`TaskVector` if saved as one (or a PEFT LoRA
    adapter folder, see :mod:`taskvec.peft_lora`), else a :class:`Model`."""
    from taskvec.peft_lora import is_adapter, load_adapter

    if is_adapter(path):
        return load_adapter(path)
    ckpt = open_checkpoint(path)
    if ckpt.metadata.get("taskvec.kind") == TASK_VECTOR_KIND:
        return StoredVector(ckpt)
    return CheckpointModel(ckpt)


def load_model(path: str | os.PathLike[str]) -> Model:
    """Like :func:`load`, but insist on full model weights."""
    m = load(path)
    if not isinstance(m, Model):
        raise CheckpointError(f"{path}: holds a task vector, not a model")
    return m


def analogy(a: Any, b: Any, c: Any) -> Any:
    """ "a is to b as c is to ?": ``c + (b − a)`` (for task vectors or models)."""
    return c + (b - a)


def apply(
    base: Model,
    vectors: Iterable[TaskVector],
    scale: float = 1.0,
    *,
    allow_other_base: bool = False,
) -> Model:
    """``base + scale · Σ vectors``, refusing stored vectors extracted from another base
    (see :func:`base_mismatch`) unless ``allow_other_base``: applying a vector to another
    base of the same architecture (a further fine-tune of its base, say) must be asked for."""
    vectors = list(vectors)
    if not vectors:
        raise IncompatibleError("no task vector to apply")
    return AppliedModel(base, scale * sum(vectors[1:], vectors[0]), allow_other_base)
