"""The whole dropless MoE layer with `gmm_backend='megablox'` equals the tiled layer.

megablox is a Pallas TPU kernel; on CPU it runs only in Pallas interpret mode. The layer has
no interpret switch of its own: JAX's `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`
runs every `pallas_call` traced under it in TPU interpret mode (a CPU simulation of the TPU's
memories, buffers starting as NaN). The setting is part of jit's cache key, so a function
traced outside it is retraced inside it. (Kernel-level checks, rows past the groups' sum
included, are in tests/grouped_matmul_test.py.)

Compared, float32, with tolerances relative to the largest magnitude of each reference array:
outputs, aux values, the input gradient and every parameter gradient of a loss in a training
call, and the output of a batch-1 decode step ([1, 1, embed]: k rows for E experts, most
groups empty), both with LoRA on the experts (its products ride on the same grouped matmuls
as the base weights', so the plain layer is covered too). Shards of groups (`group_offset`, as
each expert shard runs it) are checked at the kernel level in tests/grouped_matmul_test.py;
the whole expert-parallel layer with megablox agreed too (6.7e-7) in a test dropped for the
suite's time, and runs with the tiled backend in tests/moe_expert_parallel_test.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from unimoe_jax.config import LoRAConfig, MoEConfig
from unimoe_jax.moe.layer import MoEFeedForward

E, K, D, F = 8, 2, 32, 48
# Max abs difference allowed, as a fraction of the reference's largest magnitude. Measured
# (jax 0.10.2, CPU): at most 3.0e-7 in training, 0 in decode, 6.7e-7 expert-parallel.
RTOL = 1e-5
LORA = LoRAConfig(rank=4, dropout=0.0)


def _layer(backend, lora=None):
  cfg = MoEConfig(
      num_experts=E,
      num_experts_per_tok=K,
      dispatch='dropless',
      gmm_backend=backend,
      load_balance_loss_coef=0.01,
      router_z_loss_coef=0.001,
  )
  return MoEFeedForward(cfg, mlp_dim=F, lora=lora)


def _params(x, lora):
  params = nn.meta.unbox(_layer('tiled', lora).init(jax.random.PRNGKey(0), x))['params']
  # Non-zero adapters (lora_b starts at zero), so the LoRA path matters.
  return jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 if p[-1].key == 'lora_b' else v, params
  )


def _assert_trees_close(got, ref, what):
  leaves = jax.tree_util.tree_leaves_with_path(ref)
  assert len(leaves) == len(jax.tree_util.tree_leaves(got))
  for (path, r), g in zip(leaves, jax.tree_util.tree_leaves(got)):
    r, g = np.asarray(r, np.float32), np.asarray(g, np.float32)
    assert g.shape == r.shape, (what, jax.tree_util.keystr(path))
    scale = float(np.abs(r).max(initial=0.0))
    err = float(np.abs(g - r).max(initial=0.0))
    assert (
        np.isfinite(g).all() and err <= RTOL * scale
    ), f'{what} {jax.tree_util.keystr(path)}: max abs error {err} (scale {scale})'


def _run(backend, fn, *args):
  """jit(fn)(*args), megablox in TPU interpret mode; also checks which kernel ran."""
  jitted = jax.jit(fn)
  if backend != 'megablox':
    assert 'pallas_call' not in str(jax.make_jaxpr(fn)(*args))
    return jitted(*args)
  with pltpu.force_tpu_interpret_mode():
    assert 'pallas_call' in str(jax.make_jaxpr(fn)(*args))
    return jitted(*args)


def _grad_fn(backend, lora, ct):
  layer = _layer(backend, lora)

  def loss(params, x):
    # deterministic=False: the training path (no router jitter or LoRA dropout configured,
    # so both backends see the same computation).
    y, aux = layer.apply(
        {'params': params}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(5)}
    )
    return jnp.sum(y * ct) + aux['aux_loss'], (y, aux)

  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


@pytest.mark.slow  # 10-20 s on 2 cores: TPU interpret mode compiles 9-27 pallas_calls.
# With LoRA on the experts: the adapters' products ride on the same grouped matmuls, so this
# case covers the plain one too (which agreed as well, 13 s; dropped for the suite's time).
@pytest.mark.parametrize('lora', [LORA], ids=['lora'])
def test_training_step_equals_tiled(lora):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, D))
  ct = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  params = _params(x, lora)
  ref = _run('tiled', _grad_fn('tiled', lora, ct), params, x)
  got = _run('megablox', _grad_fn('megablox', lora, ct), params, x)
  _assert_trees_close(got, ref, f'training lora={lora is not None}')
  (_, (_, aux)), (g_params, g_x) = ref
  # The comparison is not vacuous: the loss reaches every expert weight and the router.
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(g_params))
  assert float(jnp.abs(g_x).max()) > 0 and float(aux['load_balance_loss']) > 0


# With LoRA, as the training test (the plain case agreed too, 5 s; dropped for the suite's time).
@pytest.mark.parametrize('lora', [LORA], ids=['lora'])
def test_batch_1_decode_step_equals_tiled(lora):
  """One new token: k = 2 rows meet 2 of the 8 experts; 6 groups are empty."""
  prompt = jax.random.normal(jax.random.PRNGKey(3), (1, 1, D))
  params = _params(prompt, lora)

  def step(backend):
    return lambda p, x: _layer(backend, lora).apply({'params': p}, x, deterministic=True)

  ref = _run('tiled', step('tiled'), params, prompt)
  got = _run('megablox', step('megablox'), params, prompt)
  _assert_trees_close(got, ref, f'decode lora={lora is not None}')
  assert got[0].shape == (1, 1, D) and float(jnp.abs(ref[0]).max()) > 0
  assert int(jnp.sum(ref[1]['expert_fraction'] > 0)) == K  # 2 groups used, 6 empty.
