"""The inverse converters: our CLIP tower and LLaVA projectors -> Hugging Face tensors, our
Whisper encoder and aligner -> a WhisperModel's tensors, and their configs; round trips through
the forward converters, and transformers loading the exported tensors."""

import dataclasses

import jax
import numpy as np
import pytest

from convert_inverse_qformer_beats_test import _assert_exported, _assert_trees_equal, _random_like
from encoders_clip_test import _hf_tower
from encoders_whisper_test import hf  # noqa: F401  (a pytest fixture)
from hf_reference import torch_and_transformers
from unimoe_jax.connectors.projector import Projector
from unimoe_jax.convert import clip as convert_clip
from unimoe_jax.convert import whisper as convert_whisper
from unimoe_jax.encoders.whisper import sinusoids

LLAVA_PREFIX = 'model.vision_tower.vision_tower.vision_model.'

# --- CLIP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('select_layer', [-1, -2, 1])
def test_clip_hf_ours_hf_is_bit_identical_on_what_the_tower_reads(select_layer):
  _, config, sd = _hf_tower()
  cfg = convert_clip.config_from_hf(config.to_dict(), select_layer=select_layer)
  params = convert_clip.params_from_hf({'vision_model.' + k: v for k, v in sd.items()}, cfg)
  back = convert_clip.params_to_hf(params, cfg, prefix=LLAVA_PREFIX)
  _assert_exported(back)
  dropped = {
      k
      for k in sd
      if k.startswith('post_layernorm.')
      or k == 'embeddings.position_ids'
      or any(
          k.startswith(f'encoder.layers.{i}.') for i in range(cfg.num_used_layers, cfg.num_layers)
      )
  }
  assert {k[len(LLAVA_PREFIX) :] for k in back} == set(sd) - dropped
  assert dropped >= {'post_layernorm.weight', 'post_layernorm.bias'}
  for name, value in back.items():
    np.testing.assert_array_equal(value, sd[name[len(LLAVA_PREFIX) :]], err_msg=name)


def test_clip_ours_hf_ours_is_bit_identical_and_config_round_trips():
  _, config, sd = _hf_tower()
  cfg = convert_clip.config_from_hf(config.to_dict())
  params = _random_like(
      convert_clip.params_from_hf({'vision_model.' + k: v for k, v in sd.items()}, cfg), seed=5
  )
  again = convert_clip.params_from_hf(convert_clip.params_to_hf(params, cfg), cfg)
  _assert_trees_equal(again, params)
  hf_dict = convert_clip.config_to_hf(cfg)
  assert (
      convert_clip.config_from_hf(
          hf_dict, select_layer=cfg.select_layer, select_feature=cfg.select_feature
      )
      == cfg
  )
  gelu = dataclasses.replace(cfg, act='gelu_tanh')
  assert convert_clip.config_to_hf(gelu)['hidden_act'] == 'gelu_new'
  assert convert_clip.config_from_hf(convert_clip.config_to_hf(gelu)).act == 'gelu_tanh'


def test_clip_transformers_loads_the_export_and_gives_the_same_hidden_state():
  torch, transformers = torch_and_transformers()
  model, config, sd = _hf_tower()
  cfg = convert_clip.config_from_hf(config.to_dict())  # select_layer -2: the last layer dropped.
  params = convert_clip.params_from_hf({'vision_model.' + k: v for k, v in sd.items()}, cfg)
  exported = convert_clip.params_to_hf(params, cfg, prefix='vision_model.')
  fresh = transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(attn_implementation='eager', **convert_clip.config_to_hf(cfg))
  ).eval()
  state = {k: torch.from_numpy(v) for k, v in exported.items()}
  # transformers 4 keeps the `vision_model.` level in CLIPVisionModel's names, 5 drops it.
  names = set(fresh.state_dict())
  if not any(n.startswith('vision_model.') for n in names):
    state = {k[len('vision_model.') :]: v for k, v in state.items()}
  missing, unexpected = fresh.load_state_dict(state, strict=False)
  assert not unexpected
  assert all(
      'post_layernorm' in m or m.endswith('position_ids') or f'layers.{cfg.num_layers - 1}.' in m
      for m in missing
  ), missing
  pixels = torch.tensor(np.random.default_rng(0).normal(size=(2, 3, 30, 30)).astype(np.float32))
  with torch.no_grad():
    want = model(pixel_values=pixels, output_hidden_states=True).hidden_states[cfg.select_layer]
    got = fresh(pixel_values=pixels, output_hidden_states=True).hidden_states[cfg.select_layer]
  np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize('kind', ['linear', 'mlp2x_gelu', 'mlp3x_gelu'])
def test_projector_round_trips_bit_exact(kind):
  params = nn_init_projector(kind, in_dim=7, out_dim=11)
  sd = convert_clip.projector_params_to_hf(params, kind, prefix='model.mm_projector.')
  _assert_exported(sd)
  if kind == 'linear':
    assert set(sd) == {'model.mm_projector.weight', 'model.mm_projector.bias'}
    assert sd['model.mm_projector.weight'].shape == (11, 7)
  else:
    depth = int(kind[3])
    assert set(sd) == {
        f'model.mm_projector.{2 * i}.{t}' for i in range(depth) for t in ('weight', 'bias')
    }
  again = convert_clip.projector_params_from_hf(sd, kind, prefix='model.mm_projector.')
  _assert_trees_equal(again, params)


def nn_init_projector(kind, in_dim, out_dim):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  variables = Projector(kind=kind, out_dim=out_dim).init(
      jax.random.PRNGKey(0), np.zeros((1, 2, in_dim), np.float32)
  )
  return _random_like(nn.meta.unbox(variables['params']), seed=1)


def test_projector_export_names_a_missing_linear():
  params = nn_init_projector('mlp2x_gelu', in_dim=3, out_dim=4)
  with pytest.raises(ValueError, match='mlp2x_gelu'):
    convert_clip.projector_params_to_hf({k: v for k, v in list(params.items())[:1]}, 'mlp2x_gelu')


# --- Whisper -------------------------------------------------------------------------------------


def test_whisper_hf_ours_hf_is_bit_identical(hf):
  _, sd, enc_cfg, ali_cfg = hf
  encoder = convert_whisper.encoder_params_from_hf(sd, enc_cfg, prefix='encoder.')
  back = convert_whisper.encoder_params_to_hf(encoder, enc_cfg, prefix='encoder.')
  _assert_exported(back)
  assert set(back) == {k for k in sd if k.startswith('encoder.')}
  for name, value in back.items():
    if name == 'encoder.embed_positions.weight':
      # Written from our sinusoids; HF's table is torch's float32 evaluation of the same formula.
      np.testing.assert_allclose(value, sd[name], atol=1e-6, rtol=0)
    else:
      np.testing.assert_array_equal(value, sd[name], err_msg=name)
  np.testing.assert_array_equal(
      back['encoder.embed_positions.weight'],
      sinusoids(enc_cfg.max_source_positions, enc_cfg.d_model),
  )

  queries = np.random.default_rng(2).normal(size=(1, ali_cfg.num_query_tokens, ali_cfg.d_model))
  aligner = convert_whisper.aligner_params_from_hf(
      sd, ali_cfg, prefix='decoder.', query_tokens=queries
  )
  back, back_queries = convert_whisper.aligner_params_to_hf(aligner, ali_cfg, prefix='decoder.')
  _assert_exported(back)
  assert set(back) == {k for k in sd if k.startswith('decoder.')} - {'decoder.embed_tokens.weight'}
  for name, value in back.items():
    np.testing.assert_array_equal(value, sd[name], err_msg=name)
  np.testing.assert_array_equal(back_queries, queries.astype(np.float32))


def test_whisper_ours_hf_ours_is_bit_identical_and_configs_round_trip(hf):
  _, sd, enc_cfg, ali_cfg = hf
  encoder = _random_like(convert_whisper.encoder_params_from_hf(sd, enc_cfg), seed=7)
  again = convert_whisper.encoder_params_from_hf(
      convert_whisper.encoder_params_to_hf(encoder, enc_cfg), enc_cfg
  )
  _assert_trees_equal(again, encoder)
  aligner = _random_like(convert_whisper.aligner_params_from_hf(sd, ali_cfg), seed=8)
  tensors, queries = convert_whisper.aligner_params_to_hf(aligner, ali_cfg)
  again = convert_whisper.aligner_params_from_hf(tensors, ali_cfg, query_tokens=queries)
  _assert_trees_equal(again, aligner)

  hf_dict = convert_whisper.config_to_hf(enc_cfg, ali_cfg)
  assert convert_whisper.encoder_config_from_hf(hf_dict) == enc_cfg
  assert (
      convert_whisper.aligner_config_from_hf(hf_dict, num_query_tokens=ali_cfg.num_query_tokens)
      == ali_cfg
  )


def test_whisper_config_to_hf_names_what_it_cannot_say(hf):
  _, _, enc_cfg, ali_cfg = hf
  with pytest.raises(ValueError, match='WhisperAlignerConfig.causal'):
    convert_whisper.config_to_hf(enc_cfg, dataclasses.replace(ali_cfg, causal=False))
  with pytest.raises(ValueError, match='WhisperEncoderConfig.layer_norm_eps'):
    convert_whisper.config_to_hf(dataclasses.replace(enc_cfg, layer_norm_eps=1e-6), ali_cfg)
  with pytest.raises(ValueError, match='must agree'):
    convert_whisper.config_to_hf(enc_cfg, dataclasses.replace(ali_cfg, act='relu'))
  with pytest.raises(ValueError, match=r'layers\.0\.fc1\.weight \(our kernel\).*shape'):
    encoder = convert_whisper.encoder_params_from_hf(hf[1], enc_cfg)
    encoder['layers_0']['mlp']['fc1']['kernel'] = np.zeros((3, 3), np.float32)
    convert_whisper.encoder_params_to_hf(encoder, enc_cfg)


def test_whisper_transformers_loads_the_export_and_gives_the_same_outputs(hf):
  torch, transformers = torch_and_transformers()
  model, sd, enc_cfg, ali_cfg = hf
  encoder = convert_whisper.encoder_params_from_hf(sd, enc_cfg)
  queries = np.random.default_rng(3).normal(size=(1, ali_cfg.num_query_tokens, ali_cfg.d_model))
  aligner = convert_whisper.aligner_params_from_hf(sd, ali_cfg, query_tokens=queries)
  hf_dict = convert_whisper.config_to_hf(enc_cfg, ali_cfg)
  # The unused token table: the fixture's tiny vocabulary instead of Whisper's.
  hf_dict.update(
      {
          k: getattr(model.config, k)
          for k in (
              'vocab_size',
              'pad_token_id',
              'bos_token_id',
              'eos_token_id',
              'decoder_start_token_id',
          )
      }
  )
  fresh = transformers.WhisperModel(
      transformers.WhisperConfig(attn_implementation='eager', **hf_dict)
  ).eval()
  state = dict(convert_whisper.encoder_params_to_hf(encoder, enc_cfg, prefix='encoder.'))
  state.update(convert_whisper.aligner_params_to_hf(aligner, ali_cfg, prefix='decoder.')[0])
  missing, unexpected = fresh.load_state_dict(
      {k: torch.from_numpy(v) for k, v in state.items()}, strict=False
  )
  assert not unexpected and missing == ['decoder.embed_tokens.weight'], (missing, unexpected)
  feats = torch.tensor(
      np.random.default_rng(0)
      .normal(size=(2, enc_cfg.num_mel_bins, enc_cfg.num_frames))
      .astype(np.float32)
  )
  embeds = torch.tensor(np.repeat(queries, 2, 0).astype(np.float32))
  with torch.no_grad():
    want = model(input_features=feats, decoder_inputs_embeds=embeds).last_hidden_state
    got = fresh(input_features=feats, decoder_inputs_embeds=embeds).last_hidden_state
    want_enc = model.encoder(feats).last_hidden_state
    got_enc = fresh.encoder(feats).last_hidden_state
  # The positions differ from HF's by torch-vs-numpy float32 rounding (< 1e-6, see above).
  np.testing.assert_allclose(got_enc.numpy(), want_enc.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)
