"""Property tests of the merge methods (hypothesis) and of seeded randomness through merges.

Properties: density 1 means no pruning; λ = 0 gives the base; one model (or identical models)
gives that model where the method says so; the order of the models does not matter for the
symmetric methods; DARE/DELLA draws depend only on (random_seed, tensor name), so the same seed
gives byte-identical output whatever the thread count, and different seeds differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from taskvec.merge import merge as tv_merge
from taskvec.methods import all_methods, get_method
from taskvec.methods.registry import REQUIRED

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

SHAPES = [(7,), (4, 5), (6, 3), (2, 3, 4)]


def call(name: str, xs: np.ndarray, base: np.ndarray | None, seed: int = 0, **params: Any):
    """Call a registered method as the engine does (per-model parameters as float64 (N,))."""
    m = get_method(name)
    tensors = torch.tensor(xs, dtype=torch.float32)
    b = None if base is None or m.base == "unused" else torch.tensor(base, dtype=torch.float32)
    n = tensors.shape[0]
    per_model = {}
    for key, default in m.per_model.items():
        v = params.pop(key, default)
        assert v is not REQUIRED, (name, key)
        vals = list(v) if isinstance(v, list | tuple) else [v] * n
        per_model[key] = torch.tensor([float(x) for x in vals], dtype=torch.float64)
    global_ = {}
    for key, default in m.globals.items():
        v = params.pop(key, default)
        assert v is not REQUIRED, (name, key)
        global_[key] = v
    assert not params, (name, params)
    extra = {"generator": torch.Generator().manual_seed(seed)} if m.random else {}
    if m.whole_model is not None and m.whole_model.wanted(**global_):
        total = m.whole_model.collect(tensors.clone(), b, **per_model, **global_)
        global_.update(m.whole_model.finalize(total, **per_model, **global_))
    out = m.fn(tensors.clone(), None if b is None else b.clone(), **per_model, **global_, **extra)
    return out.double().numpy()


@st.composite
def merge_inputs(draw, n_min: int = 1, n_max: int = 3):
    """(base, xs (N, ...), weights) as float32-exact float64 arrays."""
    n = draw(st.integers(n_min, n_max))
    shape = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32).astype(np.float64)
    xs = (base + scale * rng.normal(size=(n, *shape))).astype(np.float32).astype(np.float64)
    weights = draw(st.lists(st.floats(0.125, 2.0, width=32), min_size=n, max_size=n))
    return base, xs, weights


def close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale)


# --------------------------------------------------------------------------------------------
# density 1 = no pruning
# --------------------------------------------------------------------------------------------

LINEAR_SPARSE = ["dare_linear", "della_linear", "breadcrumbs"]
CONSENSUS_SPARSE = ["ties", "dare_ties", "della", "breadcrumbs_ties"]


@SETTINGS
@given(data=merge_inputs(), normalize=st.booleans(), lam=st.sampled_from([1.0, 0.5, 1.7]))
@pytest.mark.parametrize("name", LINEAR_SPARSE)
def test_density_one_without_consensus_is_task_arithmetic(name, data, normalize, lam) -> None:
    base, xs, w = data
    kw = {"lambda": lam}
    want = call("task_arithmetic", xs, base, weight=w, normalize=normalize, **kw)
    got = call(name, xs, base, weight=w, density=1.0, normalize=normalize, **kw)
    close(got, want)


@SETTINGS
@given(data=merge_inputs(), normalize=st.booleans())
@pytest.mark.parametrize("name", CONSENSUS_SPARSE)
def test_density_one_with_consensus_is_unpruned_ties(name, data, normalize) -> None:
    base, xs, w = data
    want = call("ties", xs, base, weight=w, density=1.0, normalize=normalize)
    got = call(name, xs, base, weight=w, density=1.0, normalize=normalize)
    close(got, want)
    if xs.shape[0] == 1:  # nothing to elect against: plain task arithmetic
        close(got, call("task_arithmetic", xs, base, weight=w, normalize=normalize))


@SETTINGS
@given(data=merge_inputs(n_min=2))
def test_density_one_consensus_agrees_with_task_arithmetic_when_signs_agree(data) -> None:
    base, xs, w = data
    # all task vectors point the same way entry by entry: the election removes nothing
    tau = np.abs(xs - base) * np.sign(xs[0] - base)
    xs = (base + tau).astype(np.float32).astype(np.float64)
    for name in CONSENSUS_SPARSE:
        got = call(name, xs, base, weight=w, density=1.0, normalize=False)
        close(got, call("task_arithmetic", xs, base, weight=w), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# λ = 0 gives the base
# --------------------------------------------------------------------------------------------

WITH_LAMBDA = sorted(n for n, m in all_methods().items() if "lambda" in m.globals)


def _defaults_for(name: str, n: int) -> dict[str, Any]:
    m = get_method(name)
    out: dict[str, Any] = {}
    for key, default in m.per_model.items():
        if default is REQUIRED:
            out[key] = [1.0] * n
    if "density" in m.per_model:
        out["density"] = [0.5] * n
    return out


def test_lambda_methods_are_the_expected_ones() -> None:
    assert {"task_arithmetic", "ties", "dare_linear", "dare_ties", "della"} <= set(WITH_LAMBDA)


@SETTINGS
@given(data=merge_inputs())
@pytest.mark.parametrize("name", WITH_LAMBDA)
def test_lambda_zero_gives_base(name, data) -> None:
    base, xs, _ = data
    got = call(name, xs, base, **_defaults_for(name, xs.shape[0]), **{"lambda": 0.0})
    np.testing.assert_array_equal(got, base)


# --------------------------------------------------------------------------------------------
# one model (or identical models) = itself
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(data=merge_inputs(n_min=1, n_max=1), with_base=st.booleans())
def test_single_model_is_itself(data, with_base) -> None:
    base, xs, w = data
    x = xs[0]
    close(call("linear", xs, None, weight=w), x)
    close(call("linear", xs, None, weight=[1.0], normalize=False), x)
    close(call("task_arithmetic", xs, base, weight=[1.0]), x)
    close(call("ties", xs, base, weight=w, density=1.0), x)
    close(call("slerp", xs, base, t=1.0), x)
    close(call("multislerp", xs, base if with_base else None, weight=w), x)
    close(call("karcher", xs, None), x)
    close(call("passthrough", xs, None), x)
    close(call("sce", xs, base), x)
    for name in ("dare_linear", "della_linear", "breadcrumbs"):
        close(call(name, xs, base, weight=[1.0], density=1.0), x)


@SETTINGS
@given(data=merge_inputs(n_min=1, n_max=1), n=st.integers(2, 3), with_base=st.booleans())
def test_identical_models_give_that_model(data, n, with_base) -> None:
    base, xs, _ = data
    same = np.repeat(xs, n, axis=0)
    x = xs[0]
    w = [1.0] * n
    close(call("linear", same, None, weight=w), x)
    close(call("task_arithmetic", same, base, weight=w, normalize=True), x)
    close(call("ties", same, base, weight=w, density=1.0), x)
    if float(np.sum((x - base) ** 2)) >= 1e-6:  # cosines divide by max(‖τᵢ‖‖τⱼ‖, 1e-6)
        close(call("model_stock", same, base), x)
    close(call("karcher", same, None), x)
    close(call("multislerp", same, base if with_base else None, weight=w), x)
    close(call("sce", same, base), x)
    if n == 2:
        close(call("nuslerp", same, base if with_base else None, weight=w), x)


# --------------------------------------------------------------------------------------------
# permutation invariance
# --------------------------------------------------------------------------------------------

SYMMETRIC: dict[str, dict[str, Any]] = {
    "linear": {"weight": None},
    "task_arithmetic": {"weight": None},
    "ties": {"weight": None, "density": 0.5},
    "breadcrumbs_ties": {"weight": None, "density": 0.6, "gamma": 0.1},
    "model_stock": {},
    "ram": {},
    "ramplus_tl": {},
    "sce": {},
    # an iterative mean is order-free once converged (the default 10 steps may stop short)
    "karcher": {"max_iter": 1000, "tol": 1e-6},
    "multislerp": {"weight": None},
    "magmax": {},
    "consensus": {"weight": None},
}


@SETTINGS
@given(data=merge_inputs(n_min=2), perm_seed=st.integers(0, 1000))
@pytest.mark.parametrize("name", sorted(SYMMETRIC))
def test_permutation_invariance(name, data, perm_seed) -> None:
    base, xs, w = data
    n = xs.shape[0]
    perm = np.random.default_rng(perm_seed).permutation(n)
    if n == 2 or (perm == np.arange(n)).all():
        perm = np.roll(np.arange(n), 1)
    params = {k: (w if v is None else v) for k, v in SYMMETRIC[name].items()}
    permuted = {k: ([v[i] for i in perm] if isinstance(v, list) else v) for k, v in params.items()}
    a = call(name, xs, base, **params)
    b = call(name, xs[perm], base, **permuted)
    rtol, atol = (1e-4, 1e-5) if name == "karcher" else (1e-5, 1e-6)
    close(b, a, rtol=rtol, atol=atol)


@SETTINGS
@given(data=merge_inputs(n_min=2, n_max=2), with_base=st.booleans())
def test_nuslerp_swapping_models_and_weights(data, with_base) -> None:
    base, xs, w = data
    b = base if with_base else None
    close(call("nuslerp", xs[::-1].copy(), b, weight=w[::-1]), call("nuslerp", xs, b, weight=w))


@SETTINGS
@given(data=merge_inputs(n_min=1, n_max=1), t=st.floats(0.0, 1.0))
def test_slerp_reversal(data, t) -> None:
    """SLERP(θ₀, θ₁; t) = SLERP(θ₁, θ₀; 1 − t)."""
    base, xs, _ = data
    a = call("slerp", xs, base, t=t)
    b = call("slerp", base[None], xs[0], t=1.0 - t)
    close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# seeded randomness through merge.merge
# --------------------------------------------------------------------------------------------

RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]
TENSORS = {
    "model.embed_tokens.weight": (8, 32),
    "model.layers.0.mlp.up_proj.weight": (16, 32),
    "model.layers.1.mlp.up_proj.weight": (16, 32),
    "model.layers.0.input_layernorm.weight": (32,),
    "model.layers.1.input_layernorm.weight": (32,),
    "model.norm.weight": (32,),
}


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def random_models(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("seeded")
    g = torch.Generator().manual_seed(42)
    base = {k: torch.randn(s, generator=g) for k, s in TENSORS.items()}
    fts = []
    for _ in range(2):
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        # layers 0 and 1 hold identical data: only the tensor name tells their draws apart
        sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].clone()
        fts.append(sd)
    base["model.layers.1.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"].clone()
    paths = {"base": _save(root / "base", base)}
    for i, sd in enumerate(fts):
        paths[f"ft{i}"] = _save(root / f"ft{i}", sd)
    # a model holding only one of the tensors, to check draws do not depend on the others
    only = "model.layers.1.mlp.up_proj.weight"
    paths["base_only"] = _save(root / "base_only", {only: base[only]})
    for i, sd in enumerate(fts):
        paths[f"ft{i}_only"] = _save(root / f"ft{i}_only", {only: sd[only]})
    return {"root": root, "paths": paths, "only": only}


def _config(paths: dict[str, Path], method: str, suffix: str = "") -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(paths["base" + suffix]),
        "models": [
            {"model": str(paths[f"ft{i}{suffix}"]), "parameters": {"weight": w, "density": 0.5}}
            for i, w in enumerate([1.0, 0.6])
        ],
    }


def _run(models, method: str, out: str, seed: int | None, threads: int, suffix: str = "") -> Path:
    dest = models["root"] / out
    tv_merge(
        _config(models["paths"], method, suffix),
        dest,
        random_seed=seed,
        threads=threads,
        progress=False,
    )
    return dest


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("method", RANDOM)
def test_same_seed_is_byte_identical_across_thread_counts(random_models, method) -> None:
    a = _run(random_models, method, f"{method}-s7-t1", 7, threads=1)
    b = _run(random_models, method, f"{method}-s7-t2", 7, threads=2)
    c = _run(random_models, method, f"{method}-s7-t2-again", 7, threads=2)
    assert _shard_bytes(a) and _shard_bytes(a) == _shard_bytes(b) == _shard_bytes(c)


@pytest.mark.parametrize("method", RANDOM)
def test_different_seeds_differ(random_models, method) -> None:
    a = load_file(str(_run(random_models, method, f"{method}-d1", 1, 2) / "model.safetensors"))
    b = load_file(str(_run(random_models, method, f"{method}-d2", 2, 2) / "model.safetensors"))
    for name in TENSORS:
        assert not torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", RANDOM)
def test_draws_depend_on_seed_and_tensor_name_only(random_models, method) -> None:
    full = load_file(str(_run(random_models, method, f"{method}-n", 3, 2) / "model.safetensors"))
    # identical inputs under two names get different masks
    a, b = full["model.layers.0.mlp.up_proj.weight"], full["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(a, b)
    # the same tensor merged alone (no other tensors in the model) gets the same draw
    alone = _run(random_models, method, f"{method}-alone", 3, 1, suffix="_only")
    only = random_models["only"]
    assert torch.equal(load_file(str(alone / "model.safetensors"))[only], full[only])


@pytest.mark.parametrize("method", RANDOM)
def test_seeded_merge_is_a_valid_sparsification(random_models, method) -> None:
    """Sanity: with one seed, about half of each delta survives (density 0.5)."""
    out = load_file(str(_run(random_models, method, f"{method}-v", 5, 2) / "model.safetensors"))
    base = load_file(str(random_models["paths"]["base"] / "model.safetensors"))
    changed = sum(int((out[k] != base[k]).sum()) for k in TENSORS)
    total = sum(base[k].numel() for k in TENSORS)
    # each entry is unchanged only if every model's entry was dropped (or cancelled by TIES)
    assert 0.5 < changed / total < 0.95
