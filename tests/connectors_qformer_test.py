"""QFormer vs transformers' Blip2QFormerModel, masking, and the state-dict converter."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import state_dict_numpy, tiny_config, torch_and_transformers
from unimoe_jax.connectors.qformer import QFORMER_SIZES, QFormer, QFormerConfig
from unimoe_jax.convert import qformer as convert_qformer

BATCH, FRAMES = 3, 11


@functools.lru_cache(maxsize=None)
def tiny_hf_qformer(use_qformer_text_input=False):
  """Built once per variant; the tests only read it."""
  torch, transformers = torch_and_transformers()
  config = transformers.Blip2QFormerConfig(
      use_qformer_text_input=use_qformer_text_input,
      attn_implementation='eager',
      **tiny_config('blip2_qformer'),
  )
  model = transformers.Blip2QFormerModel(config).eval()
  # Real values everywhere (biases and LayerNorms start at 0/1), so that a swapped or
  # mis-shaped tensor shows up in the output.
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.1)
      if 'layernorm' in name.lower() and name.endswith('weight'):
        p.add_(1.0)
  return model, config


def encoder_inputs(seed=0):
  rng = np.random.default_rng(seed)
  states = rng.normal(size=(BATCH, FRAMES, 24)).astype(np.float32)
  lengths = np.array([FRAMES, 7, 3])
  mask = np.arange(FRAMES)[None, :] < lengths[:, None]
  return states, mask


def hf_output(model, query_tokens, states, mask):
  torch, _ = torch_and_transformers()
  query = np.broadcast_to(query_tokens[None], (states.shape[0],) + query_tokens.shape)
  with torch.no_grad():
    out = model(
        query_embeds=torch.tensor(np.ascontiguousarray(query)),
        encoder_hidden_states=torch.tensor(states),
        encoder_attention_mask=torch.tensor(mask.astype(np.int64)),
    )
  return out.last_hidden_state.numpy()


def converted(model, config, num_query=8, seed=1):
  cfg = convert_qformer.config_from_hf(config.to_dict(), num_query_tokens=num_query)
  query = np.random.default_rng(seed).normal(size=(num_query, cfg.hidden_size))
  params = convert_qformer.params_from_hf(
      state_dict_numpy(model), cfg, query_tokens=query.astype(np.float32)
  )
  return cfg, params


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg, dtype):
  return jax.jit(
      lambda params, states, mask: QFormer(cfg, dtype=dtype)
      .apply({'params': params}, states, mask)
      .astype(jnp.float32)
  )


def apply(cfg, params, states, mask=None, dtype=jnp.float32):
  mask = None if mask is None else jnp.asarray(mask)
  return np.asarray(_jitted_apply(cfg, dtype)(params, jnp.asarray(states), mask))


@pytest.mark.parametrize('use_qformer_text_input', [False, True])
def test_matches_blip2_qformer(use_qformer_text_input):
  model, config = tiny_hf_qformer(use_qformer_text_input)
  cfg, params = converted(model, config)
  assert [cfg.has_cross_attention(i) for i in range(3)] == [True, False, True]
  assert 'cross_attention' not in params['layers_1']
  states, mask = encoder_inputs()
  ours = apply(cfg, params, states, mask)
  ref = hf_output(model, params['query_tokens'], states, mask)
  assert ours.shape == (BATCH, 8, 32)
  err = np.max(np.abs(ours - ref))
  print('max abs err vs Blip2QFormerModel:', err)
  assert err < 1e-4
  # The mask matters: ignoring it moves the padded rows far beyond the tolerance.
  unmasked = apply(cfg, params, states, np.ones_like(mask))  # Same shapes: no recompile.
  assert np.max(np.abs(unmasked[1:] - ref[1:])) > 1e-2
  np.testing.assert_allclose(unmasked[0], ref[0], atol=1e-4)


def test_masked_frames_do_not_matter():
  model, config = tiny_hf_qformer()
  cfg, params = converted(model, config)
  states, mask = encoder_inputs()
  mask[2] = False  # A fully masked example.
  base = apply(cfg, params, states, mask)
  assert np.all(np.isfinite(base))
  noisy = np.where(
      mask[:, :, None], states, 1e4 * np.random.default_rng(5).normal(size=states.shape)
  ).astype(np.float32)
  np.testing.assert_array_equal(apply(cfg, params, noisy, mask), base)
  # ... while changing one real frame does change the output.
  changed = states.copy()
  changed[:2, 0] += 1.0
  assert np.all(np.max(np.abs(apply(cfg, params, changed, mask) - base)[:2], axis=(1, 2)) > 1e-3)
  # Partially masked rows still match HF with the fully masked row in the batch.
  ref = hf_output(model, params['query_tokens'], states[:2], mask[:2])
  assert np.max(np.abs(base[:2] - ref)) < 1e-4


def test_init_tree_matches_converter_and_is_partitioned():
  model, config = tiny_hf_qformer()
  cfg, params = converted(model, config)
  # Shapes and partitioning metadata only: running init would compile every op.
  variables = jax.eval_shape(QFormer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 24)))
  boxed = variables['params']
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), t)  # pylint: disable=unnecessary-lambda-assignment
  assert shapes(nn.meta.unbox(boxed)) == shapes(params)
  assert boxed['query_tokens'].names == ('query_tokens', 'embed')


def test_bfloat16_compute_stays_close():
  model, config = tiny_hf_qformer()
  cfg, params = converted(model, config)
  states, mask = encoder_inputs()
  f32 = apply(cfg, params, states, mask)
  bf16 = apply(cfg, params, states, mask, dtype=jnp.bfloat16)
  assert np.all(np.isfinite(bf16))
  assert np.max(np.abs(bf16 - f32)) < 0.1  # Measured 0.026 on outputs of magnitude ~3.


def test_prefixed_state_dict_with_query_tokens_beside():
  _, transformers = torch_and_transformers()
  model, config = tiny_hf_qformer()
  cfg, params = converted(model, config)
  blip2 = transformers.Blip2Config(
      vision_config={'hidden_size': 24}, qformer_config=config.to_dict(), num_query_tokens=8
  )
  assert convert_qformer.config_from_hf(blip2.to_dict()) == cfg
  sd = {f'qformer.{k}': v for k, v in state_dict_numpy(model).items()}
  sd['query_tokens'] = params['query_tokens'][None]
  sd['vision_model.post_layernorm.weight'] = np.ones(5, np.float32)  # Outside the prefix.
  got = convert_qformer.params_from_hf(sd, cfg, prefix='qformer.')
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
  # Uni-MoE's aligner: query tokens two levels above the Q-Former.
  sd = {
      f'model.mm_audio_aligner.qformer.qformer.{k}': v for k, v in state_dict_numpy(model).items()
  }
  sd['model.mm_audio_aligner.query_tokens'] = params['query_tokens'][None]
  sd['model.mm_audio_aligner.projector.weight'] = np.ones((4, 32), np.float32)
  got = convert_qformer.params_from_hf(sd, cfg, prefix='model.mm_audio_aligner.qformer.qformer')
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)


def test_converter_names_mismatches():
  model, config = tiny_hf_qformer()
  cfg, params = converted(model, config)
  sd = state_dict_numpy(model)
  good = 'encoder.layer.2.crossattention.attention.key.weight'
  bad = 'encoder.layer.2.crossattention.attention.keys.weight'
  sd[bad] = sd.pop(good)
  with pytest.raises(ValueError) as err:
    convert_qformer.params_from_hf(sd, cfg, query_tokens=params['query_tokens'])
  assert good in str(err.value) and bad in str(err.value)
  with pytest.raises(ValueError, match='query_tokens'):
    convert_qformer.params_from_hf(state_dict_numpy(model), cfg)
  sd = state_dict_numpy(model)
  sd['encoder.layer.0.output_query.dense.weight'] = np.zeros((32, 40), np.float32)
  with pytest.raises(ValueError, match='output_query.dense.weight'):
    convert_qformer.params_from_hf(sd, cfg, query_tokens=params['query_tokens'])
  with pytest.raises(ValueError, match='query_tokens'):
    convert_qformer.params_from_hf(
        state_dict_numpy(model), cfg, query_tokens=np.zeros((1, 9, 32), np.float32)
    )


def test_config_validation_and_sizes():
  audio = QFORMER_SIZES['uni-moe-audio']
  assert (
      audio.hidden_size,
      audio.num_layers,
      audio.encoder_hidden_size,
      audio.num_query_tokens,
  ) == (768, 12, 768, 50)
  with pytest.raises(ValueError, match='num_heads'):
    dataclasses.replace(QFORMER_SIZES['tiny'], num_heads=5)
  with pytest.raises(ValueError, match='act'):
    QFormerConfig(act='swish')
  with pytest.raises(ValueError, match='num_query_tokens'):
    convert_qformer.config_from_hf({'hidden_size': 32})
