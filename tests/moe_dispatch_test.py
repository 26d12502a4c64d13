"""The three dispatch paths agree, and the capacity path drops exactly what it should."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax.config import MoEConfig
from unimoe_jax.moe import dispatch as dispatch_lib
from unimoe_jax.moe.layer import MoEFeedForward
from tree_asserts import assert_trees_close

E, K, D, F = 4, 2, 32, 48


def _layer(mode, lora=None, **moe):
  cfg = MoEConfig(num_experts=E, num_experts_per_tok=K, dispatch=mode, **moe)
  return MoEFeedForward(cfg, mlp_dim=F, lora=lora)


def _init(x, lora=None):
  variables = _layer('dense', lora).init(jax.random.PRNGKey(0), x)
  params = nn.meta.unbox(variables)['params']
  # Larger router weights make routing decisive, so every path sees the same top-k.
  params['router'] = params['router'] * 50.0
  return params


def _x(b=2, l=12, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, l, D), jnp.float32)


def _np_expert(p, e, x):
  silu = lambda v: v / (1.0 + np.exp(-v))
  h = silu(x @ p['wi_0']['kernel'][e]) * (x @ p['wi_1']['kernel'][e])
  return h @ p['wo']['kernel'][e]


def _np_route(p, x):
  logits = x @ p['router']
  idx = np.argsort(-logits, axis=-1, kind='stable')[..., :K]
  top = np.take_along_axis(logits, idx, -1)
  w = np.exp(top - top.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True), idx


def test_paths_agree_on_outputs_and_gradients():
  x = _x()
  params = _init(x)
  cot = jax.random.normal(jax.random.PRNGKey(2), x.shape)

  def loss(mode, params, x):
    y, aux = _layer(mode, capacity_factor=float(E)).apply({'params': params}, x)
    return jnp.sum(y * cot), aux

  results = {}
  for mode in ('dense', 'capacity', 'dropless'):
    (value, aux), grads = jax.jit(
        jax.value_and_grad(lambda p, x, m=mode: loss(m, p, x), argnums=(0, 1), has_aux=True)
    )(params, x)
    results[mode] = (value, grads)
    assert float(aux['drop_fraction']) == 0.0
  ref_value, ref_grads = results['dense']
  scale = float(jnp.max(jnp.abs(ref_value))) + 1.0
  for mode in ('capacity', 'dropless'):
    value, grads = results[mode]
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5 * scale)
    assert_trees_close(grads, ref_grads, atol_scale=1e-5, rtol=1e-4, what=f'{mode} gradient ')
  # The router gets gradient through the routing weights on every path.
  assert float(jnp.abs(ref_grads[0]['router']).max()) > 0


def test_layer_matches_numpy_reference():
  x = _x()
  params = _init(x)
  y, _ = _layer('dropless').apply({'params': params}, x)
  p = jax.tree_util.tree_map(np.asarray, params)
  xt = np.asarray(x).reshape(-1, D)
  w, idx = _np_route(p, xt)
  expected = np.zeros_like(xt)
  for t in range(xt.shape[0]):
    for j in range(K):
      expected[t] += w[t, j] * _np_expert(p, idx[t, j], xt[t])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), expected, atol=1e-5)


@pytest.mark.parametrize('group_size', [0, 8])
def test_capacity_drops_exactly_the_assignments_beyond_capacity(group_size):
  b, l = 2, 12
  x = _x(b, l)
  params = _init(x)
  capacity_factor, min_capacity = 0.5, 1
  layer = _layer(
      'capacity', capacity_factor=capacity_factor, min_capacity=min_capacity, group_size=group_size
  )
  y, aux = layer.apply({'params': params}, x)

  p = jax.tree_util.tree_map(np.asarray, params)
  xt = np.asarray(x).reshape(-1, D)
  w, idx = _np_route(p, xt)
  s = group_size or l
  cap = dispatch_lib.expert_capacity(s, K, E, capacity_factor, min_capacity)
  assert cap == int(np.ceil(capacity_factor * s * K / E))
  kept = np.zeros((b * l, K), bool)
  for g0 in range(0, b * l, s):  # GShard priority: all first choices, then second choices.
    used = np.zeros(E, int)
    for j in range(K):
      for t in range(g0, g0 + s):
        used[idx[t, j]] += 1
        kept[t, j] = used[idx[t, j]] <= cap
  assert 0 < kept.sum() < kept.size  # The case really drops some, and keeps some.
  expected = np.zeros_like(xt)
  for t in range(b * l):
    for j in range(K):
      if kept[t, j]:
        expected[t] += w[t, j] * _np_expert(p, idx[t, j], xt[t])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), expected, atol=1e-5)
  np.testing.assert_allclose(float(aux['drop_fraction']), 1.0 - kept.mean(), atol=1e-6)


def test_padding_is_left_out_of_router_statistics():
  x = _x(1, 8)
  params = _init(x)
  mask = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]])
  # Jitted: the dropless layer run op by op compiled ~180 small programs.
  apply = jax.jit(lambda p, *args: _layer('dropless').apply({'params': p}, *args))
  _, aux_masked = apply(params, x, mask)
  _, aux_first = apply(params, x[:, :4])
  for key in ('load_balance_loss', 'router_z_loss', 'router_entropy', 'expert_fraction'):
    np.testing.assert_allclose(aux_masked[key], aux_first[key], rtol=1e-5, err_msg=key)


def test_router_jitter_only_in_training():
  x = _x()
  params = _init(x)
  layer = _layer('dropless', router_jitter=0.5)
  y_eval, _ = layer.apply({'params': params}, x)
  y_eval2, _ = layer.apply({'params': params}, x, deterministic=True)
  np.testing.assert_array_equal(y_eval, y_eval2)
  _, aux_train = layer.apply(
      {'params': params}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(3)}
  )
  _, aux_eval = layer.apply({'params': params}, x)
  assert float(jnp.abs(aux_train['router_z_loss'] - aux_eval['router_z_loss'])) > 0


def test_unknown_dispatch_mode_is_named():
  with pytest.raises(ValueError, match="dispatch must be one of.*'sparse'"):
    MoEConfig(dispatch='sparse')


def test_padding_takes_no_capacity():
  x = _x(1, 8)
  params = _init(x)
  mask = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]])
  # Padding first in the row would take slots before the real tokens if it were counted.
  x_pad_first = jnp.concatenate([x[:, 4:], x[:, :4]], axis=1)
  # Capacity 2 for both the 8-token row and the 4-token reference (min_capacity wins).
  layer = _layer('capacity', capacity_factor=0.25, min_capacity=2)
  y, aux = layer.apply({'params': params}, x_pad_first, mask[:, ::-1])
  y_ref, aux_ref = layer.apply({'params': params}, x[:, :4])
  np.testing.assert_allclose(y[:, 4:], y_ref, atol=1e-6)
  np.testing.assert_array_equal(y[:, :4], 0.0)
  np.testing.assert_allclose(aux['drop_fraction'], aux_ref['drop_fraction'], atol=1e-7)
  assert float(aux_ref['drop_fraction']) > 0  # Capacity binds, so slot order matters.


def _temp_mib(module, x):
  """Temp memory of the compiled vjp with a given cotangent, as tools/bench_moe.py measures.
  Shapes only: an init run op by op computed the layer at full size (~100 small compiles)."""
  params = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), x))['params']

  def loss(p, x, ct):
    out = module.apply({'params': p}, x)
    return jnp.sum((out[0] if isinstance(out, tuple) else out) * ct)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


@pytest.mark.parametrize('shape', [(2048, 512, 1408, 4, 2), (512, 256, 704, 8, 2)])
def test_dropless_temp_memory_within_1_5x_dense_ffn(shape):
  """No experts-times-sized intermediates: compiled fwd+bwd temp memory vs a dense SwiGLU of
  the same active FLOPs (hidden k * mlp). Compile only; nothing is timed."""
  from unimoe_jax.layers.mlp import SwiGLU  # pylint: disable=g-import-not-at-top

  t, d, f, e, k = shape
  x = jnp.zeros((1, t, d), jnp.float32)
  dense_mib = _temp_mib(SwiGLU(k * f), x)
  moe = MoEFeedForward(
      MoEConfig(num_experts=e, num_experts_per_tok=k, dispatch='dropless', gmm_backend='tiled'),
      mlp_dim=f,
  )
  moe_mib = _temp_mib(moe, x)
  assert moe_mib <= 1.5 * dense_mib, (moe_mib, dense_mib)


def test_choose_tile_scales_with_group_size():
  from unimoe_jax.moe.grouped_matmul import choose_tile  # pylint: disable=g-import-not-at-top

  assert choose_tile(4096, 4) == 128
  assert choose_tile(1024, 8) == 32
  assert choose_tile(16, 4) == 16
