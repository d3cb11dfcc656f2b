"""Benchmark harness: real text-classification experts on MiniLM, merged and scored.

Data comes from package registries (:mod:`~taskvec.bench.sources`), tasks are a registry of
parsers with fixed splits (:mod:`~taskvec.bench.tasks`), and a :class:`~taskvec.bench.config.
BenchConfig` (the ``lite`` and ``full`` presets) says which tasks run and how experts are
trained (:mod:`~taskvec.bench.finetune`) and scored (:mod:`~taskvec.bench.evaluate`).
:mod:`~taskvec.bench.build` builds and checks a benchmark, :class:`~taskvec.bench.harness.Bench`
merges and scores any config, :mod:`~taskvec.bench.sweeps` holds the method sweeps and the
negation study, :mod:`~taskvec.bench.suite` runs them and :mod:`~taskvec.bench.results` writes
the JSON, Markdown and PNG. ``taskvec bench`` (:mod:`~taskvec.bench.cli`) and ``taskvec demo``
are the command lines.
"""
