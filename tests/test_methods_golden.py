"""Golden tests of every registered merge method against independent numpy re-derivations.

Every expected value here is computed by a float64 numpy transcription of the documented
formula (mergekit 0.1.5 semantics, shared/notes/mergekit.md §1a, methods.md §2), written
separately from taskvec's code, or by hand. The methods are called exactly as the engine calls
them: ``fn(tensors[N, ...], base, **per_model (float64 tensors of shape (N,)), **globals,
generator=...)``, with the whole-model pass (if any) run first on the same tensor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from taskvec.merge import merge as tv_merge
from taskvec.methods import all_methods, get_method
from taskvec.methods.registry import REQUIRED
from taskvec.methods.sparsify import row_rank_fraction, topk_mask

RTOL = 1e-5
ATOL = 1e-6

# --------------------------------------------------------------------------------------------
# Calling convention helpers (mirror the engine; no taskvec math is used for expectations)
# --------------------------------------------------------------------------------------------


def call(
    name: str,
    xs: np.ndarray,
    base: np.ndarray | None = None,
    *,
    seed: int | None = None,
    **params: Any,
) -> np.ndarray:
    """Run registered method ``name`` on float32 copies of ``xs`` (N, ...) and ``base``."""
    m = get_method(name)
    tensors = torch.tensor(np.asarray(xs), dtype=torch.float32)
    b = None if base is None else torch.tensor(np.asarray(base), dtype=torch.float32)
    if m.base == "unused":
        b = None
    n = tensors.shape[0]
    per_model: dict[str, torch.Tensor] = {}
    for key, default in m.per_model.items():
        v = params.pop(key, default)
        assert v is not REQUIRED, f"{name}: test must give {key}"
        vals = list(v) if isinstance(v, list | tuple | np.ndarray) else [v] * n
        per_model[key] = torch.tensor([float(x) for x in vals], dtype=torch.float64)
    global_: dict[str, Any] = {}
    for key, default in m.globals.items():
        v = params.pop(key, default)
        assert v is not REQUIRED, f"{name}: test must give {key}"
        global_[key] = v
    assert not params, f"unknown parameters for {name}: {sorted(params)}"
    extra: dict[str, Any] = {}
    if m.random:
        extra["generator"] = torch.Generator().manual_seed(0 if seed is None else seed)
    if m.whole_model is not None and m.whole_model.wanted(**global_):
        total = m.whole_model.collect(tensors.clone(), b, **per_model, **global_)
        global_.update(m.whole_model.finalize(total, **per_model, **global_))
    out = m.fn(tensors.clone(), None if b is None else b.clone(), **per_model, **global_, **extra)
    assert tuple(out.shape) == tuple(tensors.shape[1:])
    return out.double().numpy()


def close(got: np.ndarray, want: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> None:
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def problem(
    n: int = 3, shape: tuple[int, ...] = (6, 5), seed: int = 0, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """float32-representable (base, xs) with continuous (tie-free) task vectors."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32).astype(np.float64)
    xs = (base + scale * rng.normal(size=(n, *shape))).astype(np.float32).astype(np.float64)
    return base, xs


# --------------------------------------------------------------------------------------------
# Independent numpy re-derivations
# --------------------------------------------------------------------------------------------


def np_trim(d: np.ndarray, density: float, rescale: str | None = None) -> np.ndarray:
    """TIES trim: keep the max(1, ⌊density·n⌋) largest |d|."""
    if density >= 1:
        return d.copy()
    flat = d.reshape(-1)
    k = max(1, int(density * flat.size)) if density > 0 else 0
    order = np.argsort(-np.abs(flat), kind="stable")
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return np_rescale(d, out.reshape(d.shape), density, rescale)


def np_rescale(d: np.ndarray, kept: np.ndarray, p: Any, mode: str | None) -> np.ndarray:
    if mode is None:
        return kept
    if mode == "l1":
        before, after = np.abs(d).sum(), np.abs(kept).sum()
        return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)
    return kept / p


def np_crumbs(d: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs: sort |d| ascending, keep positions [n_bot, n_bot + ⌊dn⌋)."""
    if density >= 1:
        return d.copy()
    flat = d.reshape(-1)
    n = flat.size
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = np.argsort(np.abs(flat), kind="stable")
    out = np.zeros_like(flat)
    keep = order[n_bot : n_bot + target]
    out[keep] = flat[keep]
    return out.reshape(d.shape)


def np_combine(
    base: np.ndarray,
    deltas: np.ndarray,
    w: np.ndarray,
    *,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
    votes: np.ndarray | None = None,
) -> np.ndarray:
    """mergekit's generalized task arithmetic: weights first, then sign election (0 → +)."""
    wb = np.asarray(w, dtype=np.float64).reshape(-1, *([1] * base.ndim))
    wd = deltas * wb
    if consensus:
        v = wd if votes is None else votes
        elected = np.where(v.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(wd) == elected
        mixed = (wd * mask).sum(0)
        div = (wb * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        total = float(np.sum(w))
        div = 1.0 if abs(total) < 1e-8 else total
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def np_slerp(t: float, a: np.ndarray, b: np.ndarray, thr: float = 0.9995) -> np.ndarray:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    c = float(np.clip((a * b).sum() / (na * nb), -1, 1))
    if abs(c) > thr:
        return (1 - t) * a + t * b
    om = math.acos(c)
    return math.sin((1 - t) * om) / math.sin(om) * a + math.sin(t * om) / math.sin(om) * b


def np_slerp_rows(t: float, a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """SLERP of each vector along the last axis (nuslerp's kernel)."""
    ua = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-7)
    ub = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-7)
    c = np.clip((ua * ub).sum(-1, keepdims=True), -1, 1)
    colinear = (1 - c**2) <= eps**2
    om = np.arccos(np.where(colinear, 0.0, c))
    s = np.where(colinear, 1.0, np.sin(om))
    curved = (np.sin((1 - t) * om) * a + np.sin(t * om) * b) / s
    return np.where(colinear, (1 - t) * a + t * b, curved)


def np_multislerp(
    xs: np.ndarray, w: np.ndarray, base: np.ndarray | None, normalize: bool = True, eps=1e-8
) -> np.ndarray:
    if xs.shape[0] == 1:
        return xs[0]
    x = xs - base if base is not None else xs
    flat = x.reshape(x.shape[0], -1)
    w = np.asarray(w, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(flat, axis=1)
    u = flat / (norms[:, None] + eps)
    m = (w[:, None] * u).sum(0)
    m = m / np.linalg.norm(m)
    tangent = (w[:, None] * (u - (u @ m)[:, None] * m)).sum(0)
    tn = np.linalg.norm(tangent)
    res = m * math.cos(tn) + tangent * (math.sin(tn) / tn) if tn > 0 else m
    res = (res * (w * norms).sum()).reshape(xs.shape[1:])
    return res if base is None else res + base


def np_karcher(xs: np.ndarray, iters: int = 500) -> np.ndarray:
    """Karcher mean of the unit directions by Riemannian gradient steps, × mean norm."""
    flat = xs.reshape(xs.shape[0], -1)
    norms = np.linalg.norm(flat, axis=1)
    u = flat / norms[:, None]
    m = u.mean(0)
    m /= np.linalg.norm(m)
    for _ in range(iters):
        dots = np.clip(u @ m, -1, 1)
        th = np.arccos(dots)
        coef = np.where(th > 1e-12, th / np.sin(np.maximum(th, 1e-12)), 1.0)
        g = (coef[:, None] * (u - dots[:, None] * m)).mean(0)
        gn = np.linalg.norm(g)
        if gn < 1e-14:
            break
        m = math.cos(gn) * m + math.sin(gn) * g / gn
        m /= np.linalg.norm(m)
    return (m * norms.mean()).reshape(xs.shape[1:])


def karcher_gradient(xs: np.ndarray, result: np.ndarray) -> float:
    """‖Σ logₘ(uᵢ)‖/N at the direction of ``result`` (0 at the Karcher mean)."""
    flat = xs.reshape(xs.shape[0], -1)
    u = flat / np.linalg.norm(flat, axis=1)[:, None]
    m = result.reshape(-1) / np.linalg.norm(result)
    dots = np.clip(u @ m, -1, 1)
    th = np.arccos(dots)
    g = ((th / np.sin(th))[:, None] * (u - dots[:, None] * m)).mean(0)
    return float(np.linalg.norm(g))


def np_model_stock(xs: np.ndarray, base: np.ndarray, filter_wise: bool = False) -> np.ndarray:
    n = xs.shape[0]
    rows = base.reshape(base.shape[0], -1) if filter_wise and base.ndim >= 2 else None
    if rows is None:
        rows = base.reshape(1, -1)
    th = xs.reshape(n, *rows.shape)
    d = th - rows
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                a, b = d[i, r], d[j, r]
                cos.append(np.clip(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6), -1, 1))
        c = float(np.mean(cos))
        t = n * c / (1 + (n - 1) * c)
        out[r] = t * th[:, r].mean(0) + (1 - t) * rows[r]
    return out.reshape(base.shape)


def np_ram(xs: np.ndarray, base: np.ndarray, eps: float = 1e-5, plus=None) -> np.ndarray:
    tv = (xs - base).reshape(xs.shape[0], -1)
    active = np.abs(tv) > eps
    count = active.sum(0)
    merged = np.zeros(tv.shape[1])
    for i in range(tv.shape[0]):
        uniq = active[i] & (count == 1)
        shared = active[i] & (count > 1)
        boost = 1.0
        if plus is not None:
            r, alpha = plus
            rho = shared.sum() / max(uniq.sum(), eps)
            boost = 1 + r * min(max(rho, 0.0), alpha)
        merged += np.where(uniq, tv[i] * boost, 0.0)
        merged += np.where(shared, tv[i] / np.maximum(count, 1), 0.0)
    return base + merged.reshape(base.shape)


def np_sce(xs: np.ndarray, base: np.ndarray, select_topk: float = 1.0) -> np.ndarray:
    tv = xs - base
    n = tv.shape[0]
    if select_topk < 1:
        var = tv.reshape(n, -1).var(0)
        k = int(np.count_nonzero(var) * select_topk)
        order = np.argsort(-var, kind="stable")
        keep = np.zeros(var.size, dtype=bool)
        keep[order[:k]] = True
        tv = tv * keep.reshape(base.shape)
    energy = (tv.reshape(n, -1) ** 2).mean(1)
    omega = energy / energy.sum() if abs(energy.sum()) >= 1e-6 else np.full(n, 1.0 / n)
    elected = np.where(tv.sum(0) >= 0, 1.0, -1.0)
    m = np.sign(tv) == elected
    ow = omega.reshape(-1, *([1] * base.ndim)) * m
    return base + (tv * ow).sum(0) / np.maximum(ow.sum(0), 1e-6)


def np_gram_schmidt(xs, base, w, lam=1.0) -> np.ndarray:
    tau = (xs - base).reshape(xs.shape[0], -1)
    ortho: list[np.ndarray] = []
    for k in range(tau.shape[0]):
        v = tau[k].copy()
        for u in ortho:
            nn = u @ u
            if nn > 1e-12 * max((tau * tau).sum(1).max(), 1e-300):
                v = v - (tau[k] @ u) / nn * u
        ortho.append(v)
    mixed = sum(wk * o for wk, o in zip(w, ortho, strict=True))
    return base + lam * mixed.reshape(base.shape)


def np_minmax_rows(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def np_pcb(xs, base, ratio=0.1, lam=1.0) -> np.ndarray:
    n = xs.shape[0]
    tau = (xs - base).reshape(n, -1)
    intra = np.exp(n * np_minmax_rows(np.abs(tau)) ** 2)
    inter = np.tanh(tau * tau.sum(0, keepdims=True))
    beta = intra * inter
    k = max(1, int(ratio * beta.shape[1]))
    kept = np.zeros_like(beta, dtype=bool)
    for i in range(n):
        kept[i, np.argsort(-beta[i], kind="stable")[:k]] = True
    floor = np.where(kept, beta, np.inf).min(1, keepdims=True)
    bh = np_minmax_rows(np.where(kept, beta, floor))
    merged = (bh * tau).sum(0) / np.maximum(bh.sum(0), 1e-12)
    return base + lam * merged.reshape(base.shape)


# --------------------------------------------------------------------------------------------
# Coverage: every registered method has golden tests here
# --------------------------------------------------------------------------------------------

COVERED = {
    "linear",
    "task_arithmetic",
    "ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "nearswap",
    "model_stock",
    "ram",
    "ramplus_tl",
    "sce",
    "passthrough",
    "consensus",
    "gram_schmidt",
    "magmax",
    "pcb",
    "arcee_fusion",
    # golden tests in test_methods_spectral.py and test_methods_wudi.py
    "tsv",
    "iso_c",
    "iso_cts",
    "wudi",
    # golden tests in test_methods_statistics.py
    "regmean",
    "regmean_plusplus",  # tests/test_regmean_plusplus.py
    "adamerging",  # tests/test_adamerging.py
    "fisher",
    # whole-model pipeline methods: golden tests in test_fda.py and test_pipeline_methods.py
    "fda",
    "emr",
    "pleas",  # tests/test_pleas.py and test_pleas_pipeline.py
    "permute",
}


def test_every_registered_method_has_golden_tests() -> None:
    missing = sorted(set(all_methods()) - COVERED)
    assert not missing, f"registered methods without golden tests: {missing}"


# --------------------------------------------------------------------------------------------
# linear / task_arithmetic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_random(normalize: bool) -> None:
    _, xs = problem(3)
    w = [0.5, 1.5, -0.25]
    want = np.tensordot(np.array([v for v in w]), xs, 1)
    if normalize:
        want = want / sum(v for v in w)
    close(call("linear", xs, weight=w, normalize=normalize), want)


def test_linear_by_hand() -> None:
    xs = np.array([[1.0, 2.0, 3.0], [3.0, 6.0, -1.0]])
    close(call("linear", xs, weight=[1.0, 3.0]), [2.5, 5.0, 0.0])
    close(call("linear", xs, weight=[1.0, 3.0], normalize=False), [10.0, 20.0, 0.0])


def test_linear_ignores_base() -> None:
    base, xs = problem(2)
    got = call("linear", xs, base, weight=[1.0, 1.0])
    close(got, xs.mean(0))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.5, 2.0])
def test_task_arithmetic_random(normalize: bool, lam: float) -> None:
    base, xs = problem(3)
    w = [0.7, -0.3, 1.2]  # a negative weight subtracts a task vector
    wf = np.array([v for v in w])
    want_delta = np.tensordot(wf, xs - base, 1)
    if normalize:
        want_delta = want_delta / wf.sum()
    want = base + lam * want_delta
    got = call("task_arithmetic", xs, base, weight=w, normalize=normalize, **{"lambda": lam})
    close(got, want)


def test_task_arithmetic_negation_by_hand() -> None:
    base = np.array([1.0, 1.0, 1.0])
    xs = np.array([[2.0, 0.0, 1.5]])
    got = call("task_arithmetic", xs, base, weight=[-1.0])
    close(got, [0.0, 2.0, 0.5])


# --------------------------------------------------------------------------------------------
# TIES
# --------------------------------------------------------------------------------------------

T1 = np.array([3.0, -1.0, 0.5, -4.0, 2.0])
T2 = np.array([-2.0, 2.5, -0.1, 1.0, 1.5])
T3 = np.array([1.0, -3.0, 0.2, 5.0, -0.5])


def test_ties_by_hand_length5() -> None:
    """density 0.6 of 5 → keep 3 per vector:
    trimmed τ1 = [3, 0, 0, -4, 2], τ2 = [-2, 2.5, 0, 0, 1.5], τ3 = [1, -3, 0, 5, 0];
    sums [2, -0.5, 0, 1, 3.5] → signs [+, -, + (0 counts as +), +, +];
    disjoint means: [(3+1)/2, -3, 0, 5, (2+1.5)/2]."""
    base = np.zeros(5)
    got = call("ties", np.stack([T1, T2, T3]), base, weight=[1, 1, 1], density=0.6)
    close(got, [2.0, -3.0, 0.0, 5.0, 1.75])
    # normalize false: disjoint sums
    got = call("ties", np.stack([T1, T2, T3]), base, weight=[1, 1, 1], density=0.6, normalize=False)
    close(got, [4.0, -3.0, 0.0, 5.0, 3.5])


def test_ties_by_hand_base_and_lambda() -> None:
    base = np.array([10.0, -10.0, 0.0, 1.0, 2.0])
    xs = base + np.stack([T1, T2, T3])
    got = call("ties", xs, base, weight=[1, 1, 1], density=0.6, **{"lambda": 0.5})
    close(got, base + 0.5 * np.array([2.0, -3.0, 0.0, 5.0, 1.75]))


def test_ties_zero_sum_elects_plus() -> None:
    base = np.zeros(2)
    xs = np.array([[1.0, -2.0], [-1.0, 2.0]])
    close(call("ties", xs, base, weight=[1, 1]), [1.0, 2.0])


def test_ties_weights_applied_before_election() -> None:
    """w = (4, 1), τ = (1, -3): weighted sum 4 − 3 > 0 elects +, so the result is 4·1/4 = 1;
    the paper's unweighted election (1 − 3 < 0) keeps τ₂ = −3 instead."""
    base = np.zeros(1)
    xs = np.array([[1.0], [-3.0]])
    close(call("ties", xs, base, weight=[4.0, 1.0]), [1.0])
    close(call("ties", xs, base, weight=[4.0, 1.0], elect="unweighted"), [-3.0])


@pytest.mark.parametrize("density", [0.2, 0.5, 0.6, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_random(density: float, normalize: bool) -> None:
    base, xs = problem(3)
    w = [1.0, 0.5, 0.8]
    deltas = np.stack([np_trim(x - base, density) for x in xs])
    want = np_combine(base, deltas, w, consensus=True, normalize=normalize, lam=0.9)
    got = call("ties", xs, base, weight=w, density=density, normalize=normalize, **{"lambda": 0.9})
    close(got, want)


def test_ties_per_model_density_and_l1_rescale() -> None:
    base, xs = problem(2, shape=(8, 4), seed=3)
    dens = [0.25, 0.75]
    deltas = np.stack([np_trim(x - base, d, "l1") for x, d in zip(xs, dens, strict=True)])
    want = np_combine(base, deltas, [1.0, 1.0], consensus=True, normalize=True)
    got = call("ties", xs, base, weight=[1.0, 1.0], density=dens, rescale=True)
    close(got, want)


def test_ties_unweighted_election_random() -> None:
    base, xs = problem(3, seed=5)
    w = [2.0, 0.3, 1.0]
    deltas = np.stack([np_trim(x - base, 0.5) for x in xs])
    want = np_combine(base, deltas, w, consensus=True, normalize=True, votes=deltas)
    close(call("ties", xs, base, weight=w, density=0.5, elect="unweighted"), want)


def _write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    save_file(
        {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()},
        str(path / "model.safetensors"),
    )
    return path


def test_ties_trim_scope_model(tmp_path: Path) -> None:
    """trim_scope: model keeps each τᵢ's top-density magnitudes over the whole model.
    Magnitudes are distinct multiples of 1/64 up to 4 (exact in bfloat16), so the streamed
    histogram threshold is exact."""
    rng = np.random.default_rng(11)
    names = {"a.weight": (4, 5), "b.weight": (3, 5)}
    total = sum(int(np.prod(s)) for s in names.values())
    base = {k: rng.normal(size=s).astype(np.float32) * 0 for k, s in names.items()}
    models = []
    for _ in range(2):
        mags = rng.permutation(np.arange(1, total + 1)) / 64.0
        signs = rng.choice([-1.0, 1.0], size=total)
        flat = mags * signs
        sd, off = {}, 0
        for k, s in names.items():
            size = int(np.prod(s))
            sd[k] = flat[off : off + size].reshape(s)
            off += size
        models.append(sd)
    b = _write(tmp_path / "base", base)
    ps = [_write(tmp_path / f"m{i}", sd) for i, sd in enumerate(models)]
    cfg = {
        "merge_method": "ties",
        "base_model": str(b),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.25}} for p in ps],
        "parameters": {"trim_scope": "model"},
    }
    tv_merge(cfg, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    k = int(0.25 * total)
    trimmed = []
    for sd in models:
        flat = np.concatenate([sd[n].reshape(-1) for n in names])
        thr = np.sort(np.abs(flat))[-k]
        trimmed.append({n: np.where(np.abs(sd[n]) >= thr, sd[n], 0.0) for n in names})
    for n in names:
        d = np.stack([t[n] for t in trimmed])
        want = np_combine(base[n], d, [1.0, 1.0], consensus=True, normalize=True)
        close(out[n].double().numpy(), want)


# --------------------------------------------------------------------------------------------
# Breadcrumbs
# --------------------------------------------------------------------------------------------

CRUMB = np.array([0.4, -1.0, 0.2, 0.9, -0.6, 0.1, 0.8, -0.3, 0.7, 0.5])


@pytest.mark.parametrize(
    ("density", "gamma", "kept"),
    [
        # 5 kept, top 1 dropped → |τ| in {0.5, …, 0.9}
        (0.5, 0.1, {0.5, 0.6, 0.7, 0.8, 0.9}),
        # γ = 0: plain top-k (mergekit 0.1.4 zeroed everything here)
        (0.5, 0.0, {0.6, 0.7, 0.8, 0.9, 1.0}),
        # density 0.8 + γ 0.3 > 1: γ is reduced, only the top 2 are dropped
        (0.8, 0.3, {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}),
        (0.2, 0.2, {0.7, 0.8}),
        (0.0, 0.1, set()),
        (1.0, 0.5, {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0}),
    ],
)
def test_breadcrumbs_by_hand(density: float, gamma: float, kept: set[float]) -> None:
    base = np.zeros(10)
    got = call("breadcrumbs", CRUMB[None], base, weight=[1.0], density=density, gamma=gamma)
    want = np.where(np.isin(np.round(np.abs(CRUMB), 6), list(kept)), CRUMB, 0.0)
    close(got, want)
    assert sum(got != 0) == len(kept)


def test_breadcrumbs_gamma_zero_is_topk_not_zero() -> None:
    base, xs = problem(2, shape=(6, 5), seed=2)
    got = call("breadcrumbs", xs, base, weight=[1.0, 1.0], density=0.5, gamma=0.0)
    deltas = np.stack([np_trim(x - base, 0.5) for x in xs])
    close(got, base + deltas.sum(0))
    assert np.abs(got - base).max() > 0


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.6, 0.0), (0.8, 0.3), (1.0, 0.1)])
def test_breadcrumbs_random(method: str, density: float, gamma: float) -> None:
    base, xs = problem(3, seed=4)
    w = [1.0, 0.6, 1.3]
    deltas = np.stack([np_crumbs(x - base, density, gamma) for x in xs])
    want = np_combine(base, deltas, w, consensus=method.endswith("ties"), normalize=False, lam=0.8)
    got = call(method, xs, base, weight=w, density=density, gamma=gamma, **{"lambda": 0.8})
    close(got, want)


@pytest.mark.parametrize(
    ("method", "params", "n_kept"),
    [
        ("ties", {"density": 0.7}, 7),
        ("ties", {"density": 0.9}, 9),
        ("breadcrumbs", {"density": 0.5}, 50),  # default γ = 0.01 → drop exactly 1 top value
    ],
)
def test_density_floors_like_the_config_value(
    tmp_path: Path, method: str, params: dict[str, float], n_kept: int
) -> None:
    """Regression: ⌊density·n⌋ uses the config's float64 value (float32(0.7)·10 = 6.99999988
    floored to 6; float32(0.01)·100 gave 0 outliers), as mergekit 0.1.5 does."""
    n = 10 if method == "ties" else 100
    tau = (np.arange(1, n + 1) / 8.0)[::-1].copy()
    b = _write(tmp_path / "base", {"w": np.zeros(n)})
    p = _write(tmp_path / "m", {"w": tau})
    cfg = {
        "merge_method": method,
        "base_model": str(b),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, **params}}],
    }
    tv_merge(cfg, tmp_path / "out", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["w"].double().numpy()
    if method == "ties":
        want = np_trim(tau, params["density"])
    else:
        want = np_crumbs(tau, params["density"], 0.01)
        assert got[0] == 0.0  # the largest value is the outlier dropped
    assert int((got != 0).sum()) == n_kept
    close(got, want)


def _tied_tau(seed: int = 0, shape: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A bfloat16 checkpoint pair: task vectors with many exactly tied magnitudes."""
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(shape, generator=g)).bfloat16()
    ft = (base.float() + 1e-3 * torch.randn(shape, generator=g)).bfloat16()
    return base.double().numpy(), ft.double().numpy()[None]


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        pytest.param("ties", {}, id="ties"),
        pytest.param("ties", {"rescale": True}, id="ties-rescaled"),
        pytest.param("breadcrumbs", {"gamma": 0.05}, id="breadcrumbs"),
        pytest.param("breadcrumbs", {"gamma": 0.05, "rescale": True}, id="breadcrumbs-rescaled"),
    ],
)
@pytest.mark.parametrize("density", [0.2, 0.5, 0.8])
def test_trim_keeps_exactly_k_with_tied_magnitudes(method, extra, density) -> None:
    base, xs = _tied_tau()
    tau = (xs[0] - base).reshape(-1)
    assert np.unique(np.abs(tau)).size < tau.size / 4  # heavily tied
    got = (call(method, xs, base, weight=[1.0], density=density, **extra) - base).reshape(-1)
    kept = got != 0
    n = tau.size
    if method == "ties":
        k = max(1, int(density * n))
        want = np.sort(np.abs(tau))[::-1][:k]
    else:
        target = int(density * n)
        n_bot = max(0, n - target - int(extra["gamma"] * n))
        want = np.sort(np.abs(tau))[n_bot : n_bot + target][::-1]
    want = want[want != 0]  # kept zeros are invisible
    # the kept magnitudes are exactly the documented multiset (whichever tied entries)
    assert kept.sum() == want.size
    np.testing.assert_array_equal(np.sort(np.abs(tau[kept]))[::-1], want)


@pytest.mark.parametrize("rescale", [False, True])
def test_tied_magnitudes_by_hand(rescale: bool) -> None:
    """ties: τ = [3, 2, 2, 2, 1], density 0.4 → k = 2: 3 and one of the 2s.
    breadcrumbs: |τ| sorted = [⅛, ¼, ½, 1, 2, 3, 4, 5, 5, 5], density 0.5, γ 0.1 → keep
    sorted positions 4…8: 2, 3, 4 and two of the three 5s."""
    xs = np.array([[3.0, 2.0, 2.0, 2.0, 1.0]])
    got = call("ties", xs, np.zeros(5), weight=[1.0], density=0.4, rescale=rescale)
    assert (got != 0).sum() == 2 and got[0] != 0
    if rescale:
        close(np.abs(got).sum(), np.abs(xs).sum())  # L1 rescale: (3 + 2)·(10/5)
    xs = np.array([[5.0, 5.0, 5.0, 1.0, 2.0, 3.0, 4.0, 0.5, 0.25, 0.125]])
    got = call(
        "breadcrumbs", xs, np.zeros(10), weight=[1.0], density=0.5, gamma=0.1, rescale=rescale
    )
    assert (got != 0).sum() == 5
    assert (got[:3] != 0).sum() == 2 and (got[4:7] != 0).all()


# --------------------------------------------------------------------------------------------
# DARE / DELLA (statistical)
# --------------------------------------------------------------------------------------------


def _draws(name: str, xs, base, reps: int, **params) -> np.ndarray:
    return np.stack([call(name, xs, base, seed=1000 + r, **params) for r in range(reps)])


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_kept_fraction_and_rescale_false(name: str) -> None:
    base, xs = problem(1, shape=(200, 200), seed=7)
    tau = xs[0] - base
    got = call(name, xs, base, seed=3, weight=[1.0], density=0.3, rescale=False)
    d = got - base
    kept = d != 0
    n = kept.size
    frac = kept.mean()
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    # survivors are unscaled; the rest are exactly dropped
    close(d[kept], tau[kept], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_l1_rescale_preserves_l1_norm(name: str) -> None:
    base, xs = problem(1, shape=(40, 50), seed=8)
    tau = xs[0] - base
    got = call(name, xs, base, seed=4, weight=[1.0], density=0.4)  # rescale: true (default)
    d = got - base
    assert (d != 0).mean() < 0.6
    np.testing.assert_allclose(np.abs(d).sum(), np.abs(tau).sum(), rtol=1e-5)
    # survivors are all scaled by the same factor
    ratio = d[d != 0] / tau[d != 0]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)


def test_dare_expectation_rescale_is_unbiased() -> None:
    base, xs = problem(2, shape=(6, 5), seed=9)
    w = [1.0, 0.5]
    p = 0.4
    reps = 400
    draws = _draws("dare_linear", xs, base, reps, weight=w, density=p, rescale="expectation")
    want = base + np.tensordot(np.array(w), xs - base, 1)
    # each draw: Σ wᵢ τᵢ Bᵢ/p; per-entry variance Σ wᵢ² τᵢ² (1−p)/p
    var = np.tensordot(np.array(w) ** 2, (xs - base) ** 2, 1) * (1 - p) / p
    z = (draws.mean(0) - want) / np.sqrt(var / reps)
    assert np.abs(z).max() < 5
    # each entry of each draw is one of 0, w₁τ₁/p, w₂τ₂/p, (w₁τ₁ + w₂τ₂)/p
    a, c = w[0] * (xs[0] - base) / p, w[1] * (xs[1] - base) / p
    options = np.stack([np.zeros_like(a), a, c, a + c])
    d = draws - base
    hit = np.isclose(d[:, None], options[None], rtol=1e-5, atol=1e-6).any(1)
    assert hit.all()


def test_dare_ties_with_density_one_is_ties_without_trim() -> None:
    base, xs = problem(3, seed=10)
    w = [1.0, 0.7, 0.4]
    want = np_combine(base, xs - base, w, consensus=True, normalize=False)
    close(call("dare_ties", xs, base, weight=w, density=1.0), want)


def _della_problem(rows: int = 8, cols: int = 64, seed: int = 12):
    """Rows whose magnitudes are a permutation of 1..cols (÷8, exact in bfloat16)."""
    rng = np.random.default_rng(seed)
    tau = np.stack([rng.permutation(np.arange(1, cols + 1)) / 8.0 for _ in range(rows)])
    tau *= rng.choice([-1.0, 1.0], size=tau.shape)
    base = rng.normal(size=tau.shape).astype(np.float32).astype(np.float64) * 0
    return base, (base + tau)[None], np.abs(tau)


def test_della_keep_probability_rises_with_rank() -> None:
    d, eps, reps = 0.5, 0.3, 300
    base, xs, mags = _della_problem()
    cols = mags.shape[1]
    kept = np.zeros_like(mags)
    for r in range(reps):
        got = call(
            "della_linear", xs, base, seed=r, weight=[1.0], density=d, epsilon=eps, rescale=False
        )
        kept += got != base
    freq = kept / reps
    rank = mags * 8 - 1  # 0 … cols-1 within each row
    prob = (d - eps) + 2 * eps * rank / (cols - 1)
    # aggregate the 8 rows per rank value
    by_rank = np.array([freq[rank == k].mean() for k in range(cols)])
    p_rank = np.array([prob[rank == k].mean() for k in range(cols)])
    se = np.sqrt(p_rank * (1 - p_rank) / (reps * mags.shape[0]))
    assert np.abs((by_rank - p_rank) / se).max() < 5
    slope = np.polyfit(np.arange(cols), by_rank, 1)[0]
    assert slope > 0
    np.testing.assert_allclose(slope * (cols - 1), 2 * eps, rtol=0.25)
    assert abs(freq.mean() - d) < 5 * math.sqrt(d * (1 - d) / kept.size / reps)


def test_della_expectation_rescale_is_unbiased() -> None:
    d, eps, reps = 0.5, 0.2, 400
    base, xs, mags = _della_problem(rows=4, cols=16, seed=13)
    cols = mags.shape[1]
    prob = (d - eps) + 2 * eps * (mags * 8 - 1) / (cols - 1)
    draws = _draws(
        "della_linear", xs, base, reps, weight=[1.0], density=d, epsilon=eps, rescale="expectation"
    )
    tau = xs[0] - base
    # survivors are τ / p(rank)
    one = draws[0] - base
    nz = one != 0
    close(one[nz], tau[nz] / prob[nz], rtol=1e-5)
    se = np.abs(tau) * np.sqrt((1 - prob) / prob / reps)
    z = (draws.mean(0) - xs[0]) / se
    assert np.abs(z).max() < 5


def test_della_single_model_consensus_matches_linear_variant() -> None:
    """With one model there is nothing to disagree with: della (normalize) with weight 1 and
    della_linear draw the same mask from the same seed."""
    base, xs = problem(1, shape=(8, 16), seed=14)
    a = call("della", xs, base, seed=5, weight=[1.0], density=0.5)
    b = call("della_linear", xs, base, seed=5, weight=[1.0], density=0.5)
    close(a, b)


def test_della_rejects_bad_epsilon() -> None:
    from taskvec.errors import ConfigError

    base, xs = problem(1, shape=(4, 4))
    with pytest.raises(ConfigError):
        call("della", xs, base, weight=[1.0], density=0.5, epsilon=0.5)


# --------------------------------------------------------------------------------------------
# SLERP family
# --------------------------------------------------------------------------------------------


def test_slerp_endpoints() -> None:
    base, xs = problem(1, shape=(6, 5), seed=15)
    close(call("slerp", xs, base, t=0.0), base)
    close(call("slerp", xs, base, t=1.0), xs[0])


def test_slerp_orthogonal_by_hand() -> None:
    a = np.array([2.0, 0.0])
    b = np.array([[0.0, 3.0]])
    # Ω = π/2: sin(2π/6)·a + sin(π/6)·b
    close(call("slerp", b, a, t=1 / 3), [2 * math.sqrt(3) / 2, 3 * 0.5])
    close(call("slerp", b, a, t=0.5), [2 / math.sqrt(2), 3 / math.sqrt(2)])


@pytest.mark.parametrize("factor", [2.0, -0.5])
def test_slerp_collinear_is_lerp(factor: float) -> None:
    a = np.array([1.0, -2.0, 0.5, 3.0])
    close(call("slerp", (factor * a)[None], a, t=0.3), 0.7 * a + 0.3 * factor * a)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.85])
def test_slerp_random(t: float) -> None:
    base, xs = problem(1, shape=(6, 5), seed=16)
    close(call("slerp", xs, base, t=t), np_slerp(t, base, xs[0]))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
def test_nuslerp_random(with_base: bool, flatten: bool, row_wise: bool) -> None:
    base, xs = problem(2, shape=(6, 5), seed=17)
    w = [1.0, 3.0]
    t = 0.75
    a, b = (xs[0] - base, xs[1] - base) if with_base else (xs[0], xs[1])
    if flatten:
        want = np_slerp_rows(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    elif row_wise:  # mergekit: dim=0 → interpolate each column vector
        want = np_slerp_rows(t, a.T, b.T).T
    else:
        want = np_slerp_rows(t, a, b)
    if with_base:
        want = base + want
    got = call(
        "nuslerp",
        xs,
        base if with_base else None,
        weight=w,
        nuslerp_flatten=flatten,
        nuslerp_row_wise=row_wise,
    )
    close(got, want)


def test_nuslerp_by_hand_and_zero_weights() -> None:
    xs = np.array([[1.0, 0.0], [0.0, 1.0]])
    s = math.sqrt(0.5)
    close(call("nuslerp", xs, weight=[1.0, 1.0]), [s, s])
    # weights summing to ≈ 0 fall back to t = 0.5
    close(call("nuslerp", xs, weight=[1.0, -1.0]), [s, s])
    # collinear: lerp with t = w₂/(w₁+w₂) = 0.25
    xs2 = np.array([[1.0, 2.0], [2.0, 4.0]])
    close(call("nuslerp", xs2, weight=[3.0, 1.0]), [1.25, 2.5])


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_random(with_base: bool, normalize: bool) -> None:
    base, xs = problem(3, shape=(6, 5), seed=18)
    w = [0.2, 0.5, 0.3] if not normalize else [1.0, 2.0, 0.5]
    want = np_multislerp(xs, np.array([v for v in w]), base if with_base else None, normalize)
    got = call("multislerp", xs, base if with_base else None, weight=w, normalize_weights=normalize)
    close(got, want)


def test_multislerp_by_hand() -> None:
    # two orthogonal vectors of norms 1 and 3, equal weights: the geodesic midpoint × mean norm
    xs = np.array([[1.0, 0.0], [0.0, 3.0]])
    close(call("multislerp", xs, weight=[1.0, 1.0]), [2 / math.sqrt(2), 2 / math.sqrt(2)])
    # one model: itself
    close(call("multislerp", xs[:1], weight=[1.0]), xs[0])


def test_multislerp_antipodal_pair_falls_back_to_lerp() -> None:
    xs = np.array([[1.0, 2.0], [-1.0, -2.0]])
    close(call("multislerp", xs, weight=[1.0, 1.0]), [0.0, 0.0])


def test_karcher_two_vectors_is_geodesic_midpoint() -> None:
    xs = np.array([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    close(call("karcher", xs), [math.sqrt(2), math.sqrt(2), 0.0])


def test_karcher_random() -> None:
    _, xs = problem(3, shape=(6, 5), seed=19)
    want = np_karcher(xs)
    got = call("karcher", xs, max_iter=100, tol=1e-9)
    close(got, want, rtol=1e-4, atol=1e-5)
    # default settings (10 iterations, tol 1e-5) are already close to stationary
    got = call("karcher", xs)
    assert karcher_gradient(xs, got) < 1e-4
    np.testing.assert_allclose(
        np.linalg.norm(got), np.linalg.norm(xs.reshape(3, -1), axis=1).mean()
    )


def test_karcher_single_and_zero_inputs() -> None:
    _, xs = problem(2, shape=(3, 2), seed=20)
    close(call("karcher", xs[:1]), xs[0])
    # a zero vector is not a direction: the mean of the rest, scaled by the mean of all norms
    zs = np.stack([xs[0], np.zeros_like(xs[0])])
    close(call("karcher", zs), xs[0] / 2)


# --------------------------------------------------------------------------------------------
# nearswap, model_stock, ram, sce, passthrough
# --------------------------------------------------------------------------------------------


def test_nearswap_by_hand() -> None:
    base = np.array([0.0, 0.0, 0.0, 1.0])
    other = np.array([[0.5, 2.0, 0.0, -3.0]])
    # |diff| = [0.5, 2, 0, 4]; w = clamp(1/max(|diff|, 1e-6), 0, 1) = [1, 0.5, 1, 0.25]
    close(call("nearswap", other, base, t=1.0), [0.5, 1.0, 0.0, 0.0])


def test_nearswap_random() -> None:
    base, xs = problem(1, seed=21)
    t = 0.4
    w = np.clip(t / np.maximum(np.abs(base - xs[0]), 1e-6), 0, 1)
    close(call("nearswap", xs, base, t=t), w * xs[0] + (1 - w) * base)


def test_model_stock_by_hand() -> None:
    base = np.zeros(2)
    # offsets (1, 0) and (1, 1): cos = 1/√2, t = 2c/(1 + c), mean = (1, 0.5)
    xs = np.array([[1.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    close(call("model_stock", xs, base), [t, 0.5 * t])
    # orthogonal offsets: cos = 0 → t = 0 → the base
    close(call("model_stock", np.array([[1.0, 0.0], [0.0, 2.0]]), base), [0.0, 0.0])
    # identical offsets: t = 1 → their mean
    close(call("model_stock", np.array([[1.0, 2.0], [2.0, 4.0]]), base), [1.5, 3.0])


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_random(filter_wise: bool, n: int) -> None:
    base, xs = problem(n, seed=22)
    # correlated fine-tunes so cos φ is well inside (0, 1)
    xs = base + 0.7 * (xs[0] - base) + 0.5 * (xs - base)
    xs = xs.astype(np.float32).astype(np.float64)
    close(
        call("model_stock", xs, base, filter_wise=filter_wise),
        np_model_stock(xs, base, filter_wise),
    )


def test_ram_by_hand() -> None:
    base = np.zeros(4)
    xs = np.array([[5.0, 2.0, 0.0, 3.0], [0.0, 4.0, 0.0, -1.0], [0.0, 0.0, 7.0, 0.0]])
    # counts [1, 2, 1, 2]: unique changes are kept, shared ones averaged
    close(call("ram", xs, base), [5.0, 3.0, 7.0, 1.0])
    # ramplus_tl: model 1 has shared/unique = 2/1 → boost 1 + r·min(ρ, α); model 3 has ρ = 0
    close(call("ramplus_tl", xs, base), [5.0 * 1.02, 3.0, 7.0, 1.0])
    close(call("ramplus_tl", xs, base, r=0.5, alpha=1.0), [7.5, 3.0, 7.0, 1.0])


def test_ram_epsilon_threshold() -> None:
    base = np.zeros(3)
    xs = np.array([[1e-6, 0.5, 2.0], [3e-6, 0.5, 1e-6]])
    close(call("ram", xs, base), [0.0, 0.5, 2.0], atol=1e-9)
    close(call("ram", xs, base, epsilon=1e-7), [2e-6, 0.5, (2.0 + 1e-6) / 2], atol=1e-9)


def test_ram_random() -> None:
    base, xs = problem(3, seed=23)
    # make a quarter of the entries of each model unchanged
    rng = np.random.default_rng(0)
    xs = np.where(rng.random(xs.shape) < 0.4, base, xs)
    close(call("ram", xs, base), np_ram(xs, base))
    close(call("ramplus_tl", xs, base, r=0.3, alpha=0.5), np_ram(xs, base, plus=(0.3, 0.5)))


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce_random(select_topk: float) -> None:
    base, xs = problem(3, seed=24)
    close(call("sce", xs, base, select_topk=select_topk), np_sce(xs, base, select_topk))


def test_sce_by_hand() -> None:
    base = np.zeros(3)
    xs = np.array([[2.0, -1.0, 0.0], [2.0, 3.0, 0.0]])
    # ω ∝ mean(τ²) = (5/3, 13/3) → (5/18, 13/18); signs [+, +, +(0)]; position 1 keeps τ₂ only
    close(call("sce", xs, base), [2.0, 3.0, 0.0])


def test_passthrough() -> None:
    _, xs = problem(1, seed=25)
    close(call("passthrough", xs), xs[0])
    close(call("passthrough", xs, scale=[-2.5]), -2.5 * xs[0])


# --------------------------------------------------------------------------------------------
# consensus (TALL masks), gram_schmidt, magmax, pcb
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus_random(k: int) -> None:
    base, xs = problem(3, seed=26)
    w = [1.0, 0.5, 0.8]
    lam_t = [0.6, 0.3, 0.5]
    tau = xs - base
    mtl = np.tensordot(np.array(w), tau, 1)
    masks = np.abs(tau) > np.array(lam_t)[:, None, None] * np.abs(mtl - tau)
    want = base + 0.7 * mtl * (masks.sum(0) >= k)
    got = call("consensus", xs, base, weight=w, tall_lambda=lam_t, k=k, **{"lambda": 0.7})
    close(got, want)


def test_consensus_by_hand() -> None:
    base = np.zeros(2)
    xs = np.array([[1.0, 1.0], [1.0, -1.0]])
    # τ_MTL = (2, 0); |τ| > 0.6·|τ_MTL − τ| → masks [[T, T], [T, T]] → both kept
    close(call("consensus", xs, base), [2.0, 0.0])
    # k = 3 with two tasks: nothing reaches it
    close(call("consensus", xs, base, k=3), [0.0, 0.0])


def test_gram_schmidt_random() -> None:
    base, xs = problem(3, seed=27)
    w = [1.0, 0.5, -0.5]
    got = call("gram_schmidt", xs, base, weight=w, **{"lambda": 0.9})
    close(got, np_gram_schmidt(xs, base, w, lam=0.9), rtol=1e-4, atol=1e-5)


def test_gram_schmidt_by_hand() -> None:
    base = np.zeros(2)
    xs = np.array([[1.0, 0.0], [1.0, 1.0]])
    # τ'₂ = (1,1) − 1·(1,0) = (0, 1)
    close(call("gram_schmidt", xs, base, weight=[1.0, 1.0]), [1.0, 1.0])
    close(call("gram_schmidt", xs, base, weight=[0.0, 2.0]), [0.0, 2.0])
    # a repeated task vector is removed entirely
    close(call("gram_schmidt", np.array([[2.0, 1.0], [2.0, 1.0]]), base, weight=[1, 1]), [2, 1])


def test_gram_schmidt_is_whole_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(28)
    shapes = {"a.weight": (3, 4), "b.weight": (5,)}
    base = {k: rng.normal(size=s) for k, s in shapes.items()}
    models = [{k: v + rng.normal(size=v.shape) for k, v in base.items()} for _ in range(2)]
    b = _write(tmp_path / "base", base)
    ps = [_write(tmp_path / f"m{i}", sd) for i, sd in enumerate(models)]
    cfg = {
        "merge_method": "gram_schmidt",
        "base_model": str(b),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in ps],
    }
    tv_merge(cfg, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    f = {k: v.astype(np.float32).astype(np.float64) for k, v in base.items()}
    flat_base = np.concatenate([f[k].reshape(-1) for k in shapes])
    flat_xs = np.stack(
        [np.concatenate([sd[k].astype(np.float32).reshape(-1) for k in shapes]) for sd in models]
    ).astype(np.float64)
    want = np_gram_schmidt(flat_xs, flat_base, [1.0, 1.0])
    got = np.concatenate([out[k].double().numpy().reshape(-1) for k in shapes])
    close(got, want, rtol=1e-4, atol=1e-5)


def test_magmax() -> None:
    base = np.array([1.0, 1.0, 1.0])
    xs = np.array([[2.0, 0.0, 1.5], [0.5, 3.0, 0.0]])
    # τ = [[1, -1, 0.5], [-0.5, 2, -1]] → pick [1, 2, -1]
    close(call("magmax", xs, base), [2.0, 3.0, 0.0])
    close(call("magmax", xs, base, **{"lambda": 0.5}), [1.5, 2.0, 0.5])
    b2, x2 = problem(3, seed=29)
    tau = x2 - b2
    pick = np.take_along_axis(tau, np.abs(tau).argmax(0)[None], 0)[0]
    close(call("magmax", x2, b2), b2 + pick)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_pcb_random(ratio: float) -> None:
    base, xs = problem(3, shape=(6, 5), seed=30, scale=0.5)
    close(call("pcb", xs, base, pcb_ratio=ratio, **{"lambda": 1.1}), np_pcb(xs, base, ratio, 1.1))


def np_arcee_fusion(other: np.ndarray, base: np.ndarray) -> np.ndarray:
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(other) + 1e-8, softmax(base) + 1e-8
    kl = (p * np.log(p / q)).sum(-1, keepdims=True)
    imp = np.abs(other - base) * kl
    srt = np.sort(imp.reshape(-1))
    q1, med, q3 = (srt[int(f * (srt.size - 1))] for f in (0.25, 0.5, 0.75))
    return base + (other - base) * (imp >= med + 1.5 * (q3 - q1))


def test_arcee_fusion_by_hand() -> None:
    """1-D: one KL for the whole tensor, so the mask is |Δ| ≥ median + 1.5·IQR of |Δ|:
    sorted |Δ| = [1, 2, 3, 4, 100] → q1 = 2, median = 3, q3 = 4 → only 100 survives."""
    base = np.array([0.0, 0.5, -0.5, 1.0, 0.0])
    other = base + np.array([1.0, -2.0, 3.0, 4.0, 100.0])
    close(call("arcee_fusion", other[None], base), base + [0, 0, 0, 0, 100.0])


@pytest.mark.parametrize("shape", [(6, 5), (40, 16), (7,)])
def test_arcee_fusion_random(shape: tuple[int, ...]) -> None:
    base, xs = problem(1, shape=shape, seed=38)
    rng = np.random.default_rng(1)
    xs = base + (xs - base) * (rng.random(shape) < 0.2) * 5 + 0.01 * (xs - base)
    xs = xs.astype(np.float32).astype(np.float64)
    got = call("arcee_fusion", xs, base)
    close(got, np_arcee_fusion(xs[0], base), rtol=1e-5, atol=1e-6)
    assert 0 < (got != base).sum() < got.size


# --------------------------------------------------------------------------------------------
# topk_mask and row_rank_fraction
# --------------------------------------------------------------------------------------------


def np_topk_mask(a: np.ndarray, k: int) -> np.ndarray:
    """The k largest, ties broken by position (earlier index first)."""
    order = np.lexsort((np.arange(a.size), -a))
    mask = np.zeros(a.size, dtype=bool)
    mask[order[: max(0, k)]] = True
    return mask


def _topk_cases():
    rng = np.random.default_rng(31)
    yield "continuous", rng.random(1000).astype(np.float32)
    yield "few-values", rng.integers(0, 5, size=3000).astype(np.float32)
    yield "mostly-zero", np.where(rng.random(5000) < 0.9, 0.0, rng.random(5000)).astype(np.float32)
    yield "one-bin", (1.0 + 1e-4 * rng.random(4000)).astype(np.float32)  # shared 16-bit keys
    yield "large", rng.integers(0, 40, size=200_000).astype(np.float32) * 0.37
    yield "signed", rng.normal(size=2000).astype(np.float32)
    yield "constant", np.full(17, 2.5, dtype=np.float32)


@pytest.mark.parametrize(("label", "values"), list(_topk_cases()))
def test_topk_mask_matches_numpy(label: str, values: np.ndarray) -> None:
    n = values.size
    for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n, n + 5}):
        got = topk_mask(torch.from_numpy(values.copy()), k).numpy()
        assert got.dtype == bool and got.shape == (n,)
        assert got.sum() == min(max(k, 0), n), (label, k)
        if 0 < k < n:
            assert values[got].min() >= values[~got].max(), (label, k)
        np.testing.assert_array_equal(got, np_topk_mask(values, k), err_msg=f"{label} k={k}")


def test_topk_mask_signed_zeros_count() -> None:
    values = np.array([0.0, -0.0, 0.0, -0.0, 1.0], dtype=np.float32)
    for k in range(6):
        got = topk_mask(torch.from_numpy(values.copy()), k).numpy()
        assert got.sum() == k
        if 0 < k < 5:
            assert values[got].min() >= values[~got].max()


def np_rank_fraction(m: np.ndarray) -> np.ndarray:
    """Rank within each row / (cols − 1); equal values ranked by position (stable sort)."""
    rows, cols = m.shape
    out = np.zeros_like(m, dtype=np.float64)
    if cols == 1:
        return out
    for r in range(rows):
        order = np.argsort(m[r], kind="stable")
        out[r, order] = np.arange(cols) / (cols - 1)
    return out


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(32).permutation(np.arange(60)).reshape(3, 20) / 16.0,
        np.random.default_rng(33).integers(0, 4, size=(5, 12)) * 0.5,  # many ties and zeros
        np.zeros((2, 7)),
        np.random.default_rng(34).integers(0, 3, size=(4, 1)) * 1.0,
        np.random.default_rng(35).integers(0, 100, size=(300, 9)) * 0.25,
        np.abs(np.random.default_rng(36).normal(size=(6, 40))),  # continuous: exact ranks
        1.0 + 1e-6 * np.random.default_rng(37).random(size=(3, 50)),  # below bfloat16 steps
    ],
)
def test_row_rank_fraction_matches_numpy(values: np.ndarray) -> None:
    v32 = values.astype(np.float32)
    got = row_rank_fraction(torch.from_numpy(v32.copy())).double().numpy()
    close(got, np_rank_fraction(v32), rtol=1e-6, atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1
    if values.shape[1] > 1:
        # every row is a permutation of 0, 1/(c−1), …, 1
        close(np.sort(got, axis=1), np.tile(np.linspace(0, 1, values.shape[1]), (len(got), 1)))
