"""The LLaMA SwiGLU feed-forward block: `wo(silu(wi_0 x) * wi_1 x)`."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from unimoe_jax import partitioning
from unimoe_jax.config import LoRAConfig
from unimoe_jax.layers.lora import LoRADense


class SwiGLU(nn.Module):
  """x: `[batch, length, embed]` -> `[batch, length, embed]`.

  Parameter names follow t5x/flaxformer: wi_0 is LLaMA's gate_proj, wi_1 its up_proj and wo
  its down_proj.
  """

  mlp_dim: int
  lora: Optional[LoRAConfig] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    embed = x.shape[-1]
    dense = lambda name, i, o, axes: LoRADense(  # pylint: disable=g-long-lambda
        (i,), (o,), axes, lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    # The names let the 'projections' remat policy keep these outputs (config.REMAT_SAVED_NAMES).
    gate = checkpoint_name(
        dense('wi_0', embed, self.mlp_dim, ('embed', 'mlp'))(x, deterministic), 'mlp_wi_0'
    )
    up = checkpoint_name(
        dense('wi_1', embed, self.mlp_dim, ('embed', 'mlp'))(x, deterministic), 'mlp_wi_1'
    )
    h = nn.silu(gate) * up
    h = partitioning.with_sharding_constraint(
        h, ('activation_batch', 'activation_length', 'activation_mlp')
    )
    return checkpoint_name(
        dense('wo', self.mlp_dim, embed, ('mlp', 'embed'))(h, deterministic), 'mlp_wo'
    )
