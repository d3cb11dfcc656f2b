"""The one error of a coefficient search that is not about its config or objective."""

from __future__ import annotations

from taskvec.errors import TaskvecError


class SearchError(TaskvecError):
    """A search that cannot start or go on (Ray unreachable, a study that exists...)."""
