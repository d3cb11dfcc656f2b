"""Twin-Merging: a shared merged model plus low-rank exclusive knowledge per task, mixed per
input by a router (Lu et al., Twin-Merging: Dynamic Integration of Modular Expertise in Model
Merging, NeurIPS 2024, arXiv 2406.15479).

:mod:`~taskvec.twin.build` writes a twin folder (θ*, factors, router), :mod:`~taskvec.twin.router`
is the router, :mod:`~taskvec.twin.dynamic` runs θ(x) = θ* + Σₜ wₜ(x) vₜ per input.
"""
