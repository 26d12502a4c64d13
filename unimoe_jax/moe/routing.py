"""Router rules, auxiliary losses and router statistics. Everything here is float32 (the
router logits may come in another `MoEConfig.router_dtype`; weights are computed in float32).

Two rules: `top_k_routing` (the official 4-expert `MoeLayer`, = Mixtral) and
`top2_sampled_routing` (DeepSpeed `top2gating` with `top2_2nd_expert_sampling`, the official
8-expert model), whose Gumbel noise comes from `gumbel_noise` (an rng key) or
`content_gumbel_noise` (hashed from the logits, when no key is at hand).

Shapes: `T` tokens (flattened batch × length), `E` experts, `k` experts per token.
`mask` `[T]` is 1 for real tokens and 0 for padding; padding takes no part in the losses or
statistics.
"""

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from unimoe_jax.config import LOAD_BALANCE_LOSS_FORMS


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
  return jax.nn.softmax(top_logits.astype(jnp.float32), axis=-1), indices.astype(jnp.int32)


def top2_sampled_routing(
    logits: jax.Array, gumbel: Optional[jax.Array]
) -> Tuple[jax.Array, jax.Array]:
  """DeepSpeed `top2gating` (`top2_2nd_expert_sampling=True`), without capacity.

  p = softmax(logits) over all experts; the 1st expert is argmax p; the 2nd is the argmax of
  `logits + gumbel` over the other experts (the Gumbel-max trick: a draw from the softmax of
  the remaining experts); weights p_i / max(p_1 + p_2, eps). `gumbel` None gives the
  deterministic top-2 (= `top_k_routing(logits, 2)` up to rounding).

  Args:
    logits: `[T, E]` router logits (cast to float32).
    gumbel: `[T, E]` standard Gumbel noise, or None.
  Returns:
    weights `[T, 2]` float32, indices `[T, 2]` int32 (1st expert first).
  """
  logits = logits.astype(jnp.float32)
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  first = jnp.argmax(probs, axis=-1)
  noisy = logits if gumbel is None else logits + jax.lax.stop_gradient(gumbel)
  noisy = jnp.where(jax.nn.one_hot(first, num_experts, dtype=jnp.bool_), -jnp.inf, noisy)
  second = jnp.argmax(noisy, axis=-1)
  indices = jnp.stack([first, second], axis=-1).astype(jnp.int32)
  chosen = jnp.take_along_axis(probs, indices, axis=-1)
  denom = jnp.maximum(jnp.sum(chosen, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
  return chosen / denom, indices


def gumbel_noise(key: jax.Array, shape: Tuple[int, ...]) -> jax.Array:
  """Standard Gumbel noise `[T, E]` float32 from an rng key (the 'router' stream)."""
  return jax.random.gumbel(key, shape, jnp.float32)


# Base key of `content_gumbel_noise`: ASCII 'gumb'.
_CONTENT_NOISE_SEED = 0x67756D62


def content_gumbel_noise(logits: jax.Array) -> jax.Array:
  """Gumbel noise `[T, E]` keyed by each token's router logits, for calls without an rng.

  Token t's key chains `fold_in` over the float32 bit patterns of its E logits, so the noise
  is a deterministic function of the token's routing input: reproducible, independent
  across tokens, layers and decoding steps (unlike one fixed key, which would add the same
  draw at every step), and unchanged by the batch the token sits in.
  """
  bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(logits).astype(jnp.float32), jnp.uint32)

  def one(row):
    key = jax.random.PRNGKey(_CONTENT_NOISE_SEED)
    for e in range(row.shape[0]):
      key = jax.random.fold_in(key, row[e])
    return jax.random.gumbel(key, row.shape, jnp.float32)

  return jax.vmap(one)(bits)


def renormalize_kept(weights: jax.Array, kept: jax.Array) -> jax.Array:
  """Weights of the kept choices rescaled to sum to 1 per token (dropped ones 0), as
  DeepSpeed's top2gating does after capacity drops; a token with none kept gets zeros."""
  w = jnp.where(kept, weights.astype(jnp.float32), 0.0)
  total = jnp.sum(w, axis=-1, keepdims=True)
  return w / jnp.maximum(total, jnp.finfo(jnp.float32).eps)


def _masked_mean(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Mean over the leading (token) axis, counting only tokens with mask 1."""
  if mask is None:
    return jnp.mean(x, axis=0)
  m = mask.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.sum(x * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)


def expert_fraction(
    indices: jax.Array, num_experts: int, mask: Optional[jax.Array] = None
) -> jax.Array:
  """`[E]`: the fraction of (token, choice) assignments that go to each expert; sums to 1."""
  assignments = jax.nn.one_hot(indices, num_experts, dtype=jnp.float32).mean(axis=1)  # [T, E]
  return _masked_mean(assignments, mask)


def load_balance_loss(
    probs: jax.Array, indices: jax.Array, mask: Optional[jax.Array] = None
) -> jax.Array:
  """Switch Transformer load-balancing loss, `E * sum_e f_e * P_e`.

  f_e is `expert_fraction` (assignments, normalised over the k choices) and P_e the mean router
  probability of expert e. It is 1 for perfectly uniform routing whatever k is; Hugging Face's
  Mixtral `load_balancing_loss_func` computes k times this value. `indices[:, :1]` (first
  choices only) gives DeepSpeed's top2gating `l_aux = mean(me * ce) * E * E`
  (= E * sum_e me_e * ce_e), the official 8-expert model's loss ('top1' form).

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


def router_aux(
    logits: jax.Array,
    indices: jax.Array,
    kept: jax.Array,
    mask: Optional[jax.Array] = None,
    load_balance_loss_form: str = 'topk',
) -> Dict[str, jax.Array]:
  """All losses and statistics of one MoE layer, as a flat dict of float32 arrays.

  `load_balance_loss_form`: 'topk' counts all k choices, 'top1' only the first
  (`MoEConfig.load_balance_loss_form`).
  """
  if load_balance_loss_form not in LOAD_BALANCE_LOSS_FORMS:
    raise ValueError(
        f'load_balance_loss_form must be one of {LOAD_BALANCE_LOSS_FORMS}, '
        f'got {load_balance_loss_form!r}'
    )
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  balance_indices = indices[:, :1] if load_balance_loss_form == 'top1' else indices
  return {
      'load_balance_loss': load_balance_loss(probs, balance_indices, mask),
      'router_z_loss': router_z_loss(logits, mask),
      'expert_fraction': expert_fraction(indices, logits.shape[-1], mask),
      'drop_fraction': drop_fraction(kept, mask),
      'router_entropy': router_entropy(probs, mask),
  }
