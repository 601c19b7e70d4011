"""The applications over the engine: the CLI, the pipeline and its configuration, benchmarks, training,
evaluation and head profiling."""
