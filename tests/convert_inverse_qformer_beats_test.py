"""The inverse converters: our Q-Former -> transformers `Blip2QFormerModel`, our BEATs -> the
official BEATs state dict, and their configs; round trips through the forward converters."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert_checkpoint_test import tiny_hf_qformer
from encoders_beats_test import PRE_LN_CFG, TINY_CFG as BEATS_CFG
from encoders_beats_test import official_state_dict as beats_official_state_dict
from hf_reference import state_dict_numpy, torch_and_transformers
from unimoe_jax.connectors.qformer import QFormer
from unimoe_jax.convert import beats as convert_beats
from unimoe_jax.convert import qformer as convert_qformer
from unimoe_jax.encoders import beats

NUM_QUERY = 4
UNIMOE_PREFIX = 'model.mm_audio_aligner.qformer.qformer.'
POS_CONV = ('encoder.pos_conv.0.weight_g', 'encoder.pos_conv.0.weight_v')
# Splitting our positional kernel into (g, v) and folding it back: g is the float64 norm rounded
# to float32 and the fold rounds again, so each element is off by at most 2 * 2**-24 ~ 1.2e-7,
# relative. Measured: ours -> official -> ours 9.3e-8; official -> ours -> official 0 (seeds 0-2).
FOLD_RTOL = 2.5e-7


def _random_like(tree, seed):
  """Numpy normals of each leaf's shape (LayerNorm-like scales near 1 don't matter here)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: rng.normal(0.0, 0.3, x.shape).astype(np.float32), tree)


def _assert_trees_equal(got, want):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = functools.reduce(lambda t, k: t[k.key], path, want)
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


def _assert_exported(sd):
  for name, value in sd.items():
    assert value.dtype == np.float32 and value.flags.c_contiguous, name


# --- Q-Former ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _hf_qformer():
  """The `towers` fixture's Q-Former of convert_checkpoint_test: 2 layers, 12 heads."""
  model = tiny_hf_qformer()
  cfg = convert_qformer.config_from_hf(model.config.to_dict(), num_query_tokens=NUM_QUERY)
  query = np.random.default_rng(4).normal(size=(1, NUM_QUERY, 24)).astype(np.float32)
  return model, cfg, query


def _qformer_output(model, query, states):
  torch, _ = torch_and_transformers()
  with torch.no_grad():
    out = model(
        query_embeds=torch.tensor(np.repeat(query, states.shape[0], 0)),
        encoder_hidden_states=torch.tensor(states),
    )
  return out.last_hidden_state.numpy()


@pytest.mark.parametrize('prefix', ['', UNIMOE_PREFIX], ids=['bare', 'unimoe_prefix'])
def test_qformer_hf_ours_hf_is_bit_identical(prefix):
  model, cfg, query = _hf_qformer()
  sd = {prefix + k: v for k, v in state_dict_numpy(model).items()}
  # Uni-MoE keeps the query tokens two levels above the Q-Former (found by the forward).
  sd_in = dict(sd, **({'model.mm_audio_aligner.query_tokens': query} if prefix else {}))
  params = convert_qformer.params_from_hf(
      sd_in, cfg, prefix=prefix, query_tokens=None if prefix else query
  )
  back, back_query = convert_qformer.params_to_hf(params, cfg, prefix=prefix)
  assert sorted(back) == sorted(sd)  # No text FFN in this model: the forward reads everything.
  _assert_exported(back)
  for name, value in sd.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  assert back_query.dtype == np.float32 and back_query.flags.c_contiguous
  np.testing.assert_array_equal(back_query, query)


def test_qformer_ours_hf_ours_is_bit_identical_and_loads_in_transformers():
  torch, transformers = torch_and_transformers()
  model, cfg, _ = _hf_qformer()
  shapes = jax.eval_shape(
      QFormer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 3, cfg.encoder_hidden_size))
  )
  params = _random_like(nn.meta.unbox(shapes['params']), seed=5)
  sd, query = convert_qformer.params_to_hf(params, cfg)
  assert query.shape == (1, NUM_QUERY, cfg.hidden_size)
  _assert_trees_equal(convert_qformer.params_from_hf(sd, cfg, query_tokens=query), params)

  # The exported config builds a model that takes the export (strictly) and computes what the
  # original does with the original's tensors.
  hf_dict = convert_qformer.config_to_hf(cfg)
  assert convert_qformer.config_from_hf(hf_dict, num_query_tokens=NUM_QUERY) == cfg
  assert hf_dict['hidden_act'] == model.config.hidden_act
  rebuilt = transformers.Blip2QFormerModel(
      transformers.Blip2QFormerConfig(**hf_dict, attn_implementation='eager')
  ).eval()
  exported, _ = convert_qformer.params_to_hf(
      convert_qformer.params_from_hf(state_dict_numpy(model), cfg, query_tokens=query), cfg
  )
  rebuilt.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
  rng = np.random.default_rng(6)
  embeds = rng.normal(size=(1, NUM_QUERY, cfg.hidden_size)).astype(np.float32)
  states = rng.normal(size=(2, 5, cfg.encoder_hidden_size)).astype(np.float32)
  np.testing.assert_allclose(
      _qformer_output(rebuilt, embeds, states),
      _qformer_output(model, embeds, states),
      atol=1e-5,
      rtol=0,
  )


def test_qformer_config_round_trip():
  _, cfg, _ = _hf_qformer()
  for act in ('gelu', 'gelu_tanh', 'quick_gelu', 'relu'):
    c = dataclasses.replace(cfg, act=act, layer_norm_eps=1e-6)
    assert (
        convert_qformer.config_from_hf(convert_qformer.config_to_hf(c), num_query_tokens=NUM_QUERY)
        == c
    )


# --- BEATs ------------------------------------------------------------------------------------


def _folded(sd):
  return convert_beats.fold_weight_norm(sd[POS_CONV[0]], sd[POS_CONV[1]])


@pytest.mark.parametrize('cfg_dict', [BEATS_CFG, PRE_LN_CFG], ids=['post_ln_deep_norm', 'pre_ln'])
def test_beats_official_ours_official(cfg_dict):
  config = beats.config_from_official(cfg_dict)
  sd = beats_official_state_dict(cfg_dict)
  with_head = dict(
      sd, **{name: np.zeros((1,), np.float32) for name in convert_beats.TRAINING_ONLY_TENSORS}
  )
  back = convert_beats.params_to_official(
      convert_beats.params_from_official(with_head, config), config
  )
  assert sorted(back) == sorted(sd)  # The head is dropped; the tied table repeats per layer.
  _assert_exported(back)
  for name, value in sd.items():
    if name not in POS_CONV:
      np.testing.assert_array_equal(back[name], value, err_msg=name)
    else:
      assert back[name].shape == value.shape, name
  np.testing.assert_allclose(_folded(back), _folded(sd), rtol=FOLD_RTOL, atol=0)


@pytest.mark.parametrize('cfg_dict', [BEATS_CFG, PRE_LN_CFG], ids=['post_ln_deep_norm', 'pre_ln'])
def test_beats_ours_official_ours(cfg_dict):
  config = beats.config_from_official(cfg_dict)
  shapes = jax.eval_shape(
      beats.BEATs(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, config.num_mel_bins))
  )
  params = _random_like(nn.meta.unbox(shapes['params']), seed=7)
  sd = convert_beats.params_to_official(params, config)
  assert sorted(sd) == sorted(beats_official_state_dict(cfg_dict))
  norm = np.sqrt(np.sum(np.square(sd[POS_CONV[1]].astype(np.float64)), axis=(0, 1)))
  np.testing.assert_allclose(sd[POS_CONV[0]], norm[None, None], rtol=1e-7)  # torch dim=2.
  back = convert_beats.params_from_official(sd, config)
  kernel, back_kernel = params['pos_conv'].pop('kernel'), back['pos_conv'].pop('kernel')
  _assert_trees_equal(back, params)
  err = np.max(np.abs(back_kernel - kernel) / np.abs(kernel))
  print(f'pos_conv kernel: max relative error after split + fold {err:.2e}')
  assert err <= FOLD_RTOL, err


def test_beats_config_round_trip():
  for cfg_dict in (BEATS_CFG, PRE_LN_CFG):
    config = beats.config_from_official(cfg_dict)
    official = beats.config_to_official(config)
    assert beats.config_from_official(official) == config
    assert official['finetuned_model'] is False
    # Every architecture key the original states, with the same value.
    assert {k: official[k] for k in cfg_dict if k in official} == {
        k: v for k, v in cfg_dict.items() if k in official
    }
  for size in beats.BEATS_SIZES.values():
    assert beats.config_from_official(beats.config_to_official(size)) == size
  with pytest.raises(ValueError, match='num_mel_bins'):
    beats.config_to_official(beats.BEATsConfig(num_mel_bins=64))
