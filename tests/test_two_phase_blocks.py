"""Model Stock in row blocks: a tensor too large for one block is merged by one job in two
phases (``TensorPass``: every block's Gram share and Σ τᵢ, then every block's rows), reading
each input once, so the chunked merge equals the merge in one piece."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import Family, load_folder

from taskvec.io.checkpoint import open_checkpoint
from taskvec.merge import merge, plan_merge


def _config(fam: Family, filter_wise: bool) -> dict:
    return {
        "merge_method": "model_stock",
        "base_model": str(fam.base),
        "models": [{"model": str(p)} for p in fam.fts],
        "parameters": {"filter_wise": filter_wise},
    }


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_in_row_blocks_equals_one_piece(
    llama: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filter_wise: bool
) -> None:
    cfg = _config(llama, filter_wise)
    merge(cfg, tmp_path / "whole", progress=False, threads=2)
    assert not any(t.blocks for t in plan_merge(cfg).tasks)  # every tiny tensor fits one block
    monkeypatch.setattr("taskvec.engine.CHUNK_ELEMENTS", 64)
    plan = plan_merge(cfg)
    two_phase = {t.name for t in plan.tasks if t.blocks}
    row_jobs = {j.name for j in plan.jobs if j.rows is not None and j.out_shape != j.shape}
    if filter_wise:  # per-row t: plain elementwise row blocks, one job each
        assert not two_phase and row_jobs
        split = row_jobs
    else:  # one job per split tensor, over all its blocks
        assert two_phase and not row_jobs
        assert all(len(t.blocks) > 1 and t.rows is None for t in plan.tasks if t.blocks)
        split = two_phase
    assert not plan.whole_model_pass
    merge(cfg, tmp_path / "blocks", progress=False, threads=2)
    whole, blocks = load_folder(tmp_path / "whole"), load_folder(tmp_path / "blocks")
    assert whole.keys() == blocks.keys()
    for k in whole:
        if filter_wise or k not in split:  # the same arithmetic on the same rows
            assert torch.equal(whole[k], blocks[k]), k
        else:  # t from the blocks' Gram matrices summed in float64: rounding-level only
            torch.testing.assert_close(blocks[k], whole[k], rtol=1e-6, atol=1e-7, msg=k)


def test_two_phases_read_each_input_once(
    llama: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Phase one reads every input's rows once; phase two reads nothing (the base's rows are
    kept as stored)."""
    monkeypatch.setattr("taskvec.engine.CHUNK_ELEMENTS", 64)
    cfg = _config(llama, False)
    plan = plan_merge(cfg)
    task = next(t for t in plan.tasks if t.blocks)
    reads: list[tuple[str, tuple[int, int] | None]] = []
    for ckpt, _ in [*task.inputs, task.base]:
        original = ckpt.read

        def counting(name, rows=None, _original=original, _path=str(ckpt.path)):
            reads.append((_path, rows))
            return _original(name, rows)

        monkeypatch.setattr(ckpt, "read", counting)
    pieces = list(task.run(plan.run))
    assert [start for start, _ in pieces] == [start for start, _ in task.blocks]
    out = torch.cat([rows for _, rows in pieces])
    n_blocks = len(task.blocks)
    base_path = str(task.base[0].path)
    assert len([r for r in reads if r[0] != base_path]) == len(task.inputs) * n_blocks
    assert len([r for r in reads if r[0] == base_path]) == n_blocks
    assert tuple(out.shape) == tuple(open_checkpoint(llama.base).tensors[task.name].shape)
