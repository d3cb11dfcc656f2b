"""Fuzzing the command line: every case ends in a correct merge or one error line.

Hypothesis generates merge configs (valid and invalid parameter values, dtypes, model lists
with missing paths, task vectors, the base itself, duplicates) and corrupted checkpoints
(truncations, overwritten header or data bytes, changed dtypes, broken metadata, index
damage). Each case runs ``taskvec merge`` in-process and must end in one of two ways:

* exit 0 with an output that matches an independent numpy re-derivation of the method's
  formula from the input files (read with the ``safetensors`` library, not taskvec), within
  the rounding of the output dtype;
* a non-zero exit with exactly one line ``taskvec: error: ...`` on stderr, no traceback, and
  nothing at (or beside) the output path.

An oracle written from the methods' papers and the documented parameter ranges says which of
the two each case must be: an exit 0 where the oracle expects an error (a silent wrong merge)
fails as much as a traceback does. ``FUZZ_EXAMPLES`` (environment) sets the examples per
category (default 300 of each); `--hypothesis-show-statistics` counts the outcomes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import load_folder, run_cli
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_foundation_errors import one_error_line
from test_methods_golden import np_combine, np_crumbs, np_slerp, np_trim

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LAYERS = 2
NAMES = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.mlp.weight": (8, 8),
    "model.layers.1.mlp.weight": (8, 8),
    "model.layers.0.norm.weight": (8,),
    "model.layers.1.norm.weight": (8,),
    "model.norm.weight": (8,),
}
BUFFER = "model.position_ids"  # a non-float tensor: copied from the base, never merged


# --------------------------------------------------------------------------------------------
# The inputs (made once): a base, three fine-tunes, a bfloat16 one, task vectors
# --------------------------------------------------------------------------------------------


@dataclass
class Zoo:
    root: Path
    paths: dict[str, Path]

    def values(self, ref: str, base: str = "base") -> dict[str, np.ndarray]:
        """The float64 values of input ``ref`` as the safetensors library reads them (a task
        vector stands for base + τ)."""
        if ref.startswith("tv"):
            tau = _read_np(self.paths[ref])
            b = _read_np(self.paths[base])
            return {
                n: (b[n].astype(np.float32) + tau[n].astype(np.float32)).astype(np.float64)
                if n in tau
                else b[n]
                for n in b
            }
        return _read_np(self.paths[ref])


def _read_np(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a one-file model folder, read by the safetensors library (floats as
    float64, others as stored)."""
    return _as_numpy(load_file(str(folder / "model.safetensors")))


def _as_numpy(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def _save(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": LAYERS, "torch_dtype": "float32"})
    )
    return folder


def _state(seed: int, around: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in NAMES.items():
        noise = torch.randn(shape, generator=g)
        sd[name] = noise * 0.5 if around is None else around[name] + 0.1 * noise
    sd[BUFFER] = torch.arange(8, dtype=torch.int64)
    return sd


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    from taskvec import load_model

    root = tmp_path_factory.mktemp("zoo")
    base = _state(0)
    other = _state(99)
    paths = {"base": _save(root / "base", base), "other_base": _save(root / "other", other)}
    for i in (1, 2, 3):
        paths[f"ft{i}"] = _save(root / f"ft{i}", _state(i, base))
    ft2 = load_file(str(paths["ft2"] / "model.safetensors"))
    bf = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ft2.items()}
    paths["ft2b"] = _save(root / "ft2b", bf)
    (load_model(paths["ft1"]) - load_model(paths["base"])).save(root / "tv1", progress=False)
    (load_model(paths["ft3"]) - load_model(paths["other_base"])).save(
        root / "tv_other", progress=False
    )
    paths["tv1"], paths["tv_other"] = root / "tv1", root / "tv_other"
    paths["missing"] = root / "no-such-model"
    return Zoo(root, paths)


# --------------------------------------------------------------------------------------------
# Outcome checks
# --------------------------------------------------------------------------------------------


def _run_merge(cfg: dict[str, Any] | str, work: Path) -> tuple[Any, Path]:
    config = work / "merge.yaml"
    config.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    out = work / "out"
    return run_cli("merge", config, out, "--no-progress"), out


def _assert_error(res: Any, out: Path, why: str) -> None:
    assert res.exit_code != 0, f"exit 0 where the oracle expects an error ({why})"
    one_error_line(res)
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, leftovers


ULP = {"float32": 2.0**-23, "bfloat16": 2.0**-8, "float16": 2.0**-10}


def _assert_matches(
    res: Any,
    out: Path,
    want: dict[str, np.ndarray],
    dtype: str | None,
    base: dict[str, np.ndarray],
    check: Any = None,
) -> None:
    assert res.exit_code == 0, f"oracle expects a merge, got: {res.stderr or res.exception!r}"
    got = load_folder(out)
    assert set(got) == set(base), sorted(set(got) ^ set(base))
    np.testing.assert_array_equal(got[BUFFER].numpy(), base[BUFFER])
    rel = ULP[dtype or "float32"]  # None: float32
    for name, ref in want.items():
        value = got[name]
        assert str(value.dtype) == f"torch.{dtype or 'float32'}", (name, value.dtype)
        v = value.double().numpy()
        tolerance = 64 * rel * (max(np.abs(ref).max(), np.abs(v).max()) + 1.0) + 1e-6
        if check is not None:
            check(name, v, tolerance)
            continue
        err = np.abs(v - ref).max()
        assert err <= tolerance, f"{name}: max error {err:.3g} vs the reference"


# --------------------------------------------------------------------------------------------
# Generated configs and their oracle
# --------------------------------------------------------------------------------------------

BAD_NUMBERS = [float("nan"), float("inf"), "abc", [], None, True]
METHODS = ["linear", "task_arithmetic", "ties", "breadcrumbs", "dare_linear", "slerp"]
PER_MODEL = {  # per-model parameters each method takes, with their valid ranges
    "linear": {"weight": (0.1, 1.0)},
    "task_arithmetic": {"weight": (-1.0, 1.0), "density": (0.05, 1.0)},
    "ties": {"weight": (-1.0, 1.0), "density": (0.05, 1.0)},
    "breadcrumbs": {"weight": (-1.0, 1.0), "density": (0.05, 1.0), "gamma": (0.0, 0.2)},
    "dare_linear": {"weight": (-1.0, 1.0), "density": (0.05, 1.0)},
    "slerp": {},
}
OUT_OF_RANGE = {"density": [-0.2, 0.0, 1.5], "gamma": [-0.1, 1.5], "weight": [], "t": [-0.5, 1.5]}


def valid_value(lo: float, hi: float) -> st.SearchStrategy[Any]:
    one = st.floats(lo, hi, allow_nan=False).map(lambda x: round(x, 3))
    return st.one_of(one, st.lists(one, min_size=2, max_size=2))


def param_value(key: str, lo: float, hi: float) -> st.SearchStrategy[tuple[bool, Any]]:
    bad = BAD_NUMBERS + OUT_OF_RANGE.get(key, [])
    good = valid_value(lo, hi).map(lambda v: (True, v))
    return st.one_of(good, good, good, good, st.sampled_from(bad).map(lambda v: (False, v)))


@st.composite
def configs(draw: st.DrawFn) -> tuple[dict[str, Any], bool, str]:
    """A config, whether the oracle says it is valid, and why not."""
    method = draw(st.sampled_from(METHODS))
    ok, why = True, ""

    def bad(reason: str) -> None:
        nonlocal ok, why
        ok, why = False, why or reason

    has_base = method != "linear"
    pool = ["ft1", "ft2", "ft3", "ft2b"] + (["tv1", "base"] if has_base else [])
    refs = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
    if draw(st.integers(0, 14)) == 0:
        refs.append(draw(st.sampled_from(["missing", "tv_other"])))
        bad(f"input {refs[-1]}")
    if method == "linear" and draw(st.integers(0, 5)) == 0:
        refs.append("tv1")  # a task vector without a base role
        bad("task vector without a base")
    params: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = [{} for _ in refs]
    for key, (lo, hi) in PER_MODEL[method].items():
        where = draw(
            st.sampled_from(
                ["top", "each", "absent"]
                if key != "weight"
                else ["top", "each", "each", "each", "absent"]
            )
        )
        if where == "top":
            good, v = draw(param_value(key, lo, hi))
            params[key] = v
            if not good:
                bad(f"{key}={v!r}")
        elif where == "each":
            for p in per_model:
                good, v = draw(param_value(key, lo, hi))
                p[key] = v
                if not good:
                    bad(f"{key}={v!r}")
        elif key == "weight":
            bad("no weight")
    if method == "slerp":
        choice = draw(st.sampled_from(["ok", "ok", "bad", "absent"]))
        if choice == "ok":
            params["t"] = round(draw(st.floats(0, 1)), 3)
        elif choice == "bad":
            params["t"] = draw(st.sampled_from(BAD_NUMBERS[:3] + OUT_OF_RANGE["t"]))
            bad(f"t={params['t']!r}")
        else:
            bad("no t")
        if len([r for r in refs if r != "base"]) != 1:
            bad("slerp takes one model besides the base")
    if method in ("task_arithmetic", "ties", "breadcrumbs", "dare_linear") and draw(st.booleans()):
        lam = draw(st.sampled_from([0.5, 1.0, -1.0, 2.0, float("nan"), float("inf")]))
        params["lambda"] = lam
        if not math.isfinite(lam):
            bad(f"lambda={lam}")
    if method == "dare_linear":  # the paper's 1/p rescale, none, or a mode that does not exist
        params["rescale"] = draw(st.sampled_from(["expectation", False, "bogus"]))
        if params["rescale"] == "bogus":
            bad("rescale bogus")
    if has_base and all(r == "base" for r in refs):
        bad("no model besides the base")
    dtype = draw(
        st.sampled_from([None] * 6 + ["float32", "bfloat16", "float16", "int64", "uint8", "foo"])
    )
    if dtype not in (None, "float32", "bfloat16", "float16"):
        bad(f"dtype {dtype}")
    cfg: dict[str, Any] = {"merge_method": method}
    if has_base:
        cfg["base_model"] = "base"
    cfg["models"] = [
        {"model": r, "parameters": p} if p else {"model": r}
        for r, p in zip(refs, per_model, strict=True)
    ]
    if params:
        cfg["parameters"] = params
    if dtype is not None:
        cfg["dtype"] = dtype
    return cfg, ok, why


def _resolve(value: Any, name: str) -> float:
    """A scalar or two-point gradient at this tensor (layer i of 2 sits at t = i)."""
    if not isinstance(value, list):
        return float(value)
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
    return float(value[layer])


def _lookup(key: str, own: dict[str, Any], top: dict[str, Any], name: str, default: Any) -> Any:
    for level in (own, top):
        if key in level:
            return _resolve(level[key], name)
    return default


def _reference(cfg: dict[str, Any], zoo: Zoo) -> tuple[dict[str, np.ndarray], Any]:
    """The merged float tensors by the methods' formulas (and a checker for DARE)."""
    method, top = cfg["merge_method"], cfg.get("parameters", {})
    entries = [(e["model"], e.get("parameters", {})) for e in cfg["models"]]
    entries = [(r, p) for r, p in entries if r != cfg.get("base_model")]
    base = zoo.values("base")
    inputs = [(zoo.values(r), p) for r, p in entries]
    want: dict[str, np.ndarray] = {}
    lam = float(top.get("lambda", 1.0))
    dare: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in NAMES:
        b = base[name].astype(np.float64)
        xs = np.stack([m[name].astype(np.float64) for m, _ in inputs])
        w = np.array([_lookup("weight", p, top, name, None) for _, p in inputs])
        d = [_lookup("density", p, top, name, 1.0) for _, p in inputs]
        if method == "linear":
            want[name] = (w.reshape(-1, *[1] * b.ndim) * xs).sum(0) / w.sum()
        elif method == "task_arithmetic":
            want[name] = np_combine(b, xs - b, w, consensus=False, normalize=False, lam=lam)
        elif method == "ties":
            deltas = np.stack([np_trim(x - b, di) for x, di in zip(xs, d, strict=True)])
            want[name] = np_combine(b, deltas, w, consensus=True, normalize=True, lam=lam)
        elif method == "breadcrumbs":
            g = [_lookup("gamma", p, top, name, 0.01) for _, p in inputs]
            deltas = np.stack(
                [np_crumbs(x - b, di, gi) for x, di, gi in zip(xs, d, g, strict=True)]
            )
            want[name] = np_combine(b, deltas, w, consensus=False, normalize=False, lam=lam)
        elif method == "dare_linear":
            # each entry keeps or drops each model's delta (rescaled by 1/density, or not)
            p = np.reshape(d, w.shape + (1,) * b.ndim) if top["rescale"] else 1.0
            terms = lam * w.reshape(-1, *[1] * b.ndim) * (xs - b) / p
            dare[name] = (b, terms)
            want[name] = b
        elif method == "slerp":
            want[name] = np_slerp(float(top["t"]), b, xs[0])

    def dare_check(name: str, got: np.ndarray, tolerance: float) -> None:
        b, terms = dare[name]
        sums = [
            b + sum(terms[i] for i in keep)
            for r in range(len(terms) + 1)
            for keep in itertools.combinations(range(len(terms)), r)
        ]
        err = np.min(np.abs(np.stack(sums) - got), axis=0)
        assert err.max() <= tolerance, f"{name}: not a DARE outcome (off by {err.max():.3g})"

    return want, dare_check if method == "dare_linear" else None


def _absolute(cfg: dict[str, Any], zoo: Zoo) -> dict[str, Any]:
    """The config with model names replaced by the zoo's paths."""
    cfg = json.loads(json.dumps(cfg))  # a deep copy (NaN survives json round trips here)
    if "base_model" in cfg:
        cfg["base_model"] = str(zoo.paths[cfg["base_model"]])
    for e in cfg["models"]:
        e["model"] = str(zoo.paths[e["model"]])
    return cfg


@SETTINGS
@given(case=configs())
def test_fuzz_configs(zoo: Zoo, case: tuple[dict[str, Any], bool, str]) -> None:
    cfg, ok, why = case
    with tempfile.TemporaryDirectory() as tmp:
        res, out = _run_merge(_absolute(cfg, zoo), Path(tmp))
        if not ok:
            _assert_error(res, out, why)
            event(f"refused: {why.split('=')[0]}")
            return
        event(f"merged: {cfg['merge_method']}")
        want, check = _reference(cfg, zoo)
        # by default the output takes the base's dtype, or the first model's without a base
        first = "base" if "base_model" in cfg else cfg["models"][0]["model"]
        dtype = cfg.get("dtype") or ("bfloat16" if first == "ft2b" else "float32")
        _assert_matches(res, out, want, dtype, zoo.values("base"), check)


# --------------------------------------------------------------------------------------------
# Corrupted checkpoints
# --------------------------------------------------------------------------------------------


def _header_span(data: bytes) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return 8, 8 + n


@st.composite
def corruptions(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "header_bytes",
                "data_bytes",
                "header_length",
                "metadata",
                "dtype",
                "shape",
                "drop_tensor",
                "extra_tensor",
                "empty",
                "nan",
                "config",
                "offsets",
            ]
        )
    )
    return kind, draw(st.randoms(use_true_random=False))


def _corrupt(src: Path, dst: Path, kind: str, rnd: Any) -> None:
    """Copy the model folder ``src`` to ``dst`` with one kind of damage to its weights file
    (or, for ``config``, to its config.json)."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start, end = _header_span(bytes(data))
    header = json.loads(data[start:end])
    if kind == "truncate":
        data = data[: rnd.randrange(0, len(data))]
    elif kind == "header_bytes":
        for _ in range(rnd.randint(1, 4)):
            data[rnd.randrange(start, end)] = rnd.randrange(256)
    elif kind == "data_bytes":
        for _ in range(rnd.randint(1, 16)):
            data[rnd.randrange(end, len(data))] = rnd.randrange(256)
    elif kind == "header_length":
        data[:8] = struct.pack("<Q", rnd.choice([0, 1, end - 9, end + 1, 2**40, 2**64 - 1]))
    elif kind in ("metadata", "dtype", "shape", "drop_tensor", "extra_tensor", "offsets"):
        name = rnd.choice(sorted(n for n in header if n != "__metadata__"))
        if kind == "metadata":
            header["__metadata__"] = rnd.choice(["text", [1, 2], {"format": 3}, 7])
        elif kind == "dtype":
            header[name]["dtype"] = rnd.choice(["I32", "F16", "BF16", "F8_E4M3", "U8", "XX"])
        elif kind == "shape":
            header[name]["shape"] = rnd.choice([[3], [], [1, 2, 3], [-1]])
        elif kind == "drop_tensor":
            del header[name]
        elif kind == "extra_tensor":
            header["model.extra.weight"] = dict(header[name])
        else:
            lo, hi = header[name]["data_offsets"]
            shift = rnd.choice([-4, 4, 1])
            header[name]["data_offsets"] = [lo + shift, hi + shift]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = bytearray(struct.pack("<Q", len(raw)) + raw + bytes(data[end:]))
    elif kind == "empty":
        data = bytearray()
    elif kind == "nan":
        name = rnd.choice(sorted(NAMES))
        lo, _ = header[name]["data_offsets"]
        pos = end + lo + 4 * rnd.randrange(math.prod(NAMES[name]))
        data[pos : pos + 4] = struct.pack("<f", rnd.choice([math.nan, math.inf, -math.inf]))
    elif kind == "config":
        (dst / "config.json").write_text(rnd.choice(["{", "", "[1, 2]", "\x00\x01"]))
    weights.write_bytes(bytes(data))


def _loads_cleanly(folder: Path, like: Path, is_base: bool) -> dict[str, np.ndarray] | None:
    """What the safetensors library reads from ``folder``, if it reads it at all with the
    names, shapes and dtypes of the model folder ``like``, finite values and a config.json
    holding a JSON object; else None."""
    want = load_file(str(like / "model.safetensors"))
    try:
        got = load_file(str(folder / "model.safetensors"))
    except Exception:  # the library's own errors differ by kind of damage
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        return None
    if not is_base:  # a fine-tune may lack the buffer (transformers 5 saves none)
        want.pop(BUFFER)
        got.pop(BUFFER, None)
    if set(got) != set(want):
        return None
    for k, v in got.items():
        if v.shape != want[k].shape or v.dtype != want[k].dtype:
            return None
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return None
    return _as_numpy(got)


@SETTINGS
@given(case=corruptions(), target=st.sampled_from(["ft1", "base"]))
def test_fuzz_corrupted_checkpoints(zoo: Zoo, case: tuple[str, Any], target: str) -> None:
    kind, rnd = case
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        damaged = work / "damaged"
        _corrupt(zoo.paths[target], damaged, kind, rnd)
        paths = {"base": zoo.paths["base"], "ft1": zoo.paths["ft1"], target: damaged}
        cfg = {
            "merge_method": "task_arithmetic",
            "base_model": str(paths["base"]),
            "models": [
                {"model": str(paths["ft1"]), "parameters": {"weight": 0.7}},
                {"model": str(zoo.paths["ft2"]), "parameters": {"weight": 0.4}},
            ],
        }
        res, out = _run_merge(cfg, work)
        clean = _loads_cleanly(damaged, zoo.paths[target], is_base=target == "base")
        info = run_cli("info", damaged)
        if info.exit_code != 0:
            one_error_line(info)
        if clean is None:
            _assert_error(res, out, f"{kind} damage to {target}")
            event(f"refused: {kind}")
            return
        event(f"merged despite: {kind}")
        base = clean if target == "base" else zoo.values("base")
        ft1 = clean if target == "ft1" else zoo.values("ft1")
        ft2 = zoo.values("ft2")
        want = {
            n: base[n]
            + 0.7 * (ft1[n].astype(np.float64) - base[n])
            + 0.4 * (ft2[n].astype(np.float64) - base[n])
            for n in NAMES
        }
        _assert_matches(res, out, want, None, base)
