"""Merging models trained from different initialisations (PLeaS, Nasery et al., CVPR 2025,
arXiv 2407.02447): activation matching, partial merging under a width budget, and a layer-wise
least-squares solve of the merged weights."""

from taskvec.pleas.baselines import ensemble_logits, naive_average, permute_average
from taskvec.pleas.matching import match_layers
from taskvec.pleas.solve import pleas_merge
from taskvec.pleas.stack import MLPStack

__all__ = [
    "MLPStack",
    "ensemble_logits",
    "match_layers",
    "naive_average",
    "permute_average",
    "pleas_merge",
]
