"""taskvec: merge and edit fine-tuned models through their task vectors, streamed tensor by tensor.

>>> import taskvec as tv
>>> base = tv.load("base")                       # doctest: +SKIP
>>> tau = tv.load("finetuned") - base            # doctest: +SKIP
>>> (base + 0.5 * tau).save("edited")            # doctest: +SKIP
"""

import gc

from taskvec.allocator import keep_freed_memory

keep_freed_memory()  # before torch starts any thread (see its docstring)

# Importing torch creates about a million long-lived objects; the cyclic collector would rescan
# them over and over while they are being built (0.2-0.3 s of every command's start-up).
_collecting = gc.isenabled()
gc.disable()
try:
    from taskvec.algebra import Model, TaskVector, analogy, apply, load, load_model
    from taskvec.errors import TaskvecError
    from taskvec.merge import MergePlan, merge, plan_merge
finally:
    if _collecting:
        gc.enable()

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
