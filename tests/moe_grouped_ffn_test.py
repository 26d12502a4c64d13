"""The fused SwiGLU expert loop equals three `ragged_dot` grouped matmuls, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax.moe import dispatch as dispatch_lib
from unimoe_jax.moe import grouped_ffn
from unimoe_jax.moe import grouped_matmul as gmm_lib

TILE, D, F = 16, 24, 40

# Rows per group in the tile-aligned layout (multiples of TILE); P rows in all.
GROUP_SIZES = {
    'random': [32, 48, 0, 16, 64],
    'empty_groups': [0, 80, 0, 0, 48],
    'one_group_all_rows': [0, 0, 160, 0, 0],
    'rows_past_the_sum': [16, 32, 0, 48, 0],  # 64 trailing rows belong to no group.
    'all_empty': [0, 0, 0, 0, 0],
}
P = 160


def _params(local, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(k[0], (P, D))
  w0 = jax.random.normal(k[1], (local, D, F)) / np.sqrt(D)
  w1 = jax.random.normal(k[2], (local, D, F)) / np.sqrt(D)
  wo = jax.random.normal(k[3], (local, F, D)) / np.sqrt(F)
  ct = jax.random.normal(k[4], (P, D))
  return x, w0, w1, wo, ct


def _reference(x, w0, w1, wo, sizes, offset):
  experts = {'wi_0': {'kernel': w0}, 'wi_1': {'kernel': w1}, 'wo': {'kernel': wo}}
  matmul = lambda h, w: gmm_lib.gmm(h, w, sizes, backend='ragged_dot', group_offset=offset)
  return dispatch_lib.expert_ffn(experts, x, matmul)


def _fused(x, w0, w1, wo, sizes, offset):
  return grouped_ffn.swiglu(x, w0, w1, wo, sizes, offset, TILE)


def _value_and_grads(fn, x, w0, w1, wo, ct, sizes, offset):
  def loss(x, w0, w1, wo):
    y = fn(x, w0, w1, wo, sizes, offset)
    return jnp.sum(y * ct), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      x, w0, w1, wo)
  return (y,) + grads


def _assert_close(got, ref, what):
  for name, g, r in zip(('out', 'dx', 'dwi_0', 'dwi_1', 'dwo'), got, ref):
    scale = max(float(jnp.abs(r).max()), 1.0)
    err = float(jnp.abs(g - r).max())
    assert err <= 1e-5 * scale, f'{what} {name}: max abs error {err} (scale {scale})'


@pytest.mark.parametrize('case', sorted(GROUP_SIZES))
def test_fused_equals_three_ragged_dots(case):
  sizes = jnp.array(GROUP_SIZES[case], jnp.int32)
  x, w0, w1, wo, ct = _params(5)
  ref = _value_and_grads(_reference, x, w0, w1, wo, ct, sizes, 0)
  got = _value_and_grads(_fused, x, w0, w1, wo, ct, sizes, 0)
  _assert_close(got, ref, case)
  if case != 'all_empty':  # The comparison is not between two zero arrays.
    assert all(float(jnp.abs(r).max()) > 0 for r in ref)


@pytest.mark.parametrize('offset', [0, 3])
def test_shard_of_experts(offset):
  """Experts [offset, offset + 2) of 5: rows of the other experts come out zero, no gradient."""
  sizes = jnp.array(GROUP_SIZES['random'], jnp.int32)
  x, w0, w1, wo, ct = _params(2, seed=offset)
  got = _value_and_grads(_fused, x, w0, w1, wo, ct, sizes, offset)
  ref = _value_and_grads(_reference, x, w0, w1, wo, ct, sizes, offset)
  _assert_close(got, ref, f'offset={offset}')
  starts = np.cumsum([0] + GROUP_SIZES['random'])
  lo, hi = starts[offset], starts[offset + 2]
  outside = np.r_[0:lo, hi:P]
  np.testing.assert_array_equal(np.asarray(got[0])[outside], 0.0)
  np.testing.assert_array_equal(np.asarray(got[1])[outside], 0.0)


def test_forward_without_gradient_matches():
  sizes = jnp.array(GROUP_SIZES['random'], jnp.int32)
  x, w0, w1, wo, _ = _params(5)
  got = jax.jit(_fused)(x, w0, w1, wo, sizes, 0)
  np.testing.assert_allclose(got, _reference(x, w0, w1, wo, sizes, 0), atol=1e-5, rtol=1e-5)


def test_bfloat16_tracks_float32():
  sizes = jnp.array(GROUP_SIZES['random'], jnp.int32)
  args = _params(5)
  ref = _value_and_grads(_fused, *args, sizes, 0)
  bf = [a.astype(jnp.bfloat16) for a in args[:4]]
  got = _value_and_grads(_fused, *bf, args[4], sizes, 0)
  for name, g, r in zip(('out', 'dx', 'dwi_0', 'dwi_1', 'dwo'), got, ref):
    assert g.dtype == jnp.bfloat16, name
    err = float(jnp.abs(g.astype(jnp.float32) - r).max())
    assert err <= 0.05 * float(jnp.abs(r).max()), f'{name}: {err}'


def test_rows_not_a_multiple_of_the_tile_are_refused():
  x, w0, w1, wo, _ = _params(5)
  with pytest.raises(ValueError, match='multiple of the tile'):
    grouped_ffn.swiglu(x[:150], w0, w1, wo, jnp.array([16, 0, 0, 0, 0]), 0, TILE)


def test_dropless_layer_same_with_and_without_fusion():
  """dispatch.dropless: fused and unfused tiled paths agree on outputs and gradients."""
  t, k, e = 96, 2, 5
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  x = jax.random.normal(keys[0], (2, t // 2, D))
  indices = jax.random.randint(keys[1], (2, t // 2, k), 0, e)
  weights = jax.nn.softmax(jax.random.normal(keys[2], (2, t // 2, k)), axis=-1)
  _, w0, w1, wo, _ = _params(e)
  experts = {'wi_0': {'kernel': w0}, 'wi_1': {'kernel': w1}, 'wo': {'kernel': wo}}

  def loss(experts, x, fuse):
    y, _ = dispatch_lib.dropless(x, weights, indices, experts, tile=16, fuse_ffn=fuse)
    return jnp.sum(y * x)

  grad = lambda fuse: jax.jit(jax.value_and_grad(
      lambda p, xx: loss(p, xx, fuse), argnums=(0, 1)))(experts, x)
  fused, unfused = grad(True), grad(False)
  for g, r in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(unfused)):
    np.testing.assert_allclose(g, r, atol=1e-5 * float(jnp.abs(r).max()), rtol=1e-5)
