"""Decoder behaviour beyond parity: dtypes, rematerialisation, masks, MoE layer placement."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import config as config_lib
from unimoe_jax.decoder import Decoder
from unimoe_jax.layers.attention import causal_segment_mask

TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 1, 512)


# Inits and forwards jitted: run op by op, each compiled ~150-250 small programs.
def _init(cfg):
  return jax.jit(lambda k: nn.meta.unbox(Decoder(cfg).init(k, TOKENS))['params'])(
      jax.random.PRNGKey(0)
  )


def _apply(cfg, params, tokens, **kwargs):
  return jax.jit(lambda p, t: Decoder(cfg).apply({'params': p}, t, **kwargs))(params, tokens)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  f32 = config_lib.named('tiny', moe=config_lib.MoEConfig(layers='every_other'))
  bf16 = dataclasses.replace(f32, dtype='bfloat16')
  params = _init(bf16)
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype('float32')}
  logits_bf16, aux = _apply(bf16, params, TOKENS)
  logits_f32, _ = _apply(f32, params, TOKENS)
  assert logits_bf16.dtype == jnp.float32 and aux['router_z_loss'].dtype == jnp.float32
  scale = float(jnp.abs(logits_f32).max())
  assert float(jnp.abs(logits_bf16 - logits_f32).max()) < 0.05 * scale
  assert not np.array_equal(logits_bf16, logits_f32)  # bf16 really was used.


def test_remat_gives_the_same_gradients():
  base = config_lib.named('tiny', moe=config_lib.MoEConfig(layers=[1]))
  params = _init(base)

  def grads(cfg):
    def loss(p):
      logits, aux = Decoder(cfg).apply({'params': p}, TOKENS)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + aux['load_balance_loss']

    return jax.jit(jax.grad(loss))(params)

  ref = grads(base)
  for policy in ('full', 'dots_saveable'):
    got = grads(dataclasses.replace(base, remat=policy))
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def test_moe_layers_are_where_the_config_says():
  cfg = config_lib.named('tiny', num_layers=4, moe=config_lib.MoEConfig(layers='every_other'))
  params = jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(0), TOKENS)['params']
  assert [('moe' in params[f'layers_{i}']) for i in range(4)] == [False, True, False, True]
  assert [('mlp' in params[f'layers_{i}']) for i in range(4)] == [True, False, True, False]


def test_causal_segment_mask():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  m = np.asarray(causal_segment_mask(5, seg))[0, 0]
  expected = np.array(
      [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], bool
  )
  np.testing.assert_array_equal(m, expected)


def test_padding_does_not_change_real_tokens_and_gives_no_nans():
  cfg = config_lib.named('tiny', moe=config_lib.MoEConfig())
  params = _init(cfg)
  seg = jnp.concatenate([jnp.ones((2, 8), jnp.int32), jnp.zeros((2, 4), jnp.int32)], 1)
  padded, _ = _apply(cfg, params, TOKENS, segment_ids=seg)
  short, _ = _apply(cfg, params, TOKENS[:, :8])
  assert bool(jnp.all(jnp.isfinite(padded)))
  np.testing.assert_allclose(padded[:, :8], short, atol=1e-5)
