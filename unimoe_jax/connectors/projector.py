"""LLaVA's multimodal projector: vision features -> LLM embedding space.

Kinds follow LLaVA's `build_vision_projector` (`mm_projector_type`):
  'linear'        one Linear(in, out_dim)
  'mlp{N}x_gelu'  Linear(in, out_dim), then N-1 times (GELU, Linear(out_dim, out_dim)); the GELU is
                  the exact erf form of torch's `nn.GELU()`.

The Linear at position j of LLaVA's `nn.Sequential` is our Dense `linear_{j}` (j = 0, 2, 4, ...),
so `mm_projector.{j}.weight` maps to `linear_{j}/kernel`; for 'linear' the bare
`mm_projector.weight` maps to `linear_0`.
"""

import re
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimoe_jax import partitioning
from unimoe_jax.config import check_positive
from unimoe_jax.layers.encoder_blocks import Dense, activation

_MLP_KIND = re.compile(r'^mlp(\d+)x_gelu$')


def projector_depth(kind: str) -> int:
  """Number of Linear layers of a projector kind; ValueError for an unknown kind."""
  if kind == 'linear':
    return 1
  match = _MLP_KIND.match(kind) if isinstance(kind, str) else None
  if match and int(match.group(1)) >= 1:
    return int(match.group(1))
  raise ValueError(
      f"Unknown projector kind {kind!r}: expected 'linear' or 'mlp{{N}}x_gelu' "
      f"with N >= 1 (e.g. 'mlp2x_gelu')"
  )


def linear_names(kind: str) -> Tuple[str, ...]:
  """Our Dense names, in order: 'linear_0', 'linear_2', ... (LLaVA's Sequential indices)."""
  return tuple(f'linear_{2 * i}' for i in range(projector_depth(kind)))


class Projector(nn.Module):
  """`[batch, tokens, in] -> [batch, tokens, out_dim]` (in is taken from the input at init).

  Any extra leading axes are kept: `[batch, frames, tokens, in] -> [batch, frames, tokens, out]`.
  """

  kind: str
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    projector_depth(self.kind)  # Fail at construction, not at first call.
    check_positive(self, 'out_dim')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    names = linear_names(self.kind)
    gelu = activation('gelu')
    lead, in_dim = x.shape[:-2], x.shape[-1]
    # Extra leading axes (e.g. video frames, to average after projecting) join the batch.
    x = x.reshape((-1,) + x.shape[-2:])
    for j, name in enumerate(names):
      if j:
        x = gelu(x)
      # Megatron-style, counted from the end: the last Linear splits its input ('mlp') and
      # gives the LLM's 'embed' axis, the one before splits its output, and so on. An axis
      # name may not repeat within one kernel, so even 'linear' is ('mlp', 'embed').
      in_axis, out_axis = ('mlp', 'embed') if (len(names) - 1 - j) % 2 == 0 else ('embed', 'mlp')
      x = Dense(
          (in_dim if j == 0 else self.out_dim,),
          (self.out_dim,),
          (in_axis, out_axis),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=name,
      )(x)
      activation_axis = 'activation_mlp' if out_axis == 'mlp' else 'activation_embed'
      x = partitioning.with_sharding_constraint(
          x, ('activation_batch', 'activation_length', activation_axis)
      )
    return x.reshape(lead + x.shape[1:])
