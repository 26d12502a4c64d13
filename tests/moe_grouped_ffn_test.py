"""The fused SwiGLU expert loop equals separate `ragged_dot` grouped matmuls, forward and
backward, with and without LoRA adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax.layers.lora import LoRADropout
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


RANK, SCALE = 4, 2.0


def _params(local, seed=0, lora=False):
  """x `[P, D]`, experts {name: {kernel[, lora_a, lora_b]}}, cotangent `[P, D]`."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 11))
  x = jax.random.normal(next(keys), (P, D))
  experts = {}
  for name, i, o in (('wi_0', D, F), ('wi_1', D, F), ('wo', F, D)):
    experts[name] = {'kernel': jax.random.normal(next(keys), (local, i, o)) / np.sqrt(i)}
    if lora:
      experts[name]['lora_a'] = jax.random.normal(next(keys), (local, i, RANK)) / np.sqrt(i)
      experts[name]['lora_b'] = jax.random.normal(next(keys), (local, RANK, o)) / np.sqrt(RANK)
  return x, experts, jax.random.normal(next(keys), (P, D))


def _reference(x, experts, sizes, offset):
  matmul = lambda h, w: gmm_lib.gmm(h, w, sizes, backend='ragged_dot', group_offset=offset)
  return dispatch_lib.expert_ffn(experts, x, matmul, lora_scale=SCALE)


def _fused(x, experts, sizes, offset, dropout=None):
  return grouped_ffn.swiglu(x, experts, sizes, offset, TILE, SCALE, dropout)


def _value_and_grads(fn, x, experts, ct, sizes, offset):
  """[out, dx, *weight gradients in tree order]."""

  def loss(x, experts):
    y = fn(x, experts, sizes, offset)
    return jnp.sum(y.astype(jnp.float32) * ct), y

  (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, experts)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(dw)]
  return dict(zip(['out', 'dx'] + names, [y, dx] + jax.tree_util.tree_leaves(dw)))


def _assert_close(got, ref, what):
  assert sorted(got) == sorted(ref)
  for name, r in ref.items():
    scale = max(float(jnp.abs(r).max()), 1.0)
    err = float(jnp.abs(got[name] - r).max())
    assert err <= 1e-5 * scale, f'{what} {name}: max abs error {err} (scale {scale})'


@pytest.mark.parametrize('lora', [False, True], ids=['base', 'lora'])
@pytest.mark.parametrize('case', sorted(GROUP_SIZES))
def test_fused_equals_separate_ragged_dots(case, lora):
  sizes = jnp.array(GROUP_SIZES[case], jnp.int32)
  x, experts, ct = _params(5, lora=lora)
  ref = _value_and_grads(_reference, x, experts, ct, sizes, 0)
  got = _value_and_grads(_fused, x, experts, ct, sizes, 0)
  _assert_close(got, ref, case)
  if case != 'all_empty':  # The comparison is not between two zero arrays.
    assert all(float(jnp.abs(r).max()) > 0 for r in ref.values())


@pytest.mark.parametrize('offset', [0, 3])
def test_shard_of_experts(offset):
  """Experts [offset, offset + 2) of 5: rows of the other experts come out zero, no gradient."""
  sizes = jnp.array(GROUP_SIZES['random'], jnp.int32)
  x, experts, ct = _params(2, seed=offset, lora=True)
  got = _value_and_grads(_fused, x, experts, ct, sizes, offset)
  ref = _value_and_grads(_reference, x, experts, ct, sizes, offset)
  _assert_close(got, ref, f'offset={offset}')
  starts = np.cumsum([0] + GROUP_SIZES['random'])
  lo, hi = starts[offset], starts[offset + 2]
  outside = np.r_[0:lo, hi:P]
  np.testing.assert_array_equal(np.asarray(got['out'])[outside], 0.0)
  np.testing.assert_array_equal(np.asarray(got['dx'])[outside], 0.0)


def test_forward_without_gradient_matches():
  sizes = jnp.array(GROUP_SIZES['random'], jnp.int32)
  x, experts, _ = _params(5, lora=True)
  got = jax.jit(_fused)(x, experts, sizes, 0)
  np.testing.assert_allclose(got, _reference(x, experts, sizes, 0), atol=1e-5, rtol=1e-5)


def test_bfloat16_tracks_float32():
  sizes = jnp.array(GROUP_SIZES['random'], jnp.int32)
  x, experts, ct = _params(5, lora=True)
  ref = _value_and_grads(_fused, x, experts, ct, sizes, 0)
  bf = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), (x, experts))
  got = _value_and_grads(_fused, *bf, ct, sizes, 0)
  for name, r in ref.items():
    assert got[name].dtype == jnp.bfloat16, name
    err = float(jnp.abs(got[name].astype(jnp.float32) - r).max())
    assert err <= 0.05 * float(jnp.abs(r).max()), f'{name}: {err}'


def test_lora_dropout_backward_matches_its_forward():
  """With dropout the backward must redraw the forward's masks: the gradient's directional
  derivative equals a central finite difference of the (same-key) forward."""
  sizes = jnp.array(GROUP_SIZES['random'], jnp.int32)
  x, experts, ct = _params(5, lora=True)
  drop = LoRADropout(0.5, jax.random.PRNGKey(7))
  loss = jax.jit(lambda x, e: jnp.sum(_fused(x, e, sizes, 0, drop) * ct))
  no_drop = float(jnp.sum(_fused(x, experts, sizes, 0) * ct))
  assert abs(float(loss(x, experts)) - no_drop) > 1e-3 * abs(no_drop)  # Dropout acts.
  gx, ge = jax.jit(
      jax.grad(lambda x, e: jnp.sum(_fused(x, e, sizes, 0, drop) * ct), argnums=(0, 1))
  )(x, experts)
  keys = iter(jax.random.split(jax.random.PRNGKey(9), 20))
  vx = jax.random.normal(next(keys), x.shape)
  ve = jax.tree_util.tree_map(lambda a: jax.random.normal(next(keys), a.shape), experts)
  eps = 1e-2
  shift = lambda s: (x + s * vx, jax.tree_util.tree_map(lambda a, v: a + s * v, experts, ve))
  numeric = (float(loss(*shift(eps))) - float(loss(*shift(-eps)))) / (2 * eps)
  analytic = float(jnp.vdot(gx, vx)) + sum(
      float(jnp.vdot(g, v))
      for g, v in zip(jax.tree_util.tree_leaves(ge), jax.tree_util.tree_leaves(ve))
  )
  assert abs(numeric - analytic) <= 1e-2 * abs(analytic), (numeric, analytic)


def test_bad_inputs_are_refused():
  x, experts, _ = _params(5)
  with pytest.raises(ValueError, match='multiple of the tile'):
    grouped_ffn.swiglu(x[:150], experts, jnp.array([16, 0, 0, 0, 0]), 0, TILE)
  with pytest.raises(ValueError, match='needs experts'):
    grouped_ffn.swiglu(x, {'wi_0': experts['wi_0']}, jnp.array([16, 0, 0, 0, 0]), 0, TILE)


@pytest.mark.parametrize('lora', [False, True], ids=['base', 'lora'])
def test_dropless_layer_same_with_and_without_fusion(lora):
  """dispatch.dropless: fused and unfused tiled paths agree on outputs and gradients."""
  t, k, e = 96, 2, 5
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  x = jax.random.normal(keys[0], (2, t // 2, D))
  indices = jax.random.randint(keys[1], (2, t // 2, k), 0, e)
  weights = jax.nn.softmax(jax.random.normal(keys[2], (2, t // 2, k)), axis=-1)
  _, experts, _ = _params(e, lora=lora)

  def loss(experts, x, fuse):
    y, _ = dispatch_lib.dropless(
        x, weights, indices, experts, tile=16, fuse_ffn=fuse, lora_scale=SCALE
    )
    return jnp.sum(y * x)

  grad = lambda fuse: jax.jit(jax.value_and_grad(lambda p, xx: loss(p, xx, fuse), argnums=(0, 1)))(
      experts, x
  )
  fused, unfused = grad(True), grad(False)
  for g, r in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(unfused)):
    np.testing.assert_allclose(g, r, atol=1e-5 * float(jnp.abs(r).max()), rtol=1e-5)
