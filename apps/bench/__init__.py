"""Benchmarks (``mvar-engine bench ...``): attention kernels, training strategies, compressed caches, the
configuration matrix; JSON and a readable table, medians and ratios measured side by side."""
