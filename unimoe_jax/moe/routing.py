"""Router rule, auxiliary losses and router statistics. Everything here is float32.

Shapes: `T` tokens (flattened batch × length), `E` experts, `k` experts per token.
`mask` `[T]` is 1 for real tokens and 0 for padding; padding takes no part in the losses or
statistics.
"""

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp


def top_k_routing(logits: jax.Array, k: int) -> Tuple[jax.Array, jax.Array]:
  """The official Uni-MoE rule: top-k of the logits, then a softmax over those k only.

  This equals Mixtral's "softmax over all experts, take the top k, renormalise": with
  p_i = exp(l_i) / Z, the renormalised weight of a selected i is
  p_i / sum_{j in top-k} p_j = exp(l_i) / sum_{j in top-k} exp(l_j), because Z cancels, and the
  top k of p are the top k of l because softmax is monotone.

  Args:
    logits: `[T, E]` float32 router logits.
    k: experts per token.
  Returns:
    weights `[T, k]` float32 summing to 1 per token; indices `[T, k]` int32, best first.
  """
  top_logits, indices = jax.lax.top_k(logits, k)
  return jax.nn.softmax(top_logits, axis=-1), indices.astype(jnp.int32)


def _masked_mean(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Mean over the leading (token) axis, counting only tokens with mask 1."""
  if mask is None:
    return jnp.mean(x, axis=0)
  m = mask.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.sum(x * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)


def expert_fraction(indices: jax.Array, num_experts: int,
                    mask: Optional[jax.Array] = None) -> jax.Array:
  """`[E]`: the fraction of (token, choice) assignments that go to each expert; sums to 1."""
  assignments = jax.nn.one_hot(indices, num_experts, dtype=jnp.float32).mean(axis=1)  # [T, E]
  return _masked_mean(assignments, mask)


def load_balance_loss(probs: jax.Array, indices: jax.Array,
                      mask: Optional[jax.Array] = None) -> jax.Array:
  """Switch Transformer load-balancing loss, `E * sum_e f_e * P_e`.

  f_e is `expert_fraction` (assignments, normalised over the k choices) and P_e the mean router
  probability of expert e. It is 1 for perfectly uniform routing whatever k is; Hugging Face's
  Mixtral `load_balancing_loss_func` computes k times this value.

  Args:
    probs: `[T, E]` softmax over all experts' logits.
    indices: `[T, k]` selected experts.
  """
  num_experts = probs.shape[-1]
  f = expert_fraction(indices, num_experts, mask)
  p = _masked_mean(probs, mask)
  return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
  return _masked_mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)), mask)


def router_entropy(probs: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean per-token entropy (nats) of the full router distribution."""
  ent = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  return _masked_mean(ent, mask)


def drop_fraction(kept: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """Fraction of (token, choice) assignments that were not computed. kept: `[T, k]` bool."""
  return _masked_mean(jnp.logical_not(kept).astype(jnp.float32).mean(axis=-1), mask)


def router_aux(logits: jax.Array, indices: jax.Array, kept: jax.Array,
               mask: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
  """All losses and statistics of one MoE layer, as a flat dict of float32 arrays."""
  probs = jax.nn.softmax(logits, axis=-1)
  return {
      'load_balance_loss': load_balance_loss(probs, indices, mask),
      'router_z_loss': router_z_loss(logits, mask),
      'expert_fraction': expert_fraction(indices, logits.shape[-1], mask),
      'drop_fraction': drop_fraction(kept, mask),
      'router_entropy': router_entropy(probs, mask),
  }
