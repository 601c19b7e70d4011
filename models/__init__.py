"""Model families and their files: VAR/MVAR, the multi-scale tokenizer, the raster GPT, their adapters of the one engine, checkpoint I/O and the shipped default weights."""
