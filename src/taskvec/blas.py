"""Dense matrix products and symmetric eigendecompositions on the faster BLAS at hand.

On the CPU these go to numpy's bundled OpenBLAS rather than torch's MKL. On one core of the
project's AMD EPYC (2048² float operands; ``benchmarks/results/spectral-1b.md``) OpenBLAS is
11–19% faster on general products (float32 127 vs 107 GFLOP/s, float64 60 vs 54), computes a
Gram product ``x @ x.T`` as a symmetric rank-k update (half the work: 0.09 vs 0.16 s in float32,
0.17 vs 0.31 s in float64), and its float64 ``eigh`` takes 1.07 s vs 1.22 s. These functions
take and return torch tensors and hand CPU ones to numpy without copying; tensors on other
devices (CUDA) stay with torch. Results are the same products up to rounding.

numpy's OpenBLAS has its own thread pool: :func:`blas_threads` limits it together with
torch's intra-op threads (the engine runs one thread per worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from threadpoolctl import threadpool_limits


def _on_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and not t.requires_grad for t in tensors)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (2-D, same dtype), into ``out`` when given (C-contiguous on CPU)."""
    if not _on_cpu(a, b):
        return torch.matmul(a, b, out=out)
    if out is None:
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    np.matmul(a.numpy(), b.numpy(), out=out.numpy())
    return out


def addmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha · a @ b`` in place."""
    if not _on_cpu(out, a, b):
        return out.addmm_(a, b, alpha=alpha)
    product = np.matmul(a.numpy(), b.numpy())
    if alpha != 1.0:
        product *= alpha
    np.add(out.numpy(), product, out=out.numpy())
    return out


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ rowsᵀ`` for a few long rows (N × d, N small): on the CPU N(N+1)/2 dot
    products, which beat a matrix product this thin (a 3 × 2²⁰ block: 0.36 ms vs 0.74 ms for
    torch's product)."""
    if not _on_cpu(rows):
        return rows @ rows.mT
    x = rows.numpy()
    n = x.shape[0]
    out = np.empty((n, n), dtype=x.dtype)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = np.dot(x[i], x[j])
    return torch.from_numpy(out)


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric matrix ``a``."""
    if not _on_cpu(a):
        return torch.linalg.eigh(a)
    w, v = np.linalg.eigh(a.numpy())
    return torch.from_numpy(w), torch.from_numpy(v)


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Limit numpy's BLAS (and LAPACK) to ``n`` threads within the block (process-wide)."""
    with threadpool_limits(n, user_api="blas"):
        yield
