"""The rest of the lazy algebra: analogy, reductions, selection, stored task vectors, and the
readers of every checkpoint layout (sharded ``.bin`` with index, ``.safetensors`` and ``.pt``
state-dict files), each against a direct torch computation on the in-memory state dicts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import Family, StateDict, assert_within, formula_bound, load_folder

import taskvec as tv
from taskvec.algebra import StoredVector
from taskvec.errors import IncompatibleError


def taus(fam: Family) -> list[StateDict]:
    """Task vectors in float64, straight from the state dicts."""
    return [{k: sd[k].double() - b.double() for k, b in fam.base_sd.items()} for sd in fam.ft_sds]


def flat(sd: StateDict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in sd.values()])


# --------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------


def test_norm_dot_cosine_match_direct_computation(llama: Family) -> None:
    base = tv.load(llama.base)
    a, b = (tv.load(p) - base for p in llama.fts[:2])
    ta_, tb = (flat(t) for t in taus(llama)[:2])
    # taskvec rounds ft − base once to float32 before accumulating in float64
    rel = 1e-6
    assert math.isclose(a.norm(), float(ta_.norm()), rel_tol=rel)
    assert math.isclose(a.dot(b), float(ta_ @ tb), rel_tol=rel, abs_tol=1e-9)
    cos = float(ta_ @ tb / (ta_.norm() * tb.norm()))
    assert math.isclose(a.cosine(b), cos, rel_tol=rel, abs_tol=1e-9)
    assert math.isclose(a.cosine(a), 1.0, rel_tol=1e-12)
    assert math.isclose(a.cosine(-a), -1.0, rel_tol=1e-12)
    assert math.isclose((2.5 * a).norm(), 2.5 * a.norm(), rel_tol=rel)  # 2.5·τ rounds in float32
    # reductions are deterministic whatever the thread count
    assert a.norm(threads=1) == a.norm(threads=2)
    assert a.dot(b, threads=1) == a.dot(b, threads=2)


def test_zero_vector_has_zero_norm_and_cosine(llama: Family) -> None:
    base = tv.load(llama.base)
    zero = base - base
    assert zero.norm() == 0.0
    assert zero.cosine(tv.load(llama.fts[0]) - base) == 0.0


# --------------------------------------------------------------------------------------------
# Analogy, selection, arithmetic on vectors
# --------------------------------------------------------------------------------------------


def test_analogy_of_models(llama: Family, tmp_path: Path) -> None:
    """``analogy(a, b, c) = c + (b − a)`` for models a, b, c."""
    a, b, c = (tv.load(p) for p in llama.fts)
    out = load_folder(tv.analogy(a, b, c).save(tmp_path / "out", progress=False))
    sa, sb, sc = llama.ft_sds
    for k in sa:
        want = sc[k].double() + (sb[k].double() - sa[k].double())
        assert_within(out[k], want, formula_bound(sc[k], sb[k], sa[k]))


def test_analogy_of_task_vectors(llama: Family) -> None:
    base = tv.load(llama.base)
    ta_, tb, tc = (tv.load(p) - base for p in llama.fts)
    result = tv.analogy(ta_, tb, tc)
    assert isinstance(result, tv.TaskVector)
    da, db, dc = taus(llama)
    for k in da:
        want = dc[k] + (db[k] - da[k])
        assert_within(result.tensor(k), want, 2 * formula_bound(dc[k], db[k], da[k]))


def test_vector_arithmetic(llama: Family) -> None:
    base = tv.load(llama.base)
    ta_, tb = (tv.load(p) - base for p in llama.fts[:2])
    da, db = taus(llama)[:2]
    for expr, fn in [
        (ta_ + tb, lambda k: da[k] + db[k]),
        (ta_ - tb, lambda k: da[k] - db[k]),
        (-ta_, lambda k: -da[k]),
        (ta_ / 4, lambda k: da[k] / 4),
        (sum([ta_, tb]), lambda k: da[k] + db[k]),
    ]:
        for k in da:
            assert_within(expr.tensor(k), fn(k), 4 * formula_bound(da[k], db[k]))


@pytest.mark.parametrize(
    "include, exclude, keep",
    [
        ("model.layers.0.*", (), lambda n: n.startswith("model.layers.0.")),
        ("*.mlp.*", "*.down_proj.*", lambda n: ".mlp." in n and ".down_proj." not in n),
        (["*norm*", "lm_head.*"], (), lambda n: "norm" in n or n.startswith("lm_head.")),
        (
            "re:layers\\.1\\..*(q|k)_proj",
            (),
            lambda n: "layers.1." in n and ("q_proj" in n or "k_proj" in n),
        ),
    ],
    ids=["glob", "glob-exclude", "glob-list", "regex"],
)
def test_select_by_name_pattern(
    llama: Family, tmp_path: Path, include: str | list[str], exclude: str, keep: object
) -> None:
    base = tv.load(llama.base)
    tau = (tv.load(llama.fts[0]) - base).select(include, exclude)
    want = [n for n in llama.base_sd if keep(n)]  # type: ignore[operator]
    assert want and sorted(tau.names) == sorted(want)
    # applied to the base, unselected tensors stay the base's, bit for bit
    out = load_folder((base + tau).save(tmp_path / "out", progress=False))
    for k, b in llama.base_sd.items():
        if k in want:
            assert torch.equal(out[k], b + (llama.ft_sds[0][k] - b)), k
        else:
            assert torch.equal(out[k], b), k


def test_select_nothing_is_an_error(llama: Family) -> None:
    tau = tv.load(llama.fts[0]) - tv.load(llama.base)
    with pytest.raises(IncompatibleError, match="selects no tensor"):
        tau.select("no.such.tensor.*")


# --------------------------------------------------------------------------------------------
# Task vectors saved on their own
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_task_vector_round_trip(llama: Family, tmp_path: Path, dtype: str | None) -> None:
    base = tv.load(llama.base)
    tau = 0.5 * (tv.load(llama.fts[0]) - base) + 0.5 * (tv.load(llama.fts[1]) - base)
    path = tau.save(tmp_path / "tau", dtype=dtype, shard_size="20KB", progress=False)
    assert not (path / "config.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 1
    loaded = tv.load(path)
    assert isinstance(loaded, StoredVector)
    assert loaded.base_fingerprint == base.fingerprint()
    want_dtype = torch.bfloat16 if dtype else torch.float32
    for k in tau.names:
        stored = loaded.ckpt.read(k)
        assert stored.dtype == want_dtype
        assert torch.equal(stored, tau.tensor(k).to(want_dtype)), k
    # the reloaded vector applies like the lazy one did (exactly, when stored in float32)
    applied = (base + loaded).state_dict()
    lazy = (base + tau).state_dict()
    for k in lazy:
        if dtype is None:
            assert torch.equal(applied[k], lazy[k]), k
        else:
            assert_within(applied[k], lazy[k].double(), tau.tensor(k).abs() * 2.0**-8 + 1e-30)


def test_load_model_refuses_a_task_vector(llama: Family, tmp_path: Path) -> None:
    from taskvec.errors import CheckpointError

    (tv.load(llama.fts[0]) - tv.load(llama.base)).save(tmp_path / "tau", progress=False)
    with pytest.raises(CheckpointError, match="task vector"):
        tv.load_model(tmp_path / "tau")


def test_applying_to_a_mismatched_base_is_refused(llama: Family, bert: Family) -> None:
    tau = tv.load(bert.fts[0]) - tv.load(bert.base)
    with pytest.raises(IncompatibleError, match="does not exist in the base"):
        tv.load(llama.base) + tau


# --------------------------------------------------------------------------------------------
# Every input layout reads the same tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bin", "st", "pt"])
def test_input_layouts_read_the_same_tensors(bert: Family, layout: str) -> None:
    if layout == "bin":
        assert len(list(bert.extra["bin-base"].glob("pytorch_model-*.bin"))) > 1
    m = tv.load(bert.extra[f"{layout}-base"])
    ref = tv.load(bert.base)
    assert m.names == ref.names or sorted(m.names) == sorted(ref.names)
    for k, v in bert.base_sd.items():
        assert torch.equal(m.tensor(k), v), k
        assert m.specs[k].shape == tuple(v.shape)


@pytest.mark.parametrize("layout", ["bin", "st", "pt"])
def test_merges_of_any_layout_are_bitwise_equal(bert: Family, tmp_path: Path, layout: str) -> None:
    def merged(base: Path, fts: list[Path], out: Path) -> StateDict:
        cfg = {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 0.6}} for p in fts],
            "parameters": {"lambda": 0.9},
        }
        tv.merge(cfg, out, progress=False)
        return load_folder(out)

    want = merged(bert.base, bert.fts, tmp_path / "ref")
    got = merged(
        bert.extra[f"{layout}-base"],
        [bert.extra[f"{layout}-ft{i}"] for i in range(len(bert.fts))],
        tmp_path / "out",
    )
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    if layout == "bin":  # a save_pretrained folder: its side files come along
        for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (tmp_path / "out" / name).is_file(), name
    # and through the API, with a task vector of mixed layouts
    base = tv.load(bert.extra[f"{layout}-base"])
    tau = tv.load(bert.extra[f"{layout}-ft0"]) - base
    for k, b in bert.base_sd.items():
        assert torch.equal(tau.tensor(k), bert.ft_sds[0][k] - b), k


# --------------------------------------------------------------------------------------------
# Unusual tensor shapes: 0-d (e.g. CLIP's logit_scale) and zero-size tensors
# --------------------------------------------------------------------------------------------


def _odd_shapes_pair(root: Path, extra: StateDict) -> tuple[Path, Path, StateDict, StateDict]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    base_sd = {"layers.0.w": torch.randn(3, 4, generator=g), **extra}
    ft_sd = {k: v + 0.5 for k, v in base_sd.items()}
    paths = []
    for name, sd in (("base", base_sd), ("ft", ft_sd)):
        (root / name).mkdir()
        save_file(sd, str(root / name / "model.safetensors"))
        paths.append(root / name)
    return paths[0], paths[1], base_sd, ft_sd


def _merge_both_ways(tmp_path: Path, extra: StateDict) -> None:
    base_p, ft_p, base_sd, ft_sd = _odd_shapes_pair(tmp_path, extra)
    want = {k: base_sd[k] + 0.5 * (ft_sd[k] - base_sd[k]) for k in base_sd}
    base = tv.load(base_p)
    api = load_folder((base + 0.5 * (tv.load(ft_p) - base)).save(tmp_path / "api", progress=False))
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base_p),
        "models": [{"model": str(ft_p), "parameters": {"weight": 0.5}}],
    }
    tv.merge(cfg, tmp_path / "cfg", progress=False)
    for got in (api, load_folder(tmp_path / "cfg")):
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].shape == v.shape, k
            torch.testing.assert_close(got[k], v)


def test_zero_dim_tensor_is_merged(tmp_path: Path) -> None:
    _merge_both_ways(tmp_path, {"logit_scale": torch.tensor(2.5)})


def test_zero_size_tensor_is_kept(tmp_path: Path) -> None:
    _merge_both_ways(tmp_path, {"layers.0.empty": torch.zeros(0, 4)})


def test_zero_size_vector_is_kept(tmp_path: Path) -> None:
    _merge_both_ways(tmp_path, {"layers.0.empty": torch.zeros(0)})


def test_legacy_pickle_format_is_read(bert: Family, tmp_path: Path) -> None:
    """``torch.save(..., _use_new_zipfile_serialization=False)`` files (older hub checkpoints)
    cannot be memory-mapped, but must still be readable."""
    legacy = tmp_path / "legacy.bin"
    torch.save(bert.ft_sds[0], legacy, _use_new_zipfile_serialization=False)
    tau = tv.load(legacy) - tv.load(bert.extra["pt-base"])
    for k, b in bert.base_sd.items():
        assert torch.equal(tau.tensor(k), bert.ft_sds[0][k] - b), k
