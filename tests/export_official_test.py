"""`convert_checkpoint --to hf` on a multimodal model: the towers and connectors in the official
Uni-MoE layout (unimoe_jax/convert/export_official.py).

Official release (tiny, random, built as convert_checkpoint_test.py builds it) -> ours
(`--source unimoe`) -> export. Shown: every exported tensor equals the official one it came from
bit for bit (BEATs' weight-normed convolution: its folded kernel within float32 rounding), the
tensors not written are exactly the ones our towers never compute, the towers read back through
the official importer give our params again, and transformers loads the tower directories and
the decoder and computes what the original towers compute.
"""

import json
import os

import jax
import numpy as np
import pytest

from convert_checkpoint_test import (
    AUDIO_TOWER,
    CLIP,
    WHISPER_ALIGNER,
    _add_towers,
    _official_dir,
)
from convert_checkpoint_test import tokenizer_path, towers  # noqa: F401  (pytest fixtures)
from tool_runs import run_convert
from unimoe_jax import checkpoints
from unimoe_jax.convert import beats as convert_beats
from unimoe_jax.convert import clip as convert_clip
from unimoe_jax.convert import export_official
from unimoe_jax.convert import io as ckpt_io
from unimoe_jax.convert import official_towers
from unimoe_jax.encoders.beats import config_from_official as beats_config_from_official
from unimoe_jax.network import UniMoEConfig

# Not written: CLIP's post_layernorm and the layer after mm_vision_select_layer=-2 (of 2), the
# position_ids buffer; the Whisper tower's own encoder / decoder copies (never run) and the
# aligner decoder's token embedding (the aligner feeds query tokens).
_CLIP_DROPPED = ('post_layernorm.', 'encoder.layers.1.', 'embeddings.position_ids')


def _export(tmp_path, capsys, tokenizer_path, towers, kind):  # pylint: disable=redefined-outer-name
  src, _ = _official_dir(tmp_path, tokenizer_path)
  import torch  # pylint: disable=g-import-not-at-top

  official = _add_towers(src, towers, kind)
  # The vision projector: _official_dir's own non_lora_trainables.bin.
  official.update(
      {
          k: v.numpy()
          for k, v in torch.load(
              os.path.join(src, export_official.TRAINABLES_FILE), weights_only=True
          ).items()
      }
  )
  ours = str(tmp_path / 'ours')
  assert run_convert('--merge_lora', source='unimoe', input=src, output=ours, dtype='float32') == 0
  exported = str(tmp_path / 'hf')
  capsys.readouterr()
  assert run_convert(to='hf', input=ours, output=exported) == 0
  captured = capsys.readouterr()
  summary = json.loads(captured.out.splitlines()[-1])
  return official, ours, exported, summary, captured.err


def _assert_equal_tensors(written, official, prefix_written, prefix_official):
  for name, value in written.items():
    assert name.startswith(prefix_written), name
    want = official[prefix_official + name[len(prefix_written) :]]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want, np.float32), err_msg=name)


def _read_back(exported, config):
  """Our tower params from the export, through the official importer (official_towers)."""
  hf_config = ckpt_io.read_config(exported)
  trainables = dict(
      ckpt_io.open_files([os.path.join(exported, export_official.TRAINABLES_FILE)]).items()
  )
  fields, extra = official_towers.tower_configs(hf_config, trainables, search_dirs=[exported])
  read_config = UniMoEConfig(decoder=config.decoder, **fields)
  state = {k: v.load() if hasattr(v, 'load') else v for k, v in {**trainables, **extra}.items()}
  params = official_towers.tower_params(state, read_config)
  # The vision projector is read by official.py (beside the decoder), with this converter.
  params['vision_projector'] = convert_clip.projector_params_from_hf(
      state, hf_config['mm_projector_type'], prefix=official_towers.VISION_PROJECTOR_PREFIX
  )
  return read_config, params


@pytest.mark.parametrize('kind', ['speech', 'audio'])
def test_towers_and_connectors_export_in_the_official_layout(
    tmp_path, capsys, tokenizer_path, towers, kind  # pylint: disable=redefined-outer-name
):  # pylint: disable=redefined-outer-name
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  official, ours, exported, summary, log = _export(tmp_path, capsys, tokenizer_path, towers, kind)
  config, params = checkpoints.restore_model(ours)
  audio_file = export_official.SPEECH_TOWER_DIR if kind == 'speech' else export_official.BEATS_FILE
  assert sorted(summary['files']) == sorted(
      [
          'model.safetensors',
          'tokenizer.model',
          export_official.VISION_TOWER_DIR,
          audio_file,
          export_official.TRAINABLES_FILE,
      ]
  ), summary
  assert summary['not_exported'] == []
  hf_config = json.load(open(os.path.join(exported, 'config.json')))
  assert hf_config['architectures'] == ['MixtralForCausalLM']
  assert {
      k: hf_config[k]
      for k in (
          'mm_vision_tower',
          'mm_audio_tower',
          'mm_vision_select_layer',
          'mm_projector_type',
          'query_tokens_size',
          'audio_projector_type',
      )
  } == {
      'mm_vision_tower': 'vision_tower',
      'mm_audio_tower': audio_file,
      'mm_vision_select_layer': -2,
      'mm_projector_type': 'mlp2x_gelu',
      'query_tokens_size': 4,
      'audio_projector_type': 'linear' if kind == 'speech' else 'mlp2x_gelu',
  }

  # The connectors: every trained official tensor, bit for bit, nothing else.
  trainables = {
      k: v.numpy()
      for k, v in torch.load(
          os.path.join(exported, export_official.TRAINABLES_FILE), weights_only=True
      ).items()
  }
  connectors = {
      k for k in official if not k.startswith(('model.vision_tower.', 'model.audio_tower.'))
  }
  if kind == 'speech':
    connectors.discard(WHISPER_ALIGNER + 'embed_tokens.weight')
  assert sorted(trainables) == sorted(connectors)
  _assert_equal_tensors(trainables, official, '', '')

  # The vision tower: CLIPVisionModel names, every tensor the tower computes with.
  clip = safetensors.numpy.load_file(os.path.join(exported, 'vision_tower', 'model.safetensors'))
  _assert_equal_tensors(clip, official, 'vision_model.', CLIP)
  assert sorted(
      'vision_model.' + k[len(CLIP) :]
      for k in official
      if k.startswith(CLIP) and not k[len(CLIP) :].startswith(_CLIP_DROPPED)
  ) == sorted(clip)

  if kind == 'speech':
    whisper = safetensors.numpy.load_file(
        os.path.join(exported, 'speech_tower', 'model.safetensors')
    )
    positions = 'model.encoder.embed_positions.weight'
    np.testing.assert_allclose(
        whisper.pop(positions), official[AUDIO_TOWER + 'embed_positions.weight'], atol=1e-6
    )
    _assert_equal_tensors(whisper, official, 'model.encoder.', AUDIO_TOWER)
    assert len(whisper) + 1 == len([k for k in official if k.startswith(AUDIO_TOWER)])
  else:
    beats = torch.load(os.path.join(exported, 'BEATs.pt'), weights_only=True)
    assert beats_config_from_official(beats['cfg']) == config.audio_encoder
    state = {k: v.numpy() for k, v in beats['model'].items()}
    assert sorted(state) == sorted(
        k[len(AUDIO_TOWER) :] for k in official if k.startswith(AUDIO_TOWER)
    )
    g, v = (state.pop('encoder.pos_conv.0.weight_' + s) for s in 'gv')
    want = convert_beats.fold_weight_norm(
        official[AUDIO_TOWER + 'encoder.pos_conv.0.weight_g'],
        official[AUDIO_TOWER + 'encoder.pos_conv.0.weight_v'],
    )
    err = np.abs(convert_beats.fold_weight_norm(g, v) - want).max()
    print(f'BEATs pos_conv: folded kernel of the export vs the official one: {err:.2e}')
    assert err <= 1e-6 * np.abs(want).max()
    _assert_equal_tensors(state, official, '', AUDIO_TOWER)

  # Read back through the official importer: our params again.
  read_config, read_params = _read_back(exported, config)
  for key, tree in read_params.items():
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree_util.tree_leaves(params[key])
    ):
      where = key + jax.tree_util.keystr(path)
      if where == "audio_encoder['pos_conv']['kernel']":
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
      else:
        np.testing.assert_array_equal(got, want, err_msg=where)
  assert sorted(read_params) == sorted(k for k in params if k != 'decoder')
  assert read_config.vision == config.vision
  assert (read_config.speech_encoder, read_config.audio_encoder) == (
      config.speech_encoder,
      config.audio_encoder,
  )
  assert 'not exported' not in log


def test_transformers_loads_the_tower_directories_and_the_decoder(
    tmp_path, capsys, tokenizer_path, towers
):  # pylint: disable=redefined-outer-name
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  _, _, exported, _, _ = _export(tmp_path, capsys, tokenizer_path, towers, 'speech')
  rng = np.random.default_rng(0)
  pixels = torch.from_numpy(rng.normal(size=(2, 3, 16, 16)).astype(np.float32))
  # Eager attention, as the original towers (sdpa rounds differently, ~2e-7).
  clip = transformers.CLIPVisionModel.from_pretrained(
      os.path.join(exported, 'vision_tower'), attn_implementation='eager'
  )
  with torch.no_grad():
    got = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    want = towers.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
  np.testing.assert_array_equal(got.numpy(), want.numpy())
  whisper = transformers.WhisperModel.from_pretrained(
      os.path.join(exported, 'speech_tower'), attn_implementation='eager'
  )
  mel = torch.from_numpy(rng.normal(size=(2, 8, 20)).astype(np.float32))
  with torch.no_grad():
    got = whisper.encoder(mel).last_hidden_state
    want = towers.whisper.encoder(mel).last_hidden_state
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6)
  # The decoder's directory, with the official mm_* fields in its config.json, still loads.
  decoder = transformers.AutoModelForCausalLM.from_pretrained(exported)
  assert type(decoder).__name__ == 'MixtralForCausalLM'
