"""Routing rule and auxiliary losses against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax.moe import routing


def test_top_k_then_softmax_equals_softmax_then_renormalise():
  logits = jax.random.normal(jax.random.PRNGKey(0), (64, 8)) * 3
  weights, idx = routing.top_k_routing(logits, 2)
  probs = jax.nn.softmax(logits, -1)
  top = jnp.take_along_axis(probs, idx, -1)
  np.testing.assert_allclose(weights, top / top.sum(-1, keepdims=True), rtol=1e-6)
  np.testing.assert_array_equal(idx, jnp.argsort(-logits, -1)[:, :2])


def test_losses_match_hand_computation():
  # Two tokens, three experts, top-1. Token 0 -> expert 0, token 1 -> expert 2.
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], jnp.float32))
  _, idx = routing.top_k_routing(logits, 1)
  probs = jax.nn.softmax(logits)
  # f = [1/2, 0, 1/2]; P = [0.4, 0.25, 0.35]; E * sum(f * P) = 3 * (0.2 + 0.175) = 1.125.
  np.testing.assert_allclose(routing.load_balance_loss(probs, idx), 1.125, rtol=1e-6)
  # logsumexp of log-probabilities is log(1) = 0, so the z-loss is 0; shift by log 2 -> (log 2)^2.
  np.testing.assert_allclose(routing.router_z_loss(logits), 0.0, atol=1e-7)
  np.testing.assert_allclose(
      routing.router_z_loss(logits + np.log(2.0)), np.log(2.0) ** 2, rtol=1e-6
  )
  ent0 = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))
  ent1 = -(0.1 * np.log(0.1) + 0.3 * np.log(0.3) + 0.6 * np.log(0.6))
  np.testing.assert_allclose(routing.router_entropy(probs), (ent0 + ent1) / 2, rtol=1e-6)
  np.testing.assert_allclose(routing.expert_fraction(idx, 3), [0.5, 0.0, 0.5])


def test_load_balance_loss_is_one_when_uniform_and_k_times_hf_convention():
  # Uniform probabilities and perfectly spread top-2 choices.
  probs = jnp.full((4, 4), 0.25)
  idx = jnp.array([[0, 1], [2, 3], [1, 0], [3, 2]])
  np.testing.assert_allclose(routing.load_balance_loss(probs, idx), 1.0, rtol=1e-6)
  # Hugging Face Mixtral: sum(mean_t onehot [k, E] * mean_t probs) * E, which is k times ours.
  logits = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
  probs = jax.nn.softmax(logits)
  _, idx = routing.top_k_routing(logits, 2)
  hf = jnp.sum(jax.nn.one_hot(idx, 4).mean(0) * probs.mean(0)[None]) * 4
  np.testing.assert_allclose(2 * routing.load_balance_loss(probs, idx), hf, rtol=1e-6)


def test_masked_tokens_do_not_count():
  logits = jax.random.normal(jax.random.PRNGKey(2), (6, 4))
  _, idx = routing.top_k_routing(logits, 2)
  mask = jnp.array([1, 1, 1, 0, 0, 0])
  full = routing.router_aux(logits, idx, jnp.ones((6, 2), bool), mask)
  first = routing.router_aux(logits[:3], idx[:3], jnp.ones((3, 2), bool))
  for key in full:
    np.testing.assert_allclose(full[key], first[key], rtol=1e-6, err_msg=key)
  kept = jnp.array([[1, 0], [1, 1], [1, 1], [0, 0], [0, 0], [0, 0]], bool)
  np.testing.assert_allclose(routing.drop_fraction(kept, mask), 1 / 6, rtol=1e-6)
