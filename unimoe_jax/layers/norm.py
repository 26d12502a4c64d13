"""RMSNorm as LLaMA defines it (statistics in float32, scale applied after casting back)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """`x / sqrt(mean(x^2) + eps) * scale` over the last axis. x: `[..., embed]`."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        'scale',
        nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
        (x.shape[-1],),
        self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    # HF LLaMA casts back to the input dtype before the scale; keep that order for parity.
    return scale.astype(self.dtype) * x32.astype(self.dtype)
