"""FDA — model merging with functional dual anchors (Shi, Wen & Liu 2025, arXiv 2510.21223).

>>> from taskvec.fda import FDA, AnchorSettings, Start           # doctest: +SKIP
>>> fda = FDA("minilm", {"mr": "expert-mr", "spam": "expert-spam"})
>>> fda.construct("anchors", AnchorSettings(init="weight"))     # per block, per expert
>>> fda.adapt("anchors", "merged", Start.parse("task_arithmetic"))

See docs/fda.md for the method, the commands and the benchmark results.
"""

from taskvec.fda.adapt import AdaptSettings, adapt_coefficients, adapt_parameters
from taskvec.fda.anchors import AnchorObjective, AnchorSet, AnchorSettings, construct_block
from taskvec.fda.blocks import Block, BlockModel
from taskvec.fda.pipeline import FDA, Start

__all__ = [
    "FDA",
    "AdaptSettings",
    "AnchorObjective",
    "AnchorSet",
    "AnchorSettings",
    "Block",
    "BlockModel",
    "Start",
    "adapt_coefficients",
    "adapt_parameters",
    "construct_block",
]
