"""Merge methods. Importing this package registers every built-in method."""

from taskvec.methods import linear  # noqa: F401  (registers linear, task_arithmetic)
from taskvec.methods.registry import REQUIRED, MergeMethod, all_methods, get_method, merge_method

__all__ = ["REQUIRED", "MergeMethod", "all_methods", "get_method", "merge_method"]
