"""Benchmarks of an inference server: what to measure (``spec``, pure), how (``runner``),
where results go (``store``), and how the daemon runs them (``service``, ``cli``)."""
