"""Property tests (hypothesis) of merges and the algebra on small random checkpoints.

Which properties hold bitwise and which only within float32 rounding:

* λ = 0 gives the base, bitwise: ``θ0 + 0·Δ`` adds exact zeros (the inputs are finite).
* One model with weight 1 gives that model, bitwise: ``1·θ / 1`` is exact.
* ``a − a`` is exactly zero: ``x − x = 0`` for every finite float.
* 1 and 2 threads give byte-identical files: every tensor is computed by the same operations
  in the same order whichever worker runs it.
* Reordering the models changes only rounding, not bitwise equality: Σ wᵢθᵢ is accumulated in
  the order of the config and float addition is not associative, so permuted results agree
  within the float32 rounding bound of the sum (a few ulps of Σ|wᵢθᵢ|).
* dtype round trips are exact: float32 → bfloat16/float16 is one rounding, and a value
  already in the narrow dtype survives float32 and back unchanged.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from conftest import StateDict, assert_within, formula_bound, load_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import taskvec as tv

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass
class Models:
    """A base and fine-tunes, as state dicts and as folders holding one safetensors file."""

    dtype: torch.dtype
    base_sd: StateDict
    ft_sds: list[StateDict]
    base: Path
    fts: list[Path]


@st.composite
def model_specs(draw: st.DrawFn, n_min: int = 1, n_max: int = 3) -> dict[str, Any]:
    n_tensors = draw(st.integers(1, 4))
    shapes = [
        tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=2))) for _ in range(n_tensors)
    ]
    return {
        "shapes": shapes,
        "n": draw(st.integers(n_min, n_max)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@contextmanager
def materialize(spec: dict[str, Any]) -> Iterator[Models]:
    g = torch.Generator().manual_seed(spec["seed"])
    dtype = spec["dtype"]
    base_sd: StateDict = {
        f"layers.{i}.w": torch.randn(s, generator=g).to(dtype) for i, s in enumerate(spec["shapes"])
    }
    base_sd["ids"] = torch.arange(5)  # a non-float tensor rides along
    ft_sds = [
        {
            k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype)
            if v.is_floating_point()
            else v
            for k, v in base_sd.items()
        }
        for _ in range(spec["n"])
    ]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        paths = []
        for name, sd in [("base", base_sd), *[(f"ft{i}", s) for i, s in enumerate(ft_sds)]]:
            (root / name).mkdir()
            save_file(sd, str(root / name / "model.safetensors"))
            paths.append(root / name)
        yield Models(dtype, base_sd, ft_sds, paths[0], paths[1:])


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory()


def ta_config(
    m: Models, weights: list[float], lam: float, order: list[int] | None = None
) -> dict[str, Any]:
    order = order if order is not None else list(range(len(m.fts)))
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(m.base),
        "models": [{"model": str(m.fts[i]), "parameters": {"weight": weights[i]}} for i in order],
        "parameters": {"lambda": lam},
    }


def linear_config(
    m: Models, weights: list[float], order: list[int] | None = None
) -> dict[str, Any]:
    order = order if order is not None else list(range(len(m.fts)))
    return {
        "merge_method": "linear",
        "models": [{"model": str(m.fts[i]), "parameters": {"weight": weights[i]}} for i in order],
    }


def merged(cfg: dict[str, Any], out: Path, **kw: Any) -> StateDict:
    tv.merge(cfg, out, progress=False, **kw)
    return load_folder(out)


def same(a: StateDict, b: StateDict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


weights_st = st.lists(
    st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=3, max_size=3
)


# --------------------------------------------------------------------------------------------


@SETTINGS
@given(spec=model_specs(), weights=weights_st)
def test_lambda_zero_returns_the_base(spec: dict[str, Any], weights: list[float]) -> None:
    with materialize(spec) as m, scratch() as d:
        same(merged(ta_config(m, weights, 0.0), Path(d) / "cfg"), m.base_sd)
        base = tv.load(m.base)
        tau = sum(w * (tv.load(p) - base) for w, p in zip(weights, m.fts, strict=False))
        same((base + 0.0 * tau).state_dict(), m.base_sd)


@SETTINGS
@given(spec=model_specs(n_min=1, n_max=1), normalize=st.booleans())
def test_one_model_with_weight_one_returns_itself(spec: dict[str, Any], normalize: bool) -> None:
    with materialize(spec) as m, scratch() as d:
        cfg = linear_config(m, [1.0])
        cfg["parameters"] = {"normalize": normalize}
        same(merged(cfg, Path(d) / "out"), m.ft_sds[0])
        model = 1.0 * tv.load(m.fts[0])
        assert isinstance(model, tv.Model)
        same(model.state_dict(), m.ft_sds[0])


@SETTINGS
@given(spec=model_specs(n_min=2, n_max=3), weights=weights_st, data=st.data())
def test_model_order_does_not_matter(
    spec: dict[str, Any], weights: list[float], data: st.DataObject
) -> None:
    with materialize(spec) as m, scratch() as d:
        n = len(m.fts)
        order = data.draw(st.permutations(list(range(n))))
        w = [abs(x) for x in weights[:n]]  # positive weights: a well-defined average
        lam = 0.8
        for kind, cfg, permuted in [
            ("ta", ta_config(m, weights, lam), ta_config(m, weights, lam, order)),
            ("li", linear_config(m, w), linear_config(m, w, order)),
        ]:
            cfg["dtype"] = permuted["dtype"] = "float32"  # compare before any narrow rounding
            a = merged(cfg, Path(d) / f"{kind}-a")
            b = merged(permuted, Path(d) / f"{kind}-b")
            for k, v in a.items():
                if not v.is_floating_point():
                    assert torch.equal(v, b[k]), k
                    continue
                b0 = m.base_sd[k].float()
                if kind == "ta":
                    terms = [b0] + [
                        abs(lam * wi) * (sd[k].float().abs() + b0.abs())
                        for wi, sd in zip(weights, m.ft_sds, strict=False)
                    ]
                else:
                    terms = [
                        wi / sum(w) * sd[k].float() for wi, sd in zip(w, m.ft_sds, strict=True)
                    ]
                # each result is within the bound of the exact value, so within twice of each other
                assert_within(v, b[k], 2 * formula_bound(*terms))


@SETTINGS
@given(spec=model_specs(n_min=1, n_max=2))
def test_a_minus_a_is_zero(spec: dict[str, Any]) -> None:
    with materialize(spec) as m:
        a = tv.load(m.fts[0])
        tau = tv.load(m.fts[0]) - tv.load(m.base)
        for zero in (a - a, a - tv.load(m.fts[0]), tau - tau, tau + (-tau)):
            for k in zero.names:
                t = zero.tensor(k)
                assert torch.equal(t, torch.zeros_like(t)), k
            assert zero.norm() == 0.0
        same((a + (tau - tau)).state_dict(), m.ft_sds[0])


@SETTINGS
@given(spec=model_specs(n_min=2, n_max=3), weights=weights_st, chunk=st.sampled_from([4, 1 << 24]))
def test_one_and_two_threads_write_identical_files(
    spec: dict[str, Any], weights: list[float], chunk: int
) -> None:
    with materialize(spec) as m, scratch() as d, mock.patch("taskvec.engine.CHUNK_ELEMENTS", chunk):
        root = Path(d)
        for threads in (1, 2):
            tv.merge(
                ta_config(m, weights, 0.7), root / f"ta{threads}", threads=threads, progress=False
            )
            tv.merge(
                linear_config(m, [abs(w) for w in weights]),
                root / f"li{threads}",
                threads=threads,
                progress=False,
            )
            base = tv.load(m.base)
            expr = base + 0.7 * sum(
                w * (tv.load(p) - base) for w, p in zip(weights, m.fts, strict=False)
            )
            expr.save(root / f"api{threads}", threads=threads, dtype="bfloat16", progress=False)
        for kind in ("ta", "li", "api"):
            one = (root / f"{kind}1" / "model.safetensors").read_bytes()
            two = (root / f"{kind}2" / "model.safetensors").read_bytes()
            assert one == two, kind


@SETTINGS
@given(spec=model_specs(n_min=1, n_max=1), narrow=st.sampled_from(["bfloat16", "float16"]))
def test_dtype_round_trips(spec: dict[str, Any], narrow: str) -> None:
    want = getattr(torch, narrow)
    with materialize(spec) as m, scratch() as d:
        root = Path(d)
        model = tv.load(m.base)
        # no dtype: every tensor keeps its own, bit for bit
        same(load_folder(model.save(root / "native", progress=False)), m.base_sd)
        # to the narrow dtype: one rounding of each value
        first = model.save(root / "narrow", dtype=narrow, progress=False)
        got = load_folder(first)
        for k, v in m.base_sd.items():
            assert torch.equal(got[k], v.to(want) if v.is_floating_point() else v), k
        # narrow -> float32 -> narrow is lossless, down to the file bytes
        wide = tv.load(first).save(root / "wide", dtype="float32", progress=False)
        for k, v in load_folder(wide).items():
            assert v.dtype == (torch.float32 if got[k].is_floating_point() else got[k].dtype)
            assert torch.equal(v, got[k].to(v.dtype)), k
        again = tv.load(wide).save(root / "again", dtype=narrow, progress=False)
        assert (again / "model.safetensors").read_bytes() == (
            first / "model.safetensors"
        ).read_bytes()
