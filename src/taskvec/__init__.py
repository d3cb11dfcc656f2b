"""taskvec: merge and edit fine-tuned models through their task vectors, streamed tensor by tensor.

>>> import taskvec as tv
>>> base = tv.load("base")                       # doctest: +SKIP
>>> tau = tv.load("finetuned") - base            # doctest: +SKIP
>>> (base + 0.5 * tau).save("edited")            # doctest: +SKIP
"""

from taskvec.algebra import Model, TaskVector, analogy, apply, load, load_model
from taskvec.errors import TaskvecError
from taskvec.merge import MergePlan, merge, plan_merge

__version__ = "0.1.0"

__all__ = [
    "MergePlan",
    "Model",
    "TaskVector",
    "TaskvecError",
    "analogy",
    "apply",
    "load",
    "load_model",
    "merge",
    "plan_merge",
]
