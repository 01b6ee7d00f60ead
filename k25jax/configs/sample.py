"""Optional `config.sample` group for `k25jax.sample.generate` (DESIGN "generation").

Every field has a default here; a config without a `sample` group uses them.
  min_prompt_bucket  prompts are left-padded to the next power of two >= max(prompt length, this), so one
                     compiled program serves every batch whose longest prompt falls in the same bucket
  pad_id             token id written into prompt padding and into the outputs after a sequence stops
  cache_dtype        dtype of the MLA latent cache; "" means the model's compute dtype (`model.dtype`)
  decode_moe_dispatch  MoE dispatch of the decode steps: "auto" (`k25jax.sample.engine.decode_moe_config`:
                     the routed-experts kernel on CPU in float32) or a `model.moe_dispatch` name to force one
  cpu_kernels        decode steps on CPU in float32 use the XLA:CPU kernels of `k25jax.kernels`: absorbed
                     attention over the latent cache, and the routed-experts kernel where decode_moe_dispatch is
                     "auto"; False keeps XLA's own ops
  done_check_every   decode steps between checks that every row has stopped: the check reduces over devices and
                     makes them wait for each other, so it runs once per this many steps; after every row stops
                     at most this many - 1 further steps run (they only write padding)
"""

from __future__ import annotations

import ml_collections

from k25jax.configs.validate import DISPATCHES, DTYPES, ConfigError


def sample_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(min_prompt_bucket=16, pad_id=0, cache_dtype="", decode_moe_dispatch="auto",
                                        cpu_kernels=True, done_check_every=8))


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.sample` merged over the defaults, checked; raises ConfigError naming the field and the fix."""
  s = sample_config()
  given = config.get("sample", None)
  if given is not None:
    unknown = set(given.keys()) - set(s.keys())
    if unknown:
      raise ConfigError(f"config.sample has unknown fields {sorted(unknown)}; known: {sorted(s.keys())}")
    s.update(given)
  if int(s.done_check_every) < 1:
    raise ConfigError(f"sample.done_check_every={s.done_check_every} must be >= 1 (1 checks after every step)")
  if int(s.min_prompt_bucket) < 1:
    raise ConfigError(f"sample.min_prompt_bucket={s.min_prompt_bucket} must be >= 1")
  if not 0 <= int(s.pad_id) < int(config.model.vocab_size):
    raise ConfigError(f"sample.pad_id={s.pad_id} must be a token id in [0, model.vocab_size="
                      f"{config.model.vocab_size})")
  if s.cache_dtype not in ("",) + DTYPES:
    raise ConfigError(f"sample.cache_dtype={s.cache_dtype!r}: choose from {('',) + DTYPES} ('' = model.dtype)")
  if s.decode_moe_dispatch not in DISPATCHES:
    raise ConfigError(f"sample.decode_moe_dispatch={s.decode_moe_dispatch!r}: choose from {DISPATCHES}")
  return s
