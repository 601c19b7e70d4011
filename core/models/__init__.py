"""Model definitions (for example the VAR/MVAR multi-scale VQ-VAE tokenizer in ``tokenizer``)."""
