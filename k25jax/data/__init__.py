"""Input side: tokenizer, media preprocessing, sources, procedural world, mixtures, packing, grain pipeline."""
