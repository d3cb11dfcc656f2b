"""The task-vector store: records, blobs, equip, export/import, concurrency, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from conftest import Family, load_folder, run_cli
from test_foundation_errors import one_error_line

import taskvec as tv
from taskvec.errors import CheckpointError, IncompatibleError
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.fingerprint import content_fingerprint
from taskvec.store.blobs import blob_path
from taskvec.store.store import Store


@pytest.fixture(scope="module")
def taus(llama: Family, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The llama fine-tunes' task vectors saved with ``taskvec diff``."""
    root = tmp_path_factory.mktemp("taus")
    out = []
    for i, ft in enumerate(llama.fts):
        tau = tv.load_model(ft) - tv.load_model(llama.base)
        out.append(tau.save(root / f"tau{i}", progress=False))
    return out


def _tau_sd(llama: Family, i: int) -> dict[str, torch.Tensor]:
    return {k: llama.ft_sds[i][k] - v for k, v in llama.base_sd.items() if v.is_floating_point()}


def _corrupt(path: Path, at: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_add_records_the_vector_and_reads_it_back_exactly(
    llama: Family, taus: list[Path], tmp_path: Path
) -> None:
    store = Store(tmp_path / "s", create=True)
    rec = store.add("math", taus[0], codec="exact", tags=["a", "b"], description="d", licence="mit")
    want = _tau_sd(llama, 0)
    assert rec.base_fingerprint == content_fingerprint(open_checkpoint(llama.base))
    assert rec.base_header is None  # no --base given: no header hash to pre-check
    assert {t.name for t in rec.tensors} == set(want)
    for t in rec.tensors:
        assert t.shape == tuple(want[t.name].shape) and t.dtype == "float32" and t.rel_error == 0
        assert t.norm == pytest.approx(float(want[t.name].double().norm()), rel=1e-5)
    again = store.get("math")
    assert again.to_json() == rec.to_json()
    assert again.provenance["licence"] == "mit" and again.provenance["source"] == str(taus[0])
    got = store.vector("math").state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
    assert store.vector("math").norm() == pytest.approx(rec.norm, rel=1e-6)


def test_add_from_a_finetuned_model_and_its_base(llama: Family, tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    rec = store.add("ft1", llama.fts[1], base=llama.base, codec="int8")
    assert rec.base_header is not None and rec.base_header.startswith("h1:")
    want = _tau_sd(llama, 1)
    got = store.vector("ft1").state_dict()
    for t in rec.tensors:  # the recorded error is the error of what is read back
        err = float((got[t.name] - want[t.name]).double().norm())
        assert err == pytest.approx(t.rel_error * t.norm, rel=1e-4, abs=1e-9)
        assert 0 < t.rel_error < 0.01


def test_lazy_vector_in_the_algebra(llama: Family, taus: list[Path], tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    store.add("a", taus[0])
    model = tv.load_model(llama.base) + 0.5 * store.vector("a")
    sd = model.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    want = llama.base_sd[name] + 0.5 * (llama.ft_sds[0][name] - llama.base_sd[name])
    torch.testing.assert_close(sd[name], want, rtol=0, atol=1e-6)


def test_equip_task_arithmetic_is_base_plus_weighted_vectors(
    llama: Family, taus: list[Path], tmp_path: Path
) -> None:
    store = Store(tmp_path / "s", create=True)
    store.add("a", taus[0])
    store.add("b", taus[1])
    out = tmp_path / "out"
    res = run_cli("store", "equip", llama.base, "a:0.3", "b:0.7", "-o", out, "--store",
                  store.root, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    got = load_folder(out)
    for k, v in llama.base_sd.items():
        if v.is_floating_point():
            want = v + 0.3 * (llama.ft_sds[0][k] - v) + 0.7 * (llama.ft_sds[1][k] - v)
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)


def test_equip_int8_stays_within_half_a_step(llama: Family, taus: list[Path], tmp_path: Path):
    store = Store(tmp_path / "s", create=True)
    store.add("a", taus[0], codec="int8/g64/absmax")
    out = tv.load_model(llama.base)
    from taskvec.store.equip import equip

    equip(store, llama.base, [("a", 1.0)], tmp_path / "out", progress=False)
    got = load_folder(tmp_path / "out")
    name = "model.layers.1.self_attn.q_proj.weight"
    tau = (llama.ft_sds[0][name] - llama.base_sd[name]).reshape(-1).numpy()
    groups = np.concatenate([tau, np.zeros(-tau.size % 64, np.float32)]).reshape(-1, 64)
    half_step = np.repeat(np.abs(groups).max(1) / 127 / 2, 64)[: tau.size]
    err = np.abs(got[name].numpy().reshape(-1) - (llama.base_sd[name].numpy().reshape(-1) + tau))
    assert np.all(err <= half_step + 1e-6)
    assert out.fingerprint()  # the base is untouched and still readable


def test_equip_with_ties_equals_merging_the_models(
    llama: Family, taus: list[Path], tmp_path: Path
) -> None:
    store = Store(tmp_path / "s", create=True)
    for i in range(2):
        store.add(f"t{i}", taus[i])
    from taskvec.store.equip import equip

    params = {"density": 0.5}
    equip(store, llama.base, [("t0", 1.0), ("t1", 0.5)], tmp_path / "eq", method="ties",
          parameters=params, progress=False)  # fmt: skip
    config = {
        "merge_method": "ties",
        "base_model": str(llama.base),
        "models": [
            {"model": str(llama.fts[0]), "parameters": {"weight": 1.0}},
            {"model": str(llama.fts[1]), "parameters": {"weight": 0.5}},
        ],
        "parameters": params,
    }
    tv.merge(config, tmp_path / "ref", progress=False)
    got, want = load_folder(tmp_path / "eq"), load_folder(tmp_path / "ref")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_merge_config_takes_store_references(
    llama: Family, taus: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "s", create=True)
    store.add("a", taus[0])
    monkeypatch.setenv("TASKVEC_STORE", str(store.root))
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [{"model": "store:a", "parameters": {"weight": 0.5}}],
    }
    tv.merge(config, tmp_path / "out", progress=False)
    name = "lm_head.weight"
    want = llama.base_sd[name] + 0.5 * (llama.ft_sds[0][name] - llama.base_sd[name])
    torch.testing.assert_close(load_folder(tmp_path / "out")[name], want, rtol=0, atol=1e-6)


def test_equip_refuses_another_base_before_reading_weights(
    llama: Family, bert: Family, taus: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "s", create=True)
    rec = store.add("a", llama.fts[0], base=llama.base)
    out = tmp_path / "out"

    def no_hashing(*_: object) -> str:
        raise AssertionError("a blob or a base was hashed")

    monkeypatch.setattr("taskvec.store.blobs.file_sha256", no_hashing)
    monkeypatch.setattr("taskvec.store.blobs.file_checksum", no_hashing)
    monkeypatch.setattr("taskvec.store.equip.content_fingerprint", no_hashing)
    res = run_cli("store", "equip", bert.base, "a", "-o", out, "--store", store.root)
    line = one_error_line(res, rec.base_fingerprint, rec.base_header, "h1:", str(bert.base))
    assert not out.exists() and "header" in line
    monkeypatch.undo()
    other = llama.fts[1]  # same tensors as the base, other content: the content check refuses
    res = run_cli("store", "equip", other, "a", "-o", out, "--store", store.root)
    have = content_fingerprint(open_checkpoint(other))
    one_error_line(res, rec.base_fingerprint, have)
    assert not out.exists()


def test_a_corrupt_blob_is_named_and_never_used(
    llama: Family, taus: list[Path], tmp_path: Path
) -> None:
    store = Store(tmp_path / "s", create=True)
    rec = store.add("a", taus[0], codec="int4")
    assert (
        rec.blob_checksum
        == xxhash.xxh3_128(blob_path(store.blobs, rec.blob).read_bytes()).hexdigest()
    )
    path = blob_path(store.blobs, rec.blob)
    _corrupt(path)
    with pytest.raises(CheckpointError, match="corrupt \\(xxh3-128"):
        store.vector("a")
    rec.blob_checksum = None  # a record without a checksum: its sha256 is checked
    store.catalogue.insert(rec, replace=True)
    with pytest.raises(CheckpointError, match="corrupt \\(sha256"):
        store.vector("a")
    out = tmp_path / "out"
    res = run_cli("store", "equip", llama.base, "a", "-o", out, "--store", store.root)
    one_error_line(res, str(path), "corrupt")
    assert not out.exists()


def test_export_and_import_move_vectors(llama: Family, taus: list[Path], tmp_path: Path) -> None:
    src = Store(tmp_path / "src", create=True)
    src.add("a", taus[0], codec="int4", scores={"sst2": 0.9})
    src.add("b", taus[1], codec="topk/0.2")
    bundle = tmp_path / "x.tvbundle"
    assert run_cli("store", "export", "a", "b", "-o", bundle, "--store", src.root).exit_code == 0
    dst = Store(tmp_path / "dst", create=True)
    res = run_cli("store", "import", bundle, "--store", dst.root)
    assert res.exit_code == 0, res.output
    for name in ("a", "b"):
        assert dst.get(name).to_json() == src.get(name).to_json()  # checksums taken again
        a, b = src.vector(name).state_dict(), dst.vector(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    res = run_cli("store", "import", bundle, "--store", dst.root)  # names taken
    one_error_line(res, "'a'", "--replace")
    with tarfile.open(bundle) as tar:
        blob = next(m for m in tar.getmembers() if m.name.startswith("blobs/"))
    _corrupt(bundle, blob.offset_data + blob.size // 2)  # refused, nothing recorded
    fresh = Store(tmp_path / "fresh", create=True)
    res = run_cli("store", "import", bundle, "--store", fresh.root)
    one_error_line(res, "corrupt")
    assert fresh.names() == []


def test_rm_and_gc_free_only_unused_blobs(taus: list[Path], tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    a = store.add("a", taus[0], codec="int8")
    store.add("same", taus[0], codec="int8")  # the same content: one blob
    b = store.add("b", taus[1], codec="int8")
    assert a.blob == store.get("same").blob != b.blob
    store.remove("a")
    assert store.gc() == (0, 0) and store.vector("same").names
    store.remove("same")
    count, freed = store.gc()
    assert count == 1 and freed == a.blob_bytes
    assert not blob_path(store.blobs, a.blob).exists() and blob_path(store.blobs, b.blob).exists()


_ADD = """
import sys
import tarfile
from taskvec.store.store import Store
Store(sys.argv[1]).add(sys.argv[2], sys.argv[3], codec="int4")
"""


def test_two_processes_add_at_once(taus: list[Path], tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ADD, str(store.root), name, str(tau)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, tau in [("p", taus[0]), ("q", taus[1]), ("p", taus[2])]
    ]
    errors = [p.communicate()[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes[1] == 0, errors[1]
    assert sorted(codes[::2]) == [0, 1]  # the name "p" is taken once
    assert "already holds a vector named 'p'" in "".join(errors)
    assert store.names() == ["p", "q"]
    for name in ("p", "q"):
        assert len(store.vector(name).state_dict()) == len(store.get(name).tensors)


def test_cli_list_show_and_errors(taus: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "s"
    assert run_cli("store", "init", "--store", root).exit_code == 0
    res = run_cli("store", "add", "m", taus[0], "--codec", "int4", "--group-size", "64",
                  "--tag", "math", "--store", root)  # fmt: skip
    assert res.exit_code == 0 and "int4/g64/absmax" in res.output, res.output
    res = run_cli("store", "list", "--store", root)
    assert res.output.startswith("m\tint4/g64/absmax")
    assert run_cli("store", "list", "--tag", "none", "--store", root).output == ""
    res = run_cli("store", "show", "m", "--json", "--store", root)
    assert json.loads(res.output)["tags"] == ["math"]
    res = run_cli("store", "show", "m", "--tensors", "--store", root)
    assert "lm_head.weight" in res.output
    one_error_line(run_cli("store", "show", "x", "--store", root), "'x'", "it holds: m")
    one_error_line(run_cli("store", "add", "m", taus[1], "--store", root), "already holds")
    one_error_line(run_cli("store", "add", "n", taus[1], "--codec", "int9", "--store", root),
                   "unknown codec")  # fmt: skip
    for score, needle in (("x=nan", "finite"), ("x=high", "not a number")):
        res = run_cli("store", "add", "s", taus[1], "--score", score, "--store", root)
        one_error_line(res, needle)
    one_error_line(run_cli("store", "list", "--store", tmp_path / "none"), "no task-vector store")
    assert run_cli("store", "rm", "m", "--store", root).exit_code == 0
    assert Store(root).names() == []


def test_a_task_vector_of_another_base_is_refused_at_add(
    llama: Family, bert: Family, taus: list[Path], tmp_path: Path
) -> None:
    store = Store(tmp_path / "s", create=True)
    with pytest.raises(IncompatibleError):
        store.add("a", taus[0], base=llama.fts[2])
    assert store.names() == []


def _absmax(x: np.ndarray, bits: int, group: int = 128) -> np.ndarray:
    """Per-group absmax quantisation of ``x`` (float32), re-derived in numpy."""
    flat = x.reshape(-1)
    g = np.concatenate([flat, np.zeros(-flat.size % group, np.float32)]).reshape(-1, group)
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(g).max(1, keepdims=True) / np.float32(levels)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.round(g / safe), -levels, levels) * scale
    return q.reshape(-1)[: flat.size].reshape(x.shape)


def _minmax(x: np.ndarray, bits: int, group: int = 128) -> np.ndarray:
    """Per-group min-max quantisation of ``x`` (float32), re-derived in numpy."""
    flat = x.reshape(-1)
    g = np.concatenate([flat, np.zeros(-flat.size % group, np.float32)]).reshape(-1, group)
    lo = g.min(1, keepdims=True)
    scale = (g.max(1, keepdims=True) - lo) / np.float32(2**bits - 1)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = lo + np.clip(np.round((g - lo) / safe), 0, 2**bits - 1) * scale
    return q.reshape(-1)[: flat.size].reshape(x.shape)


def test_rtvq_members_decode_as_shared_base_plus_offset(
    llama: Family, taus: list[Path], tmp_path: Path
) -> None:
    store = Store(tmp_path / "s", create=True)
    res = run_cli("store", "add-rtvq", "shared", *[f"t{i}={t}" for i, t in enumerate(taus)],
                  "--store", store.root)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert store.get("t1").residual_of == "shared"
    name = "model.layers.0.mlp.gate_proj.weight"
    tau = [(ft[name] - llama.base_sd[name]).numpy() for ft in llama.ft_sds]
    mean = tau[0] * np.float32(1 / 3) + tau[1] * np.float32(1 / 3) + tau[2] * np.float32(1 / 3)
    shared = _absmax(mean, 3)
    want = shared + _minmax(tau[1] - shared, 2)  # offsets: 2-bit min-max by default
    got = store.vector("t1").tensor(name).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    rec = next(t for t in store.get("t1").tensors if t.name == name)
    err = np.linalg.norm(got - tau[1]) / np.linalg.norm(tau[1])
    assert rec.rel_error == pytest.approx(err, rel=1e-4)
    one_error_line(run_cli("store", "rm", "shared", "--store", store.root), "shared base of")
    bundle = tmp_path / "b.tvbundle"
    assert run_cli("store", "export", "t2", "-o", bundle, "--store", store.root).exit_code == 0
    other = Store(tmp_path / "o", create=True)
    assert run_cli("store", "import", bundle, "--store", other.root).exit_code == 0
    assert other.names() == ["shared", "t2"]
    assert torch.equal(other.vector("t2").tensor(name), store.vector("t2").tensor(name))


def test_a_statistics_artefact_comes_back_as_it_went_in(taus: list[Path], tmp_path: Path):
    stats = tmp_path / "stats"
    (stats / "sub").mkdir(parents=True)
    (stats / "grams.safetensors").write_bytes(b"\x01\x02" * 100)
    (stats / "sub" / "meta.json").write_text('{"examples": 4}')
    store = Store(tmp_path / "s", create=True)
    rec = store.add("a", taus[0], statistics=stats)
    assert set(rec.artefacts) == {"statistics"}
    out = tmp_path / "back"
    res = run_cli("store", "artefact", "a", "statistics", "-o", out, "--store", store.root)
    assert res.exit_code == 0, res.output
    for f in ("grams.safetensors", "sub/meta.json"):
        assert (out / f).read_bytes() == (stats / f).read_bytes()
    one_error_line(run_cli("store", "artefact", "a", "fisher", "-o", tmp_path / "x",
                           "--store", store.root), "no 'fisher' artefact")  # fmt: skip
    store.remove("a")
    assert store.gc()[0] == 2  # the vector's blob and the artefact's


@pytest.mark.parametrize(
    "codec", ["exact", "int4/g64/minmax", "int3", "topk/0.2", "dare/0.5/s1", "lowrank/r4", "sign"]
)
def test_row_blocks_read_from_the_blob_match_whole_tensors(
    taus: list[Path], tmp_path: Path, codec: str
) -> None:
    store = Store(tmp_path / "s", create=True)
    store.add("a", taus[0], codec=codec)
    ckpt = store.checkpoint("a")
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        whole = ckpt.read(name)
        for rows in [(0, 1), (3, 17), (5, whole.shape[0])]:
            torch.testing.assert_close(ckpt.read(name, rows), whole[rows[0] : rows[1]],
                                       rtol=1e-5, atol=1e-9)  # fmt: skip


def test_more_one_line_errors(llama: Family, taus: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "s"
    res = run_cli("store", "add", "m", llama.fts[0], "--store", root)
    one_error_line(res, "a model, not a task vector", "--base")
    junk = tmp_path / "junk.tvbundle"
    junk.write_bytes(b"not a tar file at all" * 40)
    one_error_line(run_cli("store", "import", junk, "--store", root), "not a taskvec store bundle")
    res = run_cli("store", "equip", llama.base, "nope", "-o", tmp_path / "o", "--store", root)
    one_error_line(res, "no vector 'nope'")
    res = run_cli("store", "add", "m", taus[0], "--codec", "int4", "--minmax", "--group-size",
                  "12", "--store", root)  # fmt: skip
    one_error_line(res, "multiple of 8")
    assert Store(root).names() == [] and not (tmp_path / "o").exists()


def test_a_catalogue_from_a_newer_taskvec_is_refused(tmp_path: Path) -> None:
    import sqlite3

    store = Store(tmp_path / "s", create=True)
    with sqlite3.connect(store.root / "catalogue.sqlite") as db:
        db.execute("PRAGMA user_version = 99")
    one_error_line(run_cli("store", "list", "--store", store.root), "version 99", "newer taskvec")


def test_a_task_vector_with_nan_is_refused_and_leaves_nothing_behind(
    taus: list[Path], tmp_path: Path
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in taus[0].iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
            continue
        with safe_open(f, "pt") as src:
            meta = src.metadata()
            tensors = {k: src.get_tensor(k) for k in src.keys()}  # noqa: SIM118
        name = sorted(tensors)[-1]
        tensors[name].view(-1)[0] = float("nan")
        save_file(tensors, bad / f.name, metadata=meta)
    root = tmp_path / "s"
    store = Store(root, create=True)
    for codec in ("int4", "exact"):
        one_error_line(run_cli("store", "add", "x", bad, "--codec", codec, "--store", root),
                       "NaN or infinite")  # fmt: skip
    assert store.names() == []
    assert not list((root / "scratch").glob("*")) and not list((root / "blobs").rglob("*.*"))


def test_import_takes_the_checksums_again_rather_than_trusting_the_bundle(
    taus: list[Path], tmp_path: Path
) -> None:
    import io

    src = Store(tmp_path / "src", create=True)
    want = src.add("a", taus[0], codec="int4").blob_checksum
    bundle, forged = tmp_path / "x.tvbundle", tmp_path / "forged.tvbundle"
    assert run_cli("store", "export", "a", "-o", bundle, "--store", src.root).exit_code == 0
    with tarfile.open(bundle) as tar, tarfile.open(forged, "w") as out:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "records.json":
                records = json.loads(data)
                records[0]["blob_checksum"] = "0" * 32
                data = json.dumps(records).encode()
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    dst = Store(tmp_path / "dst", create=True)
    assert run_cli("store", "import", forged, "--store", dst.root).exit_code == 0
    assert dst.get("a").blob_checksum == want
    dst.vector("a")  # opens: the checksum taken here matches
