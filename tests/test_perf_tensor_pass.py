"""Model Stock in row blocks: the per-tensor first pass (``tensor_pass``) gives every block of a
large tensor the whole tensor's ratio t, so the chunked merge equals the merge in one piece."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import Family, load_folder

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
    assert not plan_merge(cfg).whole_model_pass  # every tiny tensor fits in one block
    monkeypatch.setattr("taskvec.engine.CHUNK_ELEMENTS", 64)
    plan = plan_merge(cfg)
    split = {j.name for j in plan.jobs if j.rows is not None and j.out_shape != j.shape}
    assert split, "the small chunk size should split some tensors"
    assert plan.whole_model_pass == (not filter_wise)  # per-row t needs no first pass
    ran = merge(cfg, tmp_path / "blocks", progress=False, threads=2)
    assert set(ran.run.per_tensor) == (set() if filter_wise else split)
    whole, blocks = load_folder(tmp_path / "whole"), load_folder(tmp_path / "blocks")
    assert whole.keys() == blocks.keys()
    for k in whole:
        if filter_wise or k not in split:  # the same arithmetic on the same rows
            assert torch.equal(whole[k], blocks[k]), k
        else:  # t from the blocks' Gram matrices summed in float64: rounding-level only
            torch.testing.assert_close(blocks[k], whole[k], rtol=1e-6, atol=1e-7, msg=k)
