"""Spherical and element-wise interpolation between models: SLERP and its relatives."""

from __future__ import annotations

import math

import torch

from taskvec.errors import NumericError
from taskvec.methods.params import REQUIRED, Param
from taskvec.methods.registry import merge_method

SHOEMAKE = "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985"


def slerp_coefficients(
    t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float]:
    """(cₐ, c_b) with SLERP(a, b; t) = cₐ a + c_b b over the whole tensors: with Ω the angle
    between a and b, sin((1−t)Ω)/sin Ω and sin(tΩ)/sin Ω; (1 − t, t) when |cos Ω| > threshold."""
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    cos = max(-1.0, min(1.0, float(torch.dot(a.reshape(-1), b.reshape(-1))) / (na * nb)))
    if abs(cos) > dot_threshold:
        return 1 - t, t
    omega = math.acos(cos)
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s


@merge_method(
    "slerp",
    base="required",
    globals={"t": Param(REQUIRED, "[0, 1]")},
    reference=SHOEMAKE,
    min_models=1,
)
def slerp(tensors: torch.Tensor, base: torch.Tensor, *, t: float) -> torch.Tensor:
    """θ = SLERP(θ₀, θ₁; t) over the whole flattened tensor; t = 0 gives the base."""
    if tensors.shape[0] != 1:
        raise NumericError(
            f"slerp takes the base and exactly one other model, got {tensors.shape[0]}"
        )
    ca, cb = slerp_coefficients(float(t), base, tensors[0])
    return base.mul_(ca).add_(tensors[0], alpha=cb)  # the call's own buffer


def _rowwise_slerp(t: float, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SLERP of each row (last axis) of a and b independently."""
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(omega)
    s = torch.where(colinear, torch.ones_like(s), s)
    curved = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / s
    return torch.where(colinear, (1 - t) * a + t * b, curved)


@merge_method(
    "nuslerp",
    base="optional",
    per_model={"weight": Param(REQUIRED, "[0, inf)")},
    globals={"nuslerp_flatten": True, "nuslerp_row_wise": False},
    reference=SHOEMAKE + "; mergekit's nuslerp",
    min_models=2,
)
def nuslerp(
    tensors: torch.Tensor,
    base: torch.Tensor | None,
    *,
    weight: torch.Tensor,
    nuslerp_flatten: bool,
    nuslerp_row_wise: bool,
) -> torch.Tensor:
    """t = w₂/(w₁+w₂); SLERP of the two models (or of their task vectors, added to θ₀),
    over the flattened tensor or row/column-wise."""
    if tensors.shape[0] != 2:
        raise NumericError(
            f"nuslerp takes exactly two models besides the base, got {tensors.shape[0]}"
        )
    total = float(weight.sum())
    t = 0.5 if abs(total) < 1e-6 else float(weight[1]) / total
    a, b = tensors[0], tensors[1]
    if base is not None:
        a, b = a - base, b - base
    if nuslerp_flatten:
        out = _rowwise_slerp(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    elif nuslerp_row_wise and a.dim() > 1:
        out = _rowwise_slerp(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    else:
        out = _rowwise_slerp(t, a, b)
    return out if base is None else base + out


def _unit(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    norms = x.reshape(x.shape[0], -1).norm(dim=1)
    return x.reshape(x.shape[0], -1) / (norms.unsqueeze(1) + eps), norms


@merge_method(
    "multislerp",
    base="optional",
    per_model={"weight": Param(REQUIRED, "[0, inf)")},
    globals={"normalize_weights": True, "eps": Param(1e-8, "(0, inf)")},
    reference="Barycentric interpolation on the hypersphere; mergekit's multislerp",
)
def multislerp(
    tensors: torch.Tensor,
    base: torch.Tensor | None,
    *,
    weight: torch.Tensor,
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    """uᵢ = xᵢ/‖xᵢ‖, m = normalize(Σ wᵢuᵢ), T = Σ wᵢ(uᵢ − (uᵢ·m)m);
    θ = (m cos‖T‖ + T sin‖T‖/‖T‖) · Σ wᵢ‖xᵢ‖  (xᵢ = τᵢ and θ₀ added when a base is given).

    Inputs that are all zero (a tensor no model changed) give zero, where mergekit raises;
    directions that cancel out (a, −a with equal weights) are an error, as in mergekit."""
    if tensors.shape[0] == 1:
        return tensors[0]
    x = tensors - base if base is not None else tensors
    w = (weight / weight.sum() if normalize_weights else weight).to(tensors.dtype)
    units, norms = _unit(x, eps)
    mean = (units * w.unsqueeze(1)).sum(0)
    mean_norm = float(mean.norm())
    if float(norms.max()) < eps:  # nothing moved (e.g. a frozen tensor): θ = θ₀ (or 0)
        return x[0].zero_() if base is None else base
    if mean_norm < eps:
        if x.shape[0] == 2:
            out = x[0] * w[0] + x[1] * w[1]
            return out if base is None else out + base
        raise NumericError("multislerp: the weighted sum of the inputs' directions is zero")
    mean = mean / mean_norm
    tangent = ((units - (units @ mean).unsqueeze(1) * mean) * w.unsqueeze(1)).sum(0)
    tn = float(tangent.norm())
    direction = mean if tn < eps else mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
    out = (direction * float((w * norms).sum())).reshape(tensors.shape[1:])
    return out if base is None else out + base


@merge_method(
    "karcher",
    base="unused",
    globals={"max_iter": Param(10, "[1, inf)", integer=True), "tol": Param(1e-5, "[0, inf)")},
    reference="Karcher, Riemannian center of mass, 1977; mergekit's karcher",
)
def karcher(
    tensors: torch.Tensor, base: torch.Tensor | None, *, max_iter: float, tol: float
) -> torch.Tensor:
    """Riemannian (Karcher) mean of the directions xᵢ/‖xᵢ‖ on the unit sphere (equal weights),
    by fixed-point iteration, rescaled by the mean norm.

    Over the K inputs with ‖xᵢ‖ > tol, uᵢ = xᵢ/‖xᵢ‖ and m₀ = normalize(Σ uᵢ/K); each step takes
    T = Σᵢ (1/K)(θᵢ/sin θᵢ)(uᵢ − cos θᵢ · m), cos θᵢ = m·uᵢ, and m ← cos‖T‖ m + sin‖T‖ T/‖T‖,
    until ‖T‖ < tol or max_iter steps; θ = m · Σᵢ‖xᵢ‖/N over all N inputs.
    karcher has no base role: as in mergekit, a `base_model` that `models` does not list is one
    more input xᵢ."""
    n = tensors.shape[0]
    if n == 1:
        return tensors[0]
    flat = tensors.reshape(n, -1)
    norms = flat.norm(dim=1)
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha = 1.0 / len(valid)
    units = [flat[i] / norms[i] for i in valid]
    mean = sum(alpha * u for u in units)
    mn = float(mean.norm())
    mean = units[0].clone() if mn < tol else mean / mn
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = max(-1.0, min(1.0, float(torch.dot(mean, u))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += alpha * (theta / math.sin(theta)) * (u - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = float(mean.norm())
        if un > tol:
            mean = mean / un
    return (mean * float(norms.mean())).reshape(tensors.shape[1:])


@merge_method(
    "nearswap",
    base="required",
    globals={"t": Param(REQUIRED, "(0, inf)")},
    reference="mergekit's nearswap (Ruphaa's NearSwap)",
    elementwise=True,
)
def nearswap(tensors: torch.Tensor, base: torch.Tensor, *, t: float) -> torch.Tensor:
    """w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1) per element; θ = w θ₁ + (1 − w) θ₀."""
    if tensors.shape[0] != 1:
        raise NumericError(
            f"nearswap takes the base and exactly one other model, got {tensors.shape[0]}"
        )
    other = tensors[0]
    w = (float(t) / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * other + (1 - w) * base
