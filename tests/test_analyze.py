"""``taskvec analyze``: every number against a numpy re-derivation on the tiny Llama family."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Family, save_hf, seeded_noise

from taskvec.analyze import analyze
from taskvec.analyze.kinds import module_kind
from taskvec.analyze.masks import (
    MaskCounter,
    coarse_thresholds,
    magnitude_bits,
    upper_counts,
)
from taskvec.layout import LayerLayout


def _taus(fam: Family, sds: list[dict[str, torch.Tensor]] | None = None) -> list[dict[str, Any]]:
    """τ as float32 numpy arrays, as taskvec computes them (ft.float() − base.float())."""
    return [
        {k: (sd[k].float() - fam.base_sd[k].float()).numpy().ravel() for k in fam.base_sd}
        for sd in (sds or fam.ft_sds)
    ]


def _flat(tau: dict[str, Any], names: list[str]) -> Any:
    return np.concatenate([tau[n] for n in names])


def _numpy_masks(x: Any, k: float) -> Any:
    """Top-k mask by sorting: |x| ≥ the m-th largest |x|, x ≠ 0, m = ⌈k·N⌉."""
    m = math.ceil(round(k * x.size, 9))
    t = np.sort(np.abs(x))[-m]
    return (np.abs(x) >= t) & (x != 0)


def _jaccard(a: Any, b: Any) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


@pytest.fixture(scope="module")
def sparse_family(llama: Family, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """The Llama base and three fine-tunes that share structure: τ_1 ≈ 0.5 τ_0, τ_2 sparse
    (most entries unchanged) with ties, so masks, zeros and sign conflicts are exercised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("analyze-family")
    base = llama.base_sd
    ft0 = llama.ft_sds[0]
    ft1 = {
        k: base[k] + 0.5 * (ft0[k] - base[k]) + 0.001 * (seeded_noise(base, 7)[k] - base[k])
        for k in base
    }
    noisy = seeded_noise(base, 9, scale=0.02)
    ft2 = {}
    for k, v in base.items():
        keep = torch.arange(v.numel()).reshape(v.shape) % 5 == 0
        step = torch.round((noisy[k] - v) * 100) / 100  # ties
        ft2[k] = torch.where(keep, v + step, v)
    cfg = LlamaConfig.from_pretrained(llama.base)
    model = LlamaForCausalLM(cfg)
    fts = [save_hf(model, sd, root / f"ft{i}") for i, sd in enumerate([ft0, ft1, ft2])]
    return Family("llama", llama.base, fts, base, [ft0, ft1, ft2], root)


@pytest.mark.usefixtures("one_thread")  # as the analysis runs it: tiny histograms, no pool
@pytest.mark.parametrize("compact_at", [None, 1])
def test_masks_exact_against_sorting(
    compact_at: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thresholds, sizes and intersections of the two-pass radix select equal numpy's sort on
    vectors with correlation, many zeros and many ties (two vectors rounded alike, so many
    entries are undecided in both), fed in uneven chunks; also with the undecided pairs
    compacted after every chunk."""
    from taskvec.analyze import masks

    if compact_at is not None:
        monkeypatch.setattr(masks._Pairs, "COMPACT_AT", compact_at)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5003)).astype(np.float32)
    x[1] = x[0] * 0.5 + 0.01 * x[1]
    x[2, :4000] = 0
    x[3] = np.round(x[3], 1)
    x[4] = np.round(x[3] + 0.3 * x[4], 1)
    # differences of bf16 weights, as τ of bf16 models: lower 16 bits mostly zero, many ties
    w = torch.from_numpy(rng.standard_normal(5003).astype(np.float32)).bfloat16()
    for row in (5, 6):
        step = torch.from_numpy(x[row] * 0.01).bfloat16()
        x[row] = ((w + step).float() - w.float()).numpy()
    chunks = [torch.from_numpy(x[:, i : i + 701].copy()) for i in range(0, x.shape[1], 701)]
    for k in (0.05, 0.2, 0.5, 0.9):
        counts = sum(upper_counts(magnitude_bits(c)) for c in chunks)
        counter = MaskCounter(coarse_thresholds(counts, x.shape[1], k))
        for c in chunks:
            counter.add(counter.count(magnitude_bits(c)))
        stats = counter.finish()
        masks = [_numpy_masks(row, k) for row in x]
        top = math.ceil(round(k * x.shape[1], 9))
        assert stats.thresholds == [float(np.sort(np.abs(row))[-top]) for row in x]
        assert stats.sizes == [int(m.sum()) for m in masks]
        want = [[int((a & b).sum()) for b in masks] for a in masks]
        assert stats.intersections == want
        jac = stats.jaccard()
        for a in range(7):
            for b in range(7):
                if a != b:
                    assert jac[a][b] == pytest.approx(_jaccard(masks[a], masks[b]), abs=1e-15)


def test_module_kinds() -> None:
    expected = {
        "model.embed_tokens.weight": "embeddings",
        "model.layers.3.self_attn.k_proj.weight": "attention",
        "model.layers.3.mlp.down_proj.weight": "mlp",
        "model.layers.3.post_attention_layernorm.weight": "norms",
        "encoder.layer.0.attention.output.dense.weight": "attention",
        "encoder.layer.0.output.dense.weight": "mlp",
        "encoder.layer.0.output.LayerNorm.bias": "norms",
        "transformer.h.0.ln_1.weight": "norms",
        "transformer.wte.weight": "embeddings",
        "lm_head.weight": "other",
    }
    assert {n: module_kind(n) for n in expected} == expected


def test_analysis_matches_numpy(sparse_family: Family) -> None:
    fam = sparse_family
    result = analyze(fam.base, fam.fts, threads=2, progress=False)
    taus = _taus(fam)
    names = list(fam.base_sd)
    flat = [_flat(t, names).astype(np.float64) for t in taus]
    labels = result["tasks"]
    assert labels == ["ft0", "ft1", "ft2"]
    assert result["parameters"] == flat[0].size
    layout = LayerLayout.infer(names)
    for i, label in enumerate(labels):
        pv = result["per_vector"][label]
        assert pv["norm"] == pytest.approx(np.linalg.norm(flat[i]), rel=1e-12)
        assert pv["max_abs"] == pytest.approx(np.abs(flat[i]).max(), rel=1e-7)
        zero = (np.abs(flat[i].astype(np.float32)) <= 1e-8).mean()
        assert pv["near_zero_fraction"] == pytest.approx(zero, abs=1e-12)
        for layer in range(layout.num_layers):
            mine = [n for n in names if layout.split(n)[0] == layer]
            want = np.linalg.norm(np.concatenate([taus[i][n] for n in mine]).astype(np.float64))
            assert pv["norm_by_layer"][layer] == pytest.approx(want, rel=1e-12)
        for kind, value in pv["norm_by_kind"].items():
            mine = [n for n in names if module_kind(n) == kind]
            want = np.linalg.norm(np.concatenate([taus[i][n] for n in mine] or [np.zeros(0)]))
            assert value == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert flat[2].size * 0.7 < (flat[2] == 0).sum()  # the sparse vector is mostly unchanged
    pair = result["pairwise"]
    for a in range(3):
        for b in range(3):
            cos = flat[a] @ flat[b] / np.linalg.norm(flat[a]) / np.linalg.norm(flat[b])
            assert pair["cosine"][a][b] == pytest.approx(cos, abs=1e-12)
            angle = math.degrees(math.acos(min(1.0, max(-1.0, cos))))
            assert pair["angle_degrees"][a][b] == pytest.approx(angle, abs=1e-5)
            both = (np.abs(flat[a]) > 1e-8) & (np.abs(flat[b]) > 1e-8)
            differ = both & (np.sign(flat[a]) != np.sign(flat[b]))
            assert pair["sign_conflict"][a][b] == pytest.approx(differ.sum() / both.sum())
            for k in (0.05, 0.2):
                ma, mb = (
                    _numpy_masks(flat[a].astype(np.float32), k),
                    _numpy_masks(flat[b].astype(np.float32), k),
                )
                got = pair["top_k"][f"{k:g}"]["jaccard"][a][b]
                assert got == pytest.approx(_jaccard(ma, mb), abs=1e-15)
    assert pair["cosine"][0][1] > 0.99  # τ_1 ≈ 0.5 τ_0
    assert pair["sign_conflict"][0][1] < 0.05 < pair["sign_conflict"][0][2]
    for layer in range(layout.num_layers):
        mine = [n for n in names if layout.split(n)[0] == layer]
        la, lb = (np.concatenate([taus[i][n] for n in mine]).astype(np.float64) for i in (0, 2))
        cos = la @ lb / np.linalg.norm(la) / np.linalg.norm(lb)
        assert result["per_layer"]["cosine"][layer][0][2] == pytest.approx(cos, abs=1e-12)


def test_pca_places_merged_models(llama: Family, tmp_path: Path) -> None:
    """PCA coordinates reproduce the Gram matrix of the task vectors (a 2-D isometry for two
    task vectors), and a merged model base + 0.5 (τ_0 + τ_1) lands at half their sum, fully in
    their span; a third vector outside the span gets in_span < 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base, (ft0, ft1) = llama.base_sd, llama.ft_sds[:2]
    merged_sd = {k: base[k] + 0.5 * ((ft0[k] - base[k]) + (ft1[k] - base[k])) for k in base}
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(llama.base))
    merged = save_hf(model, merged_sd, tmp_path / "ta")
    result = analyze(
        llama.base, llama.fts[:2], merged=[merged, llama.fts[2]], threads=1, progress=False
    )
    xy = {k: np.array(v) for k, v in result["pca"]["coordinates"].items()}
    gram = np.array(result["gram"])
    t0, t1 = result["tasks"]
    for a, la in enumerate([t0, t1]):
        for b, lb in enumerate([t0, t1]):
            assert xy[la] @ xy[lb] == pytest.approx(gram[a, b], rel=1e-9)
    assert np.allclose(xy["merged:ta"], 0.5 * (xy[t0] + xy[t1]), rtol=1e-5, atol=1e-9)
    assert result["pca"]["in_span"]["merged:ta"] == pytest.approx(1.0, abs=1e-5)
    assert result["pca"]["in_span"]["merged:llama-ft2"] < 0.1


def test_written_report(sparse_family: Family, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = analyze(sparse_family.base, sparse_family.fts, out, progress=False)
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["pairwise"]["cosine"] == result["pairwise"]["cosine"]
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 5
    assert "ft2" in html


def _numpy_spectra(x: Any, k: int) -> tuple[float, float, Any]:
    """Effective rank, top-k energy and the top-k left/right singular basis of the smaller side."""
    u, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    p = s / s.sum()
    eff = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    energy = float((s[:k] ** 2).sum() / (s**2).sum())
    basis = u[:, :k] if x.shape[0] <= x.shape[1] else vt[:k].T
    return eff, energy, basis


def test_spectra_match_numpy_svd(sparse_family: Family) -> None:
    """Effective rank, top-k energy and subspace overlap against numpy's float64 SVD, within
    the float32 eigvalsh resolution the module documents (≈ 3·10⁻⁴ s_1 on the spectrum)."""
    fam = sparse_family
    result = analyze(fam.base, fam.fts, spectra_layers=1, spectra_rank=4, progress=False)
    sp = result["spectra"]
    assert sp["layers"] == [1]
    taus = _taus(fam)
    shapes = {k: tuple(v.shape) for k, v in fam.base_sd.items()}
    want_names = [n for n in fam.base_sd if len(shapes[n]) == 2 and ".layers.1." in n]
    assert sorted(sp["tensors"]) == sorted(want_names)
    for name in want_names:
        got = sp["tensors"][name]
        found = [_numpy_spectra(t[name].reshape(shapes[name]), 4) for t in taus]
        for i, (eff, energy, _) in enumerate(found):
            assert got["effective_rank"][i] == pytest.approx(eff, rel=1e-3)
            assert got["top_k_energy"][i] == pytest.approx(energy, rel=1e-3)
        for a in range(3):
            for b in range(3):
                ov = float(((found[a][2].T @ found[b][2]) ** 2).sum() / 4)
                assert got["overlap"][a][b] == pytest.approx(ov, abs=1e-3)


def test_merge_config_conflicts(sparse_family: Family, tmp_path: Path) -> None:
    """--merge adds the config's inputs and reports, per layer, their mean sign conflict, mean
    cosine and ρ = ‖Σ w τ‖ / Σ |w| ‖τ‖, each against numpy; layers ranked by conflict."""
    import yaml

    fam = sparse_family
    cfg = tmp_path / "merge.yaml"
    models = [
        {"model": str(p), "parameters": {"weight": w}}
        for p, w in zip(fam.fts[:2], [0.7, 0.3], strict=True)
    ]
    models.append({"model": str(fam.fts[2])})  # no weight: 1
    cfg.write_text(
        yaml.safe_dump(
            {"merge_method": "task_arithmetic", "base_model": str(fam.base), "models": models}
        )
    )
    result = analyze(fam.base, fam.fts[:1], merge_config=cfg, progress=False)
    assert result["tasks"] == ["ft0", "ft1", "ft2"]
    merge = result["merge"]
    assert merge["inputs"] == ["ft0", "ft1", "ft2"] and merge["weights"] == [0.7, 0.3, 1.0]
    taus = _taus(fam)
    layout = LayerLayout.infer(list(fam.base_sd))
    w = np.array([0.7, 0.3, 1.0])
    for row in merge["per_layer"]:
        names = [n for n in fam.base_sd if layout.split(n)[0] == row["layer"]]
        x = [np.concatenate([t[n] for n in names]).astype(np.float64) for t in taus]
        conflicts, cosines = [], []
        for a, b in [(0, 1), (0, 2), (1, 2)]:
            both = (np.abs(x[a]) > 1e-8) & (np.abs(x[b]) > 1e-8)
            conflicts.append((both & (np.sign(x[a]) != np.sign(x[b]))).sum() / both.sum())
            cosines.append(x[a] @ x[b] / np.linalg.norm(x[a]) / np.linalg.norm(x[b]))
        assert row["sign_conflict"] == pytest.approx(np.mean(conflicts), rel=1e-12)
        assert row["cosine"] == pytest.approx(np.mean(cosines), rel=1e-9)
        rho = np.linalg.norm(sum(wi * xi for wi, xi in zip(w, x, strict=True))) / sum(
            wi * np.linalg.norm(xi) for wi, xi in zip(w, x, strict=True)
        )
        assert row["norm_retained"] == pytest.approx(rho, rel=1e-9)
    ranked = sorted(merge["per_layer"], key=lambda r: -r["sign_conflict"])
    assert merge["worst_layers"] == [r["layer"] for r in ranked]


def test_saved_task_vectors_are_inputs(llama: Family, tmp_path: Path) -> None:
    """A task vector saved by `taskvec diff` gives the same numbers as its fine-tuned model."""
    import taskvec as tv

    saved = tmp_path / "tau0"
    (tv.load_model(llama.fts[0]) - tv.load_model(llama.base)).save(saved, progress=False)
    from_models = analyze(llama.base, llama.fts[:2], progress=False)
    from_saved = analyze(llama.base, [saved, llama.fts[1]], progress=False)
    np.testing.assert_allclose(from_saved["gram"], from_models["gram"], rtol=1e-12)
    assert from_saved["pairwise"]["top_k"] == from_models["pairwise"]["top_k"]


def test_one_vector_without_layers(tmp_path: Path) -> None:
    """A single task vector of a model with no numbered layers: no pairs, a 1-D PCA, no
    per-layer rows, and the report still renders."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    base = {"w.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(8, generator=g)}
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    out = tmp_path / "report"
    result = analyze(
        tmp_path / "base.safetensors",
        [tmp_path / "ft.safetensors"],
        out,
        spectra_layers=2,
        progress=False,
    )
    tau = np.concatenate([(ft[k] - base[k]).numpy().ravel() for k in base]).astype(np.float64)
    assert result["layers"] == 0 and result["per_layer"]["cosine"] == []
    assert result["per_vector"]["ft"]["norm"] == pytest.approx(np.linalg.norm(tau), rel=1e-12)
    assert result["pca"]["coordinates"]["ft"] == pytest.approx([np.linalg.norm(tau), 0.0])
    assert result["spectra"]["tensors"] == {}
    assert "<img " in (out / "index.html").read_text()


def test_merge_config_alone_with_relative_paths(sparse_family: Family) -> None:
    """With only --merge, its base_model and models are the inputs, found like `taskvec merge`
    finds them: relative to the config file's folder."""
    import yaml

    fam = sparse_family
    cfg = fam.root / "relative.yaml"
    models = [{"model": "ft0"}, {"model": "ft2", "parameters": {"weight": 0.5}}]
    cfg.write_text(
        yaml.safe_dump({"merge_method": "linear", "base_model": str(fam.base), "models": models})
    )
    result = analyze(None, [], merge_config=cfg, fractions=(), progress=False)
    assert result["tasks"] == ["ft0", "ft2"]
    assert result["merge"]["inputs"] == ["ft0", "ft2"] and result["merge"]["weights"] == [1, 0.5]
