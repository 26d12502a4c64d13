"""A tiny random HF LlavaForConditionalGeneration converted (tools/convert_checkpoint.py
--source hf) gives our UniMoE the same logits for a prompt with one image (float32)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference
from tool_runs import run_convert
from unimoe_jax import checkpoints
from unimoe_jax.convert import llava
from unimoe_jax.network import UniMoE

TOL = 1e-4
IMAGE_TOKEN = 96  # HF's image token: the last id of the tiny vocabulary.


def tiny_llava():
  _, transformers = hf_reference.torch_and_transformers()
  vision = transformers.CLIPVisionConfig(**hf_reference.tiny_config('clip_vision_llava'))
  text = transformers.LlamaConfig(**hf_reference.TINY_DECODER, intermediate_size=96)
  config = transformers.LlavaConfig(
      vision_config=vision,
      text_config=text,
      image_token_id=IMAGE_TOKEN,
      vision_feature_layer=-2,
      vision_feature_select_strategy='default',
      projector_hidden_act='gelu',
      image_seq_length=16,
      tie_word_embeddings=False,
  )
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  model = transformers.LlavaForConditionalGeneration(config).eval()
  model.set_attn_implementation('eager')
  return hf_reference.randomize(model)


def _inputs(n_image_tokens, seed=0):
  rng = np.random.RandomState(seed)
  ids = np.concatenate(
      [[1], rng.randint(3, 90, size=4), [IMAGE_TOKEN] * n_image_tokens, rng.randint(3, 90, size=6)]
  ).astype(np.int64)[None]
  pixels = rng.randn(1, 32, 32, 3).astype(np.float32)  # channels-last, ours
  return ids, pixels


def _hf_logits(model, ids, pixels):
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    return model(
        input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))
    ).logits.numpy()


def _our_logits(cfg, params, hf_config, ids, pixels):
  batch = {
      'decoder_input_tokens': jnp.asarray(llava.map_image_tokens(ids, hf_config, cfg)),
      'image_features': jnp.asarray(pixels[:, None]),
      'image_mask': jnp.ones((1, 1), bool),
  }
  logits, _ = UniMoE(cfg).apply({'params': params}, batch)
  return np.asarray(logits)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  model = tiny_llava()
  src = tmp_path_factory.mktemp('llava') / 'src'
  model.save_pretrained(src)
  return model, src


def test_converted_llava_logits_match_transformers(tmp_path, capsys, converted):
  model, src = converted
  out = str(tmp_path / 'out')
  capsys.readouterr()
  assert run_convert(source='hf', input=src, output=out, dtype='float32') == 0
  summary = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert summary['modalities'] == ['image', 'video']
  cfg, params = checkpoints.restore_model(out)
  assert cfg.vision.select_feature == 'patch' and cfg.vision.num_used_layers == 2
  assert cfg.num_soft_tokens('image') == 16 and cfg.image_token_id == -200
  hf_config = model.config.to_dict()
  ids, pixels = _inputs(16)
  theirs = _hf_logits(model, ids, pixels)
  ours = _our_logits(cfg, params, hf_config, ids, pixels)
  err = np.abs(ours - theirs).max()
  assert err < TOL, err
  assert np.abs(theirs).max() > 1e-1
  # The image matters (so the comparison covers tower and projector), and the HF reference
  # does see it.
  other = _hf_logits(model, ids, -pixels)
  assert np.abs(other[0, -6:] - theirs[0, -6:]).max() > 20 * TOL
  np.testing.assert_allclose(
      _our_logits(cfg, params, hf_config, ids, -pixels), other, atol=TOL, rtol=0
  )


def test_llava_mismatch_writes_nothing(tmp_path, converted):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  model, _ = converted
  sd = hf_reference.state_dict_numpy(model)
  sd['model.multi_modal_projector.linear_9.weight'] = sd.pop(
      'model.multi_modal_projector.linear_2.weight'
  )
  src = tmp_path / 'bad'
  model.config.save_pretrained(src)
  safetensors.numpy.save_file(sd, str(src / 'model.safetensors'))
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match=r'linear_9\.weight'):
    run_convert(source='hf', input=src, output=out)
  assert not out.exists() and os.listdir(tmp_path) == ['bad']


def test_legacy_names_and_config_checks(converted):
  model, _ = converted
  hf_config = model.config.to_dict()
  cfg = llava.config_from_hf(hf_config, dtype='float32')
  legacy = {}
  for name, value in hf_reference.state_dict_numpy(model).items():
    # The hub's transformers 4 layout.
    name = name.replace('model.vision_tower.', 'vision_tower.vision_model.')
    name = name.replace('model.multi_modal_projector.', 'multi_modal_projector.')
    name = name.replace('model.language_model.', 'language_model.model.')
    legacy[name.replace('lm_head.', 'language_model.lm_head.')] = value
  params = llava.params_from_hf(legacy, cfg)
  assert set(params) == {'decoder', 'vision_tower', 'vision_projector'}
  # The in-memory transformers 5 names convert to the same arrays.
  direct = llava.params_from_hf(hf_reference.state_dict_numpy(model), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, direct)
  full = dict(hf_config, vision_feature_select_strategy='full')
  assert llava.config_from_hf(full).vision.select_feature == 'cls_patch'
  with pytest.raises(ValueError, match='vision_feature_layer'):
    llava.config_from_hf(dict(hf_config, vision_feature_layer=[-2, -3]))
