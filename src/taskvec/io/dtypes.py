"""Mapping between torch dtypes, safetensors dtype codes and user-facing names."""

from __future__ import annotations

import torch

from taskvec.errors import ConfigError

SAFETENSORS_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_OF_DTYPE: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_CODES.items()}

_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "fp8_e5m2": torch.float8_e5m2,
}
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_CHOICES = "float32, float16, bfloat16, float64, float8_e4m3fn, float8_e5m2"


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``None`` stays.

    Only floating-point dtypes are output dtypes: weights cast to an integer type would be
    truncated (to all zeros, for most of them). Non-float tensors (buffers such as
    ``position_ids``) keep their own dtype whatever the output dtype."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        key = str(value).lower().removeprefix("torch.")
        named = _NAMES.get(key, getattr(torch, key, None))
        if not isinstance(named, torch.dtype):
            raise ConfigError(f"unknown dtype {value!r}; use one of {_CHOICES}")
        dtype = named
    if not dtype.is_floating_point or dtype not in CODE_OF_DTYPE:
        raise ConfigError(
            f"dtype {dtype_name(dtype)} is not a floating-point type that checkpoints store "
            f"(weights would be cast to it); use one of {_CHOICES}"
        )
    return dtype


def computable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or for a float8 tensor (which torch has no arithmetic for) the same values
    in float16, which holds every float8_e4m3fn and float8_e5m2 value exactly."""
    return tensor.to(torch.float16) if tensor.dtype in _FLOAT8 else tensor


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
