"""Generation engine with MLA's compressed latent cache (DESIGN "generation"; digest §1.1)."""

from k25jax.sample.cache import absorbed_attention, cache_sharding, init_cache, latent_width
from k25jax.sample.engine import (DecodeWeights, bucket_length, filter_logits, forward_with_cache, generate,
                                  logits_from_hidden, prepare_decode, sample_tokens)

__all__ = ["DecodeWeights", "absorbed_attention", "bucket_length", "cache_sharding", "filter_logits",
           "forward_with_cache", "generate", "init_cache", "latent_width", "logits_from_hidden", "prepare_decode",
           "sample_tokens"]
