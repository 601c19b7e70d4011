"""Built-in trajectories, attention patterns and cache policies (registered in :mod:`.builtin`)."""
