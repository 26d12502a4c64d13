"""LoRA: zero-initialised adapters change nothing; merged adapters equal applied adapters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import config as config_lib
from unimoe_jax.decoder import Decoder
from unimoe_jax.layers.lora import merge_lora

LORA = config_lib.LoRAConfig(rank=4, alpha=8.0, dropout=0.05)


def _cfg(lora):
  moe = config_lib.MoEConfig(num_experts=4, num_experts_per_tok=2, layers='every_other')
  return config_lib.named('tiny', moe=moe, lora=lora)


def _params(lora):
  tokens = jnp.ones((2, 8), jnp.int32)
  return nn.meta.unbox(Decoder(_cfg(lora)).init(jax.random.PRNGKey(0), tokens))['params']


def _tokens():
  return jax.random.randint(jax.random.PRNGKey(5), (2, 8), 0, 512)


def _strip_lora(tree):
  if not isinstance(tree, dict):
    return tree
  return {k: _strip_lora(v) for k, v in tree.items() if k not in ('lora_a', 'lora_b')}


def test_adapters_on_every_target():
  params = _params(LORA)
  paths = [
      '/'.join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)
  ]
  for expected in (
      'layers_0/attention/query/lora_a',
      'layers_0/attention/out/lora_b',
      'layers_0/mlp/wi_0/lora_a',
      'layers_1/moe/wo/lora_b',
  ):
    assert expected in paths
  assert params['layers_1']['moe']['wi_0']['lora_a'].shape == (4, 64, 4)  # [expert, in, rank]
  assert not any('router' in p and 'lora' in p for p in paths)


def test_zero_initialised_adapters_leave_outputs_unchanged():
  params = _params(LORA)
  with_lora, _ = Decoder(_cfg(LORA)).apply({'params': params}, _tokens())
  without, _ = Decoder(_cfg(None)).apply({'params': _strip_lora(params)}, _tokens())
  np.testing.assert_array_equal(with_lora, without)


def test_merged_adapters_equal_applied_adapters():
  params = _params(LORA)
  # Random B matrices, so the adapters really change the output.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = iter(jax.random.split(jax.random.PRNGKey(9), len(leaves)))
  params = jax.tree_util.tree_unflatten(
      treedef,
      [
          jax.random.normal(next(keys), v.shape) * 0.05 if path[-1].key == 'lora_b' else v
          for path, v in leaves
      ],
  )
  applied, _ = Decoder(_cfg(LORA)).apply({'params': params}, _tokens())
  merged_params = merge_lora(params, LORA.scale)
  merged, _ = Decoder(_cfg(None)).apply({'params': merged_params}, _tokens())
  base, _ = Decoder(_cfg(None)).apply({'params': _strip_lora(params)}, _tokens())
  assert float(jnp.abs(applied - base).max()) > 1e-2
  np.testing.assert_allclose(merged, applied, atol=1e-5)
  assert jax.tree_util.tree_structure(merged_params) == jax.tree_util.tree_structure(
      _strip_lora(params)
  )


def test_lora_dropout_is_active_only_in_training():
  cfg = _cfg(dataclasses.replace(LORA, dropout=0.5))
  params = _params(LORA)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if p[-1].key == 'lora_b' else v, params
  )
  model = Decoder(cfg)
  eval1, _ = model.apply({'params': params}, _tokens())
  eval2, _ = model.apply({'params': params}, _tokens())
  train, _ = model.apply(
      {'params': params}, _tokens(), deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)}
  )
  np.testing.assert_array_equal(eval1, eval2)
  assert float(jnp.abs(train - eval1).max()) > 1e-3
