"""Attention backends (registered in :mod:`.builtin`): reference, sdpa, natten, xformers, flash-attn."""
