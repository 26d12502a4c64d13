"""Expert parallelism: the dropless layer on an 8-device (data=2, expert=4) mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax import partitioning
from unimoe_jax.config import LoRAConfig, MoEConfig
from unimoe_jax.moe.layer import MoEFeedForward
from tree_asserts import assert_trees_close

E, D, F = 8, 32, 48


def _setup(lora=None):
  layer = MoEFeedForward(
      MoEConfig(
          num_experts=E, num_experts_per_tok=2, dispatch='dropless', load_balance_loss_coef=0.01
      ),
      mlp_dim=F,
      lora=lora,
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, D))
  ct = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, expert=4))
  init = lambda key: layer.init(key, x)
  variables, shardings = partitioning.init_sharded(init, mesh, jax.random.PRNGKey(2))
  params = variables['params']
  if lora is not None:  # Non-zero adapters, so they matter.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.05 if p[-1].key == 'lora_b' else v, params
    )

  def loss(params, x):
    y, aux = layer.apply({'params': params}, x)
    return jnp.sum(y * ct) + aux['aux_loss']

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1))
  x_sharded = jax.device_put(x, partitioning.logical_sharding(mesh, ('activation_batch',)))
  return mesh, grad_fn, params, x, x_sharded, shardings['params']


@pytest.mark.slow
@pytest.mark.parametrize('lora', [None, LoRAConfig(rank=4, dropout=0.0)])
def test_expert_parallel_equals_single_device(lora):
  mesh, grad_fn, params, x, x_sharded, param_shardings = _setup(lora)
  with partitioning.mesh_context(mesh):
    assert partitioning.expert_parallel_axes() is not None
    value, (g_params, g_x) = jax.jit(grad_fn, out_shardings=(None, (param_shardings, None)))(
        params, x_sharded
    )
  assert g_params['wi_0']['kernel'].sharding.spec[0] == 'expert'
  ref_value, (ref_params, ref_x) = jax.jit(grad_fn)(
      jax.tree_util.tree_map(np.asarray, params), np.asarray(x)
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(g_x, ref_x, atol=1e-5 * float(np.abs(ref_x).max()))
  assert_trees_close(g_params, ref_params, atol_scale=1e-5)


def _shapes(hlo_line):
  return re.findall(r'f32\[([\d,]*)\]', hlo_line)


def test_no_all_gather_of_expert_weights():
  mesh, grad_fn, params, _, x_sharded, _ = _setup()
  with partitioning.mesh_context(mesh):
    hlo = jax.jit(grad_fn).lower(params, x_sharded).compile().as_text()
  gathers = [l for l in hlo.splitlines() if re.search(r'\ball-gather(-start)?\(', l)]
  # Expert weights (whole, a shard, or gate+up concatenated) have these trailing dims.
  weight_dims = {f'{D},{F}', f'{F},{D}', f'{D},{2 * F}'}
  for line in gathers:
    for shape in _shapes(line):
      dims = shape.split(',')
      assert len(dims) != 3 or ','.join(dims[1:]) not in weight_dims, line
  # The test reads the right program: tokens are all-gathered and outputs reduce-scattered.
  assert any(f'f32[4,16,{D}]' in l or f'f32[64,{D}]' in l for l in gathers), gathers
  assert re.search(r'reduce-scatter(-start)?\(', hlo)


def test_lora_dropout_masks_differ_between_data_shards():
  """Issue 21: every data shard drew the same LoRA dropout masks (one key for all devices).

  The two data shards hold the same tokens; with independent masks their outputs differ (at
  rate 0.5 over 16 x 32 inputs per row, equal outputs would mean equal masks)."""
  layer = MoEFeedForward(
      MoEConfig(num_experts=E, num_experts_per_tok=2, dispatch='dropless'),
      mlp_dim=F,
      lora=LoRAConfig(rank=4, dropout=0.5),
  )
  half = jax.random.normal(jax.random.PRNGKey(0), (4, 16, D))
  x = jnp.concatenate([half, half])  # Rows 0-3 on data shard 0, rows 4-7 on data shard 1.
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, expert=4))
  variables, _ = partitioning.init_sharded(
      lambda key: layer.init(key, x), mesh, jax.random.PRNGKey(2)
  )
  params = jax.tree_util.tree_map_with_path(  # Non-zero adapters, so the masks matter.
      lambda p, v: v + 0.05 if p[-1].key == 'lora_b' else v, variables['params']
  )
  x_sharded = jax.device_put(x, partitioning.logical_sharding(mesh, ('activation_batch',)))

  def apply(params, x, deterministic):
    return layer.apply(
        {'params': params}, x, deterministic=deterministic, rngs={'dropout': jax.random.PRNGKey(3)}
    )[0]

  with partitioning.mesh_context(mesh):
    assert partitioning.expert_parallel_axes() is not None
    dropped = np.asarray(jax.jit(apply, static_argnums=2)(params, x_sharded, False))
    kept = np.asarray(jax.jit(apply, static_argnums=2)(params, x_sharded, True))
  np.testing.assert_array_equal(kept[:4], kept[4:])  # Same tokens, no dropout: same output.
  assert np.abs(dropped[:4] - kept[:4]).max() > 1e-3  # Dropout acts ...
  assert np.abs(dropped[:4] - dropped[4:]).max() > 1e-3  # ... with a mask of each shard.
