"""Benchmark harness: real text-classification experts on MiniLM, merged and scored.

Data comes from package registries (:mod:`~taskvec.bench.sources`), tasks are a registry of
parsers with fixed splits (:mod:`~taskvec.bench.tasks`), and a :class:`~taskvec.bench.config.
BenchConfig` (the ``lite`` and ``full`` presets) says which tasks run and how experts are
trained (:mod:`~taskvec.bench.finetune`) and scored (:mod:`~taskvec.bench.evaluate`).
"""
