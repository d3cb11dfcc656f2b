"""Coefficient search: find the values of a merge config's ``{search: ...}`` markers that
maximise an objective on validation data (``taskvec search``)."""

from taskvec.search.errors import SearchError
from taskvec.search.objectives import Candidate
from taskvec.search.run import run_search
from taskvec.search.space import SearchSpace, search_space
from taskvec.search.study import STRATEGIES, SearchSettings

__all__ = [
    "STRATEGIES",
    "Candidate",
    "SearchError",
    "SearchSettings",
    "SearchSpace",
    "run_search",
    "search_space",
]
