"""taskvec: merge and edit fine-tuned models through their task vectors, streamed tensor by tensor.

>>> import taskvec as tv
>>> base = tv.load("base")                       # doctest: +SKIP
>>> tau = tv.load("finetuned") - base            # doctest: +SKIP
>>> (base + 0.5 * tau).save("edited")            # doctest: +SKIP
"""

from taskvec.allocator import keep_freed_memory

keep_freed_memory()  # before torch starts any thread (see its docstring)

from taskvec.algebra import Model, TaskVector, analogy, apply, load, load_model  # noqa: E402
from taskvec.errors import TaskvecError  # noqa: E402
from taskvec.merge import MergePlan, merge, plan_merge  # noqa: E402

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
