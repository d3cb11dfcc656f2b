"""Merge methods. Importing this package registers every built-in method."""

# Importing a module registers its methods.
from taskvec.methods import (  # noqa: F401
    arcee_fusion,
    consensus,
    gram_schmidt,
    interpolation,
    linear,
    magmax,
    model_stock,
    passthrough,
    pcb,
    ram,
    sce,
    spectral,
    ties_family,
    wudi,
)
from taskvec.methods.registry import REQUIRED, MergeMethod, all_methods, get_method, merge_method

__all__ = ["REQUIRED", "MergeMethod", "all_methods", "get_method", "merge_method"]
