"""Merge methods. Importing this package registers every built-in method: the per-tensor ones
and the whole-model pipeline ones (:mod:`taskvec.methods.pipeline`)."""

# Importing a module registers its methods.
from taskvec.methods import (  # noqa: F401
    adamerging,
    arcee_fusion,
    consensus,
    emr,
    fda,
    fisher,
    gram_schmidt,
    interpolation,
    linear,
    magmax,
    model_stock,
    passthrough,
    pcb,
    pleas,
    ram,
    regmean,
    regmean_plusplus,
    sce,
    spectral,
    ties_family,
    wudi,
)
from taskvec.methods.pipeline import PipelineMethod
from taskvec.methods.registry import REQUIRED, MergeMethod, all_methods, get_method, merge_method

__all__ = [
    "REQUIRED",
    "MergeMethod",
    "PipelineMethod",
    "all_methods",
    "get_method",
    "merge_method",
]
