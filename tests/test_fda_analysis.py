"""FDA analysis (taskvec.fda.analysis): the measures' math, the real inputs, and the command,
on tiny BERT models (conftest) with anchors built for a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import Family, run_cli
from scipy.optimize import nnls

from taskvec.bench import fda_rows
from taskvec.fda import analysis
from taskvec.fda.analysis import (
    AnalysisSettings,
    Cone,
    Sources,
    analyze,
    flat,
    overlap,
    real_inputs,
    spectrum,
    tail_energy,
    top_subspace,
    update,
)
from taskvec.fda.anchors import AnchorSettings
from taskvec.fda.blocks import BlockModel
from taskvec.fda.pipeline import FDA

pytestmark = pytest.mark.usefixtures("one_thread")


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


# --- spectrum and subspaces --------------------------------------------------------------------
def test_spectrum_is_sorted_and_normalised() -> None:
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(0))
    s = spectrum(x)
    assert s.shape == (16,)
    assert s[0] == 1 and bool((s[1:] <= s[:-1]).all()) and bool((s >= 0).all())
    exact = torch.linalg.svdvals(x.reshape(20, 16).double())
    torch.testing.assert_close(s, exact / exact.max())


def test_spectrum_of_known_matrix_and_tail_energy() -> None:
    x = torch.diag(torch.tensor([1.0, 4.0, 2.0]))
    torch.testing.assert_close(spectrum(x), torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    assert tail_energy(spectrum(x), 1) == pytest.approx((0.25 + 0.0625) / 1.3125)


def test_overlap_is_one_for_the_same_subspace() -> None:
    basis = orthonormal(32, 4, 0)
    rotated = basis @ orthonormal(4, 4, 1)  # another basis of the same subspace
    assert overlap(basis, rotated) == pytest.approx(1.0)
    rows = torch.randn(100, 4, generator=torch.Generator().manual_seed(2)).double() @ basis.T
    assert overlap(top_subspace(rows, 4), basis) == pytest.approx(1.0)


def test_overlap_of_random_subspaces_is_k_over_d() -> None:
    d, k = 64, 8
    values = [overlap(orthonormal(d, k, 2 * i), orthonormal(d, k, 2 * i + 1)) for i in range(60)]
    assert sum(values) / len(values) == pytest.approx(k / d, rel=0.1)


# --- cone energy -------------------------------------------------------------------------------
def test_cone_energy_is_one_inside_the_cone() -> None:
    rays = torch.randn(5, 200, generator=torch.Generator().manual_seed(3))
    inside = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.1]) @ rays
    assert Cone(rays).energy(inside) == pytest.approx(1.0, abs=1e-9)


def test_cone_energy_is_zero_opposite_a_one_direction_cone() -> None:
    r = torch.randn(300, generator=torch.Generator().manual_seed(4))
    rays = torch.stack([r, 2 * r, 0.5 * r])
    assert Cone(rays).energy(-r) == pytest.approx(0.0, abs=1e-12)
    assert Cone(rays).energy(r) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("angle", "expected"),
    [
        (30.0, 1.0),  # between the rays (at 0° and 60°)
        (-30.0, math.cos(math.radians(30)) ** 2),  # nearest point on the ray at 0°
        (100.0, math.cos(math.radians(40)) ** 2),  # nearest point on the ray at 60°
        (210.0, 0.0),  # in the polar cone: projects to 0
    ],
)
def test_cone_energy_two_rays_closed_form(angle: float, expected: float) -> None:
    plane = orthonormal(40, 3, 5)  # two in-plane axes and one orthogonal direction
    e1, e2, out = plane.T
    rays = torch.stack([e1, 0.5 * e1 + math.sqrt(3) / 2 * e2]) * torch.tensor([[3.0], [0.2]])
    a = math.radians(angle)
    v = math.cos(a) * e1 + math.sin(a) * e2 + out  # ‖v‖² = 2: half the energy is off-plane
    assert Cone(rays).energy(v) == pytest.approx(expected / 2, abs=1e-9)


def test_cone_energy_matches_nnls_on_the_full_vectors() -> None:
    g = torch.Generator().manual_seed(6)
    rays = torch.randn(6, 120, generator=g, dtype=torch.float64)
    v = torch.randn(120, generator=g, dtype=torch.float64)
    c, _ = nnls(rays.T.numpy(), v.numpy())
    brute = (rays.T @ torch.from_numpy(c)).pow(2).sum() / v.pow(2).sum()
    assert Cone(rays).energy(v) == pytest.approx(float(brute), abs=1e-9)


# --- updates and real inputs on the tiny BERT --------------------------------------------------
def test_update_descends_the_distance(bert: Family) -> None:
    from taskvec.fda.adapt import distance

    block = BlockModel.open(bert.base).block(1)
    fda = FDA(bert.base, {"a": bert.fts[0]})
    theta0, expert = block.read(fda.base), block.read(fda.experts["a"])
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = block.forward(expert, x)
    u = update(block, theta0, x, y)
    assert u.shape == flat(theta0).shape
    assert update(block, expert, x, y).abs().max() < 1e-4  # at the target: no update
    step, at = 1e-3 / u.norm(), 0
    moved = {}
    for n, v in theta0.items():
        moved[n] = v + step * u[at : at + v.numel()].reshape(v.shape)
        at += v.numel()
    with torch.no_grad():
        before = distance(block.forward(theta0, x), y, "mse")
        after = distance(block.forward(moved, x), y, "mse")
    assert after < before


def random_ids(count: int, seed: int, vocab: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (count,), generator=g)
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lengths]


def test_real_inputs_are_the_blocks_inputs(bert: Family) -> None:
    from taskvec.bench.encoder import load_encoder

    encoder = load_encoder(bert.base, bert.base)
    ids = random_ids(10, 8)
    real = real_inputs(encoder, ids, 0, [0, 1], window=5, batch=4)
    assert real.tokens[0].shape == (sum(map(len, ids)), 32)
    assert real.windows[1].shape == (sum(len(s) >= 5 for s in ids), 5, 32)
    # hidden_states[l] is block l's input: block 0 on a whole unpadded sequence gives block 1's
    longest = max(ids, key=len)
    with torch.no_grad():
        states = encoder(input_ids=torch.tensor([longest]), output_hidden_states=True)
    block = BlockModel.open(bert.base).block(0)
    out = block.forward(
        block.read(FDA(bert.base, {"a": bert.fts[0]}).base), states.hidden_states[0]
    )
    torch.testing.assert_close(out, states.hidden_states[1], atol=1e-5, rtol=1e-4)
    # every window is a run of consecutive token states of one sequence
    first = real.windows[0][0]
    tokens = real.tokens[0][: len(ids[0])]
    assert any(torch.equal(tokens[s : s + 5], first) for s in range(len(ids[0]) - 4))


# --- the whole analysis ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def anchor_dirs(bert: Family, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    fda = FDA(bert.base, {"a": bert.fts[0], "b": bert.fts[1]})
    root = tmp_path_factory.mktemp("fda-anchors")
    dirs = []
    for init in ("gauss", "weight"):
        folder = root / init
        settings = AnchorSettings(anchors=6, steps=4, init=init, snapshots=3)  # type: ignore[arg-type]
        fda.construct(folder, settings, progress=False, echo=lambda _: None)
        dirs.append(folder)
    return dirs


@pytest.fixture(scope="module")
def sources(bert: Family) -> Sources:
    ids = {"a": random_ids(24, 9), "b": random_ids(24, 10)}
    return Sources(bert.base, {"a": bert.fts[0], "b": bert.fts[1]}, ids, 0)


def test_analyze_writes_plots_and_numbers(
    sources: Sources, anchor_dirs: list[Path], tmp_path: Path
) -> None:
    settings = AnalysisSettings(rank=4, cone_batches=4)
    result = analyze(sources, anchor_dirs, tmp_path, settings, echo=lambda _: None)
    for name in analysis.FILES:
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "fda-analysis.json").read_text()) == json.loads(
        json.dumps(result)
    )
    assert list(result["sets"]) == ["gauss", "weight"] and result["blocks"] == [0, 1]
    assert result["random_overlap"] == pytest.approx(4 / 32)
    for block in result["per_block"].values():
        for label in ("gauss", "weight"):
            sub = block["subspace"][label]
            assert sub["steps"][0] == 0 and sub["steps"][-1] == 4
            assert all(0 <= v <= 1 + 1e-9 for vs in sub["overlap"].values() for v in vs)
            assert block["spectrum"]["anchors"][label]["a"][0] == 1
        cone = block["cone"]
        for key in ("held_out_real", "task_vector", "random"):
            assert all(0 <= v <= 1 for v in cone[key].values())
        assert max(cone["random"].values()) < 0.05


def test_initial_anchors_are_recomputed_without_snapshots(
    sources: Sources, bert: Family, tmp_path: Path
) -> None:
    fda = FDA(bert.base, {"a": bert.fts[0], "b": bert.fts[1]})
    fda.construct(
        tmp_path / "anchors",
        AnchorSettings(anchors=6, steps=2),
        blocks=[0, 1],
        progress=False,
        echo=lambda _: None,
    )
    with_snaps = tmp_path / "snaps"
    fda.construct(
        with_snaps,
        AnchorSettings(anchors=6, steps=2, snapshots=2),
        blocks=[0, 1],
        progress=False,
        echo=lambda _: None,
    )
    settings = AnalysisSettings(rank=4, cone_batches=2)
    plain = analyze(sources, [tmp_path / "anchors"], None, settings, blocks=[1])
    snaps = analyze(sources, [with_snaps], None, settings, blocks=[1])
    a, b = (
        plain["per_block"]["1"]["subspace"]["gauss"],
        snaps["per_block"]["1"]["subspace"]["gauss"],
    )
    assert a["steps"] == [0, 2] and b["steps"][0] == 0
    assert a["overlap"]["a"][0] == pytest.approx(b["overlap"]["a"][0])


def test_command_writes_the_files(
    sources: Sources, anchor_dirs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []

    def fake_sources(name: str, examples: int) -> Sources:
        asked.append((name, examples))
        return sources

    monkeypatch.setattr(fda_rows, "benchmark_sources", fake_sources)
    out = tmp_path / "out"
    args = ["fda", "analyze", "--anchors", anchor_dirs[0], "--anchors", anchor_dirs[1]]
    r = run_cli(
        *args,
        "--benchmark",
        "lite",
        "--blocks",
        "1",
        "--real-examples",
        "24",
        "--rank",
        "4",
        "--cone-batches",
        "3",
        "--threads",
        "1",
        "--device",
        "cpu",
        "-o",
        out,
    )
    assert r.exit_code == 0, r.output
    assert asked == [("lite", 24)]
    assert sorted(p.name for p in out.iterdir()) == sorted(analysis.FILES)
    data = json.loads((out / "fda-analysis.json").read_text())
    assert data["blocks"] == [1] and data["settings"]["cone_batches"] == 3


def test_command_rejects_a_folder_without_anchors(
    sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fda_rows, "benchmark_sources", lambda *_: sources)
    r = run_cli("fda", "analyze", "--anchors", tmp_path, "--threads", "1", "-o", tmp_path / "o")
    assert r.exit_code == 1 and "not a taskvec anchor file" in r.output
    assert not (tmp_path / "o").exists()
