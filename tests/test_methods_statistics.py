"""Golden tests of the methods that merge with per-model statistics: RegMean (Gram matrices of
each Linear layer's inputs) and Fisher merging (diagonal Fisher), against independent numpy
re-derivations of the papers' formulas, called directly as the engine calls them and end to
end through a YAML merge of tiny models with statistics folders written here (the format of
``taskvec stats``); and every bad statistics input as one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Family, load_folder, run_cli
from safetensors.torch import save_file
from test_foundation_errors import Check, one_error_line, write_config
from test_reliability_params import _no_reads

from taskvec.errors import NumericError
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.fingerprint import content_fingerprint
from taskvec.io.manifest import read_manifest
from taskvec.merge import plan_merge
from taskvec.methods import get_method

RTOL, ATOL = 1e-5, 1e-6

# --------------------------------------------------------------------------------------------
# Independent re-derivations (numpy, float64)
# --------------------------------------------------------------------------------------------


def np_regmean(ws: np.ndarray, grams: np.ndarray, alpha: float) -> np.ndarray:
    """Jin et al.: W = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢᵀ, transposed back to torch's (out, in) layout."""
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams.astype(np.float64)]
    rhs = sum(g @ w.astype(np.float64).T for g, w in zip(shrunk, ws, strict=True))
    return np.linalg.solve(sum(shrunk), rhs).T


def np_fisher(
    xs: np.ndarray,
    fs: np.ndarray,
    lam: Any,
    floor: float = 1e-6,
    first_only: bool = False,
    norms: Any = 1.0,
) -> np.ndarray:
    """Matena & Raffel: Σ λᵢ max(Fᵢ, ε) θᵢ / Σ λᵢ max(Fᵢ, ε) per entry (their code: λᵢ/‖Fᵢ‖)."""
    fs = fs.astype(np.float64).copy()
    if first_only:
        fs[0] = np.maximum(fs[0], floor)
    else:
        fs = np.maximum(fs, floor)
    c = (np.array(lam) / norms).reshape(-1, *[1] * (xs.ndim - 1)) * fs
    return (c * xs).sum(0) / c.sum(0)


def spd(d: int, rng: np.random.Generator, n: int = 50) -> np.ndarray:
    """A Gram matrix XᵀX/n of random inputs (symmetric positive definite for n ≥ d)."""
    x = rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, size=d)
    return (x.T @ x / n).astype(np.float32)


def call(name: str, xs: np.ndarray, stats: np.ndarray | None, **params: Any) -> np.ndarray:
    """Run ``name`` as the engine does: float32 inputs, per-model values as float64 (N,),
    the whole-model pass (if wanted) on this one tensor first."""
    m = get_method(name)
    n = xs.shape[0]
    per_model = {
        k: torch.tensor(params.pop(k, [d] * n), dtype=torch.float64) for k, d in m.per_model.items()
    }
    global_ = {k: params.pop(k, d) for k, d in m.globals.items()}
    extra: dict[str, Any] = {"name": "t"} if m.wants_name else {}
    assert not params, params
    tensors = torch.tensor(xs, dtype=torch.float32)
    extra["stats"] = None if stats is None else torch.tensor(stats, dtype=torch.float32)
    if m.whole_model is not None and m.whole_model.wanted(**global_):
        total = m.whole_model.collect(tensors.clone(), None, **per_model, **global_, **extra)
        global_.update(m.whole_model.finalize(total, **per_model, **global_))
    got = m.fn(tensors, None, **per_model, **global_, **extra)
    assert got.dtype == torch.float32 and tuple(got.shape) == xs.shape[1:]
    return got.double().numpy()


def linear_problem(n: int = 3, out: int = 5, d: int = 4, seed: int = 0) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    ws = rng.normal(size=(n, out, d)).astype(np.float32)
    return ws, np.stack([spd(d, rng) for _ in range(n)])


# --------------------------------------------------------------------------------------------
# regmean
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.95, 0.9, 0.5, 0.0, 1.0])
def test_regmean_is_the_solve_of_the_shrunk_grams(alpha: float) -> None:
    ws, grams = linear_problem()
    want = np_regmean(ws, grams, alpha)
    np.testing.assert_allclose(call("regmean", ws, grams, alpha=alpha), want, RTOL, 1e-5)


def test_regmean_default_alpha_is_fusionbench_s() -> None:
    assert get_method("regmean").globals == {"alpha": 0.95}
    ws, grams = linear_problem(seed=1)
    np.testing.assert_allclose(call("regmean", ws, grams), np_regmean(ws, grams, 0.95), 1e-5)


def test_regmean_with_one_gram_and_alpha_1_is_the_average() -> None:
    ws, grams = linear_problem(seed=2)
    same = np.stack([grams[0]] * 3)
    np.testing.assert_allclose(call("regmean", ws, same, alpha=1.0), ws.mean(0), 1e-5, 1e-5)


def test_regmean_of_one_model_is_that_model() -> None:
    ws, grams = linear_problem(n=1, seed=3)
    np.testing.assert_allclose(call("regmean", ws, grams, alpha=0.9), ws[0], 1e-5, 1e-5)


def test_regmean_does_not_depend_on_the_order_of_the_models() -> None:
    ws, grams = linear_problem(n=4, seed=4)
    perm = [2, 0, 3, 1]
    a = call("regmean", ws, grams, alpha=0.9)
    b = call("regmean", ws[perm], grams[perm], alpha=0.9)
    np.testing.assert_allclose(a, b, 1e-5, 1e-6)


def test_regmean_without_a_gram_is_the_mean() -> None:
    xs = np.random.default_rng(5).normal(size=(3, 7)).astype(np.float32)
    np.testing.assert_allclose(call("regmean", xs, None), xs.astype(np.float64).mean(0), 1e-6)


def test_regmean_singular_grams_are_a_numeric_error() -> None:
    ws, grams = linear_problem(n=2, seed=6)
    grams[:, 1, :] = grams[:, :, 1] = 0.0  # feature 1 never active on any model's data
    with pytest.raises(NumericError, match="regmean: the summed Gram matrix of t is singular"):
        call("regmean", ws, grams)


# --------------------------------------------------------------------------------------------
# fisher
# --------------------------------------------------------------------------------------------


def fisher_problem(n: int = 3, shape: tuple[int, ...] = (4, 6), seed: int = 0) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(n, *shape)).astype(np.float32)
    return xs, rng.uniform(0.0, 2.0, size=(n, *shape)).astype(np.float32) ** 3


@pytest.mark.parametrize("lam", [[1.0, 1.0, 1.0], [0.5, 2.0, 0.0]])
def test_fisher_is_the_fisher_weighted_average(lam: list[float]) -> None:
    xs, fs = fisher_problem()
    np.testing.assert_allclose(call("fisher", xs, fs, weight=lam), np_fisher(xs, fs, lam), 1e-5)


def test_fisher_with_equal_fishers_is_the_plain_average() -> None:
    xs, fs = fisher_problem(seed=1)
    same = np.stack([fs[0]] * 3)
    np.testing.assert_allclose(call("fisher", xs, same), xs.astype(np.float64).mean(0), 1e-5)


def test_zero_fisher_entries_hit_the_floor() -> None:
    xs, fs = fisher_problem(n=2, shape=(8,), seed=2)
    fs[:, :3] = 0.0  # no information anywhere: the floor weighs the models equally
    fs[0, 3:5], fs[1, 3:5] = 0.0, 1e-3  # one model without: weighted 1e-6 against 1e-3
    got = call("fisher", xs, fs)
    np.testing.assert_allclose(got[:3], xs[:, :3].astype(np.float64).mean(0), 1e-6)
    w = np.array([1e-6, 1e-3])[:, None]
    np.testing.assert_allclose(got[3:5], (w * xs[:, 3:5]).sum(0) / w.sum(), 1e-5)
    np.testing.assert_allclose(got, np_fisher(xs, fs, [1.0, 1.0]), 1e-5)
    floor = 1e-2
    np.testing.assert_allclose(
        call("fisher", xs, fs, fisher_floor=floor), np_fisher(xs, fs, [1.0, 1.0], floor), 1e-5
    )


def test_fisher_favoring_the_target_floors_only_the_first_model() -> None:
    """The paper's code (favor_target_model) floors only the first model's Fisher."""
    xs, fs = fisher_problem(n=3, shape=(10,), seed=3)
    fs[1:, :4] = 0.0
    fs[0, 2:6] = 0.0
    got = call("fisher", xs, fs, favor_target_model=True)
    np.testing.assert_allclose(got, np_fisher(xs, fs, [1.0] * 3, first_only=True), 1e-5)
    np.testing.assert_allclose(got[:2], xs[0, :2], 1e-6)  # only the target has information


def test_fisher_normalized_divides_each_weight_by_the_fisher_norm() -> None:
    """The paper's code: λᵢ / ‖Fᵢ‖₂ (here the whole model is this one tensor)."""
    xs, fs = fisher_problem(seed=5)
    fs[2] *= 1e3  # a model with a much larger Fisher no longer dominates
    lam = [1.0, 2.0, 0.5]
    norms = np.sqrt((fs.astype(np.float64) ** 2).reshape(3, -1).sum(1))
    want = np_fisher(xs, fs, lam, norms=norms)
    np.testing.assert_allclose(call("fisher", xs, fs, weight=lam, normalize=True), want, 1e-5)
    assert np.abs(want - np_fisher(xs, fs, lam)).max() > 0.1


def test_fisher_without_a_fisher_is_the_weighted_mean() -> None:
    xs, _ = fisher_problem(seed=4)
    lam = [1.0, 3.0, 0.5]
    want = np.tensordot(np.array(lam), xs.astype(np.float64), 1) / sum(lam)
    np.testing.assert_allclose(call("fisher", xs, None, weight=lam), want, 1e-5)


# --------------------------------------------------------------------------------------------
# End to end: YAML merges of tiny models with statistics folders
# --------------------------------------------------------------------------------------------

QKV = ("q_proj", "k_proj", "v_proj")


def gram_key(name: str) -> str:
    """q/k/v share their input, as ``taskvec stats`` writes them."""
    for proj in QKV:
        name = name.replace(proj, "qkv")
    return "gram." + name


def is_linear(name: str, t: torch.Tensor) -> bool:
    return t.ndim == 2 and "embed" not in name


def write_stats(
    folder: Path,
    model: Path,
    tensors: dict[str, torch.Tensor],
    kind: str,
    gram_of: dict[str, str] | None = None,
    **meta: str,
) -> Path:
    """A statistics folder in the format of ``taskvec stats``."""
    folder.mkdir(parents=True)
    metadata = {
        "taskvec.kind": "statistics",
        "taskvec.statistics": kind,
        "taskvec.model_fingerprint": content_fingerprint(open_checkpoint(model)),
        "taskvec.examples": "50",
        **({"taskvec.gram_of": json.dumps(gram_of)} if gram_of is not None else {}),
        **meta,
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    return folder


def gram_stats(fam: Family, i: int, folder: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """Random Grams for every Linear weight of fine-tune ``i``; the Grams by weight name."""
    rng = np.random.default_rng(seed)
    gram_of = {n: gram_key(n) for n, t in fam.ft_sds[i].items() if is_linear(n, t)}
    grams: dict[str, torch.Tensor] = {}
    for n, key in gram_of.items():
        if key not in grams:
            grams[key] = torch.tensor(spd(fam.ft_sds[i][n].shape[1], rng))
    by_weight = {n: grams[k].numpy() for n, k in gram_of.items()}
    return write_stats(folder, fam.fts[i], grams, "gram", gram_of), by_weight


def regmean_config(fam: Family, stats: list[str | None], **params: Any) -> dict[str, Any]:
    models = [
        {"model": str(p), **({"statistics": s} if s is not None else {})}
        for p, s in zip(fam.fts, stats, strict=False)
    ]
    return {"merge_method": "regmean", "models": models, "parameters": params}


@pytest.fixture(scope="module")
def grams(llama: Family, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    root = tmp_path_factory.mktemp("grams")
    return [gram_stats(llama, i, root / f"stats{i}", seed=10 + i) for i in range(2)]


def test_regmean_merge_end_to_end(llama: Family, grams: list[Any], tmp_path: Path) -> None:
    """Statistics paths relative to the config file; Linear weights by RegMean (q/k/v sharing
    one Gram), everything else averaged; a base_model is not merged; the manifest records the
    statistics among the inputs."""
    for (folder, _), name in zip(grams, ("s0", "s1"), strict=True):
        (tmp_path / name).symlink_to(folder)
    cfg = regmean_config(llama, ["s0", "s1"], alpha=0.9)
    cfg["base_model"] = str(llama.base)
    out = tmp_path / "out"
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), out, "--no-progress")
    assert res.exit_code == 0, res.stderr
    manifest = read_manifest(out)
    assert manifest is not None
    inputs = {i["path"] for i in manifest["producer"]["inputs"]}
    assert {str(tmp_path / "s0"), str(tmp_path / "s1")} <= inputs
    got = load_folder(out)
    sds = llama.ft_sds[:2]
    assert set(got) == set(sds[0])
    for name, t in got.items():
        ws = np.stack([sd[name].numpy() for sd in sds])
        if is_linear(name, t):
            want = np_regmean(ws, np.stack([g[name] for _, g in grams]), 0.9)
        else:
            want = ws.astype(np.float64).mean(0)
        np.testing.assert_allclose(t.double().numpy(), want, 1e-4, 1e-5, err_msg=name)


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_merge_end_to_end(llama: Family, tmp_path: Path, normalize: bool) -> None:
    """Fishers for the 2-D tensors only (zeros included: the floor); the rest λ-averaged;
    normalised, each λᵢ over the L2 norm of model i's whole Fisher."""
    rng = np.random.default_rng(7)
    fishers = []
    for i, scale in enumerate([1.0, 1e-4]):  # Fishers of very different sizes
        fs = {
            n: torch.tensor(scale * rng.uniform(0, 1, size=t.shape) ** 4, dtype=torch.float32)
            for n, t in llama.ft_sds[i].items()
            if t.ndim == 2
        }
        for f in fs.values():
            f[0] = 0.0
        fishers.append(fs)
        write_stats(tmp_path / f"f{i}", llama.fts[i], fs, "fisher")
    lam = [1.0, 3.0]
    cfg = {
        "merge_method": "fisher",
        "models": [
            {"model": str(p), "statistics": str(tmp_path / f"f{i}"), "parameters": {"weight": w}}
            for i, (p, w) in enumerate(zip(llama.fts, lam, strict=False))
        ],
        "parameters": {"normalize": normalize},
    }
    norms = [np.sqrt(sum((f.double() ** 2).sum().item() for f in fs.values())) for fs in fishers]
    out = tmp_path / "out"
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), out, "--no-progress")
    assert res.exit_code == 0, res.stderr
    for name, t in load_folder(out).items():
        xs = np.stack([sd[name].numpy() for sd in llama.ft_sds[:2]]).astype(np.float64)
        if t.ndim == 2:
            stacked = np.stack([f[name].numpy() for f in fishers])
            want = np_fisher(xs, stacked, lam, norms=np.array(norms) if normalize else 1.0)
        else:
            want = np.tensordot(np.array(lam), xs, 1) / sum(lam)
        np.testing.assert_allclose(t.double().numpy(), want, 1e-5, 1e-6, err_msg=name)


def test_the_memory_estimate_counts_the_statistics(llama: Family, grams: list[Any]) -> None:
    plan = plan_merge(regmean_config(llama, [str(f) for f, _ in grams]))
    job = next(j for j in plan.jobs if j.name.endswith("layers.0.mlp.down_proj.weight"))
    d = job.shape[1]
    assert job.work_bytes >= 4 * job.shape[0] * d * 6 + 4 * d * d * (2 + 6)
    assert job.read_bytes >= 2 * 4 * job.shape[0] * d + 2 * 4 * d * d


# --------------------------------------------------------------------------------------------
# Bad statistics: one line, before any merge work, nothing written
# --------------------------------------------------------------------------------------------


def _bad_gram(fam: Family, root: Path, break_it: str) -> Path:
    """Fine-tune 1's Grams, broken in one way."""
    folder, _ = gram_stats(fam, 1, root / "good", seed=3)
    ckpt = open_checkpoint(folder)
    tensors = {k: ckpt.read(k) for k in ckpt.tensors}
    gram_of = json.loads(ckpt.metadata["taskvec.gram_of"])
    target = "model.layers.0.mlp.down_proj.weight"
    if break_it == "missing":
        del tensors[gram_of[target]]
    elif break_it == "shape":
        d = tensors[gram_of[target]].shape[0] + 1
        tensors[gram_of[target]] = torch.eye(d)
    elif break_it == "partial":  # fine in itself, but lacks a weight model 0's Grams have
        del tensors[gram_of.pop(target)]
    return write_stats(root / break_it, fam.fts[1], tensors, "gram", gram_of)


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("missing path", ["model ", "statistics 'nowhere': no such file or folder"]),
        ("a model folder", ["is not a statistics folder"]),
        ("fisher for regmean", ["holds fisher statistics, not gram", "--kind gram"]),
        ("another model's", ["was computed on another model", "taskvec.model_fingerprint"]),
        ("missing", ["the gram statistic", "down_proj.weight", "is missing"]),
        ("shape", ["down_proj.weight", "has shape [65, 65], not [64, 64]"]),
        ("partial", ["down_proj.weight", "statistics of model", "lack it"]),
        ("none", ["regmean needs gram statistics of every model", "give `statistics:`"]),
    ],
)
def test_bad_statistics_are_one_line_and_nothing_is_written(
    llama: Family,
    grams: list[Any],
    tmp_path: Path,
    no_leftovers: Check,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    needles: list[str],
) -> None:
    """Headers alone find each problem; only the fingerprint check hashes the models' bytes
    (once: the digests are cached), so the header-level cases read no tensor at all."""
    second: str | None
    if case == "missing path":
        second = "nowhere"
    elif case == "a model folder":
        second = str(llama.fts[1])
    elif case == "fisher for regmean":
        fs = {n: torch.ones(t.shape) for n, t in llama.ft_sds[1].items()}
        second = str(write_stats(tmp_path / "f", llama.fts[1], fs, "fisher"))
    elif case == "another model's":
        second = str(grams[0][0])  # fine-tune 0's statistics for fine-tune 1
    elif case == "none":
        second = None
    else:
        second = str(_bad_gram(llama, tmp_path, case))
    cfg = write_config(tmp_path / "c.yml", regmean_config(llama, [str(grams[0][0]), second]))
    out = tmp_path / "out"
    if case in ("missing path", "a model folder", "fisher for regmean", "none"):
        content_fingerprint(open_checkpoint(llama.fts[0]))  # model 0's, hashed (cached)
        _no_reads(monkeypatch)
    one_error_line(run_cli("merge", cfg, out, "--no-progress"), *needles)
    no_leftovers(out)
