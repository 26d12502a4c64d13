"""Multi-head / grouped-query self-attention with rotary positions and packed-segment masks."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from unimoe_jax import partitioning
from unimoe_jax.config import LoRAConfig
from unimoe_jax.layers.lora import LoRADense, lora_targets


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Applies RoPE in the 'rotate half' layout used by LLaMA checkpoints on Hugging Face.

  Args:
    x: `[batch, length, heads, head_dim]`.
    positions: `[batch, length]` integer positions (restart at 0 for each packed segment).
    theta: the base frequency.
  Returns:
    `[batch, length, heads, head_dim]` in x's dtype. Angles are computed in float32.
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return x * cos + rotated * sin


def causal_segment_mask(length: int, segment_ids: Optional[jax.Array]) -> jax.Array:
  """Boolean `[batch or 1, 1, length, length]` mask: causal, and within one packed segment.

  Tokens of different segments never see each other. Padding (segment 0) only sees padding,
  which keeps every row of the softmax non-empty (no NaNs) while nothing reads those rows.
  """
  causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None, None]
  if segment_ids is None:
    return causal
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return causal & same


# Logical axes of the key/value cache `[batch, max_length, kv_heads, head_dim]`.
CACHE_AXES = ('cache_batch', 'cache_length', 'cache_kv_heads', 'cache_head_dim')


class Attention(nn.Module):
  """Self-attention. x: `[batch, length, embed]` -> `[batch, length, embed]`.

  `num_kv_heads < num_heads` gives grouped-query attention; query heads share key/value heads
  in contiguous groups, as in LLaMA-2/Mistral checkpoints.

  Key/value cache (flax collection 'cache', flaxformer names): `cached_key`, `cached_value`
  `[batch, max_length, kv_heads, head_dim]` in the compute dtype and `cache_index` `[batch]`
  int32, the next position of each row. `prefill=True` writes the keys/values of a whole
  (right-padded) prompt at positions `[0, length)` and sets `cache_index` to `prefill_lengths`
  (default `length`); entries at or past a row's index are stale and masked out.
  `decode=True` takes one token per row (`x` `[batch, 1, embed]`) at position `cache_index`,
  ignores `positions`/`mask`, attends to the cache up to and including that position and
  advances the index. Without a cache yet (inside `init`), the cache is created with
  `max_length = max_decode_length` (default: the input length).
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  lora: Optional[LoRAConfig] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      positions: Optional[jax.Array],
      mask: Optional[jax.Array],
      deterministic: bool = True,
      decode: bool = False,
      prefill: bool = False,
      prefill_lengths: Optional[jax.Array] = None,
      max_decode_length: Optional[int] = None,
  ) -> jax.Array:
    """positions: `[batch, length]`; mask: boolean, broadcastable to `[batch, 1, q, k]`;
    prefill_lengths: `[batch]` int (prefill only)."""
    if decode and prefill:
      raise ValueError('Attention: decode and prefill are exclusive phases')
    embed = x.shape[-1]
    batch, length = x.shape[:2]
    if decode:
      if length != 1:
        raise ValueError(f'Attention: decode takes one token per row, got length {length}')
      cache = self._cache(batch, max_decode_length or length)
      index = cache['cache_index'].value
      positions = index[:, None]

    def proj(name, in_shape, out_shape, axes):
      return LoRADense(
          in_shape,
          out_shape,
          axes,
          lora=lora_targets(self.lora, name),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=name,
      )

    # The names let the 'projections' remat policy keep these outputs (config.REMAT_SAVED_NAMES).
    q = checkpoint_name(
        proj('query', (embed,), (self.num_heads, self.head_dim), ('embed', 'heads', 'head_dim'))(
            x, deterministic
        ),
        'query_proj',
    )
    k = checkpoint_name(
        proj(
            'key', (embed,), (self.num_kv_heads, self.head_dim), ('embed', 'kv_heads', 'head_dim')
        )(x, deterministic),
        'key_proj',
    )
    v = checkpoint_name(
        proj(
            'value', (embed,), (self.num_kv_heads, self.head_dim), ('embed', 'kv_heads', 'head_dim')
        )(x, deterministic),
        'value_proj',
    )
    q = rotary_embedding(q, positions, self.rope_theta)
    k = rotary_embedding(k, positions, self.rope_theta)
    if prefill:
      cache = self._cache(batch, max_decode_length or length)
      if cache['cached_key'].value.shape[1] < length:
        raise ValueError(
            f'Attention: prefill of {length} tokens does not fit a cache of '
            f'{cache["cached_key"].value.shape[1]}'
        )
      for name, new in (('cached_key', k), ('cached_value', v)):
        cache[name].value = jax.lax.dynamic_update_slice(
            cache[name].value, new.astype(self.dtype), (0, 0, 0, 0)
        )
      lengths = (
          jnp.full((batch,), length, jnp.int32)
          if prefill_lengths is None
          else prefill_lengths.astype(jnp.int32)
      )
      cache['cache_index'].value = lengths
    elif decode:
      rows = jnp.arange(batch)
      # Out-of-range indices (rows kept running after their buffer ended) are dropped.
      k = cache['cached_key'].value.at[rows, index].set(k[:, 0].astype(self.dtype), mode='drop')
      v = cache['cached_value'].value.at[rows, index].set(v[:, 0].astype(self.dtype), mode='drop')
      cache['cached_key'].value, cache['cached_value'].value = k, v
      cache['cache_index'].value = index + 1
      mask = (jnp.arange(k.shape[1])[None, :] <= index[:, None])[:, None, None, :]
    q = partitioning.with_sharding_constraint(q, partitioning.HEAD_AXES)
    k, v = (partitioning.with_sharding_constraint(t, partitioning.KV_HEAD_AXES) for t in (k, v))
    # Logits and softmax run in float32 inside dot_product_attention for bf16 inputs too.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    out = partitioning.with_sharding_constraint(out, partitioning.HEAD_AXES)
    return checkpoint_name(
        proj('out', (self.num_heads, self.head_dim), (embed,), ('heads', 'head_dim', 'embed'))(
            out, deterministic
        ),
        'attention_out',
    )

  def _cache(self, batch: int, max_length: int):
    shape = (batch, max_length, self.num_kv_heads, self.head_dim)
    init = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
    return {
        'cached_key': self.variable('cache', 'cached_key', init, shape, self.dtype),
        'cached_value': self.variable('cache', 'cached_value', init, shape, self.dtype),
        'cache_index': self.variable(
            'cache',
            'cache_index',
            nn.with_logical_partitioning(jnp.zeros, ('cache_batch',)),
            (batch,),
            jnp.int32,
        ),
    }
