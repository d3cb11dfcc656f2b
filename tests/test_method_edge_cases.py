"""Edge cases where taskvec deliberately does better than failing."""

from __future__ import annotations

import pytest
import torch

from taskvec.errors import NumericError
from taskvec.methods import get_method


def _multislerp(tensors: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    weight = torch.ones(tensors.shape[0], dtype=torch.float64)
    return get_method("multislerp").fn(
        tensors.clone(), base, weight=weight, normalize_weights=True, eps=1e-8
    )


def test_multislerp_of_a_tensor_no_model_changed_is_the_base() -> None:
    base = torch.randn(4, 3)
    assert torch.equal(_multislerp(base.expand(3, 4, 3), base.clone()), base)
    assert torch.equal(_multislerp(torch.zeros(3, 4, 3), None), torch.zeros(4, 3))


def test_multislerp_of_cancelling_directions_is_still_an_error() -> None:
    a = torch.randn(4, 3)
    with pytest.raises(NumericError, match="directions is zero"):
        _multislerp(torch.stack([a, -a, a, -a]), None)
