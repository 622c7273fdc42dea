"""The engine's mechanism: the step (schedule, execute, complete), the KV pool, the models
it runs, benchmark workloads and step metrics."""
