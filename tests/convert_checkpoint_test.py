"""tools/convert_checkpoint.py + unimoe_jax.score: HF and official Uni-MoE directories end to
end."""

import json
import os
import re
import shutil
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from encoders_beats_test import TINY_CFG as BEATS_CFG
from encoders_beats_test import official_state_dict as beats_official_state_dict
from hf_reference import logits as hf_logits
from hf_reference import randomize, state_dict_numpy, tiny_llama, tiny_mixtral
from hf_reference import tiny_config, torch_and_transformers
from tool_runs import run_convert
from unimoe_jax import checkpoints, network, score
from unimoe_jax.convert import clip as convert_clip
from unimoe_jax.convert import whisper as convert_whisper
from unimoe_jax.network import UniMoE

import generate_test

_CORPUS = generate_test.CORPUS[:5]  # Its plain sentences, without the chat template's.
TEXT = 'the cat ran over the park'


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  pytest.importorskip('sentencepiece')
  from unimoe_jax.data import vocabulary  # pylint: disable=g-import-not-at-top

  # SentencePiece's own normalisation and no byte fallback: a plain tokenizer, unlike LLaMA's.
  return vocabulary.train_sentencepiece(
      _CORPUS * 10,
      str(tmp_path_factory.mktemp('spm') / 'tokenizer.model'),
      vocab_size=60,
      byte_fallback=False,
      normalization_rule_name='nmt_nfkc',
      remove_extra_whitespaces=True,
  )


def _score(capsys, ckpt, vocab=None):
  capsys.readouterr()
  assert (
      score.main(['--checkpoint', ckpt, '--text', TEXT] + (['--vocab', vocab] if vocab else []))
      == 0
  )
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert 'logprob' not in records[0] and records[0]['token'] == 1
  return [r['token'] for r in records], np.array([r['logprob'] for r in records[1:]])


def _reference_logprobs(model, tokens):
  logits = hf_logits(model, [tokens])[0].astype(np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  return np.array([logp[i, tokens[i + 1]] for i in range(len(tokens) - 1)])


@pytest.mark.parametrize(
    'kind,layout,scan',
    [
        ('llama', 'safetensors', False),
        ('mixtral', 'sharded', False),
        ('llama', 'bin', False),
        ('mixtral', 'safetensors', True),
    ],
)
def test_hf_directory_scores_like_transformers(
    tmp_path, capsys, tokenizer_path, kind, layout, scan
):
  """scan: written with --scan_layers (stacked layers, config.gin scan_layers = True)."""
  import torch  # pylint: disable=g-import-not-at-top

  model, _ = (tiny_llama if kind == 'llama' else tiny_mixtral)(num_hidden_layers=2)
  randomize(model)
  src = tmp_path / 'src'
  if layout == 'bin':
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / 'pytorch_model.bin')
  else:
    model.save_pretrained(src, max_shard_size='40KB' if layout == 'sharded' else '50GB')
  if layout == 'sharded':
    assert any(n.endswith('.index.json') for n in os.listdir(src)), os.listdir(src)
  shutil.copy(tokenizer_path, src / 'tokenizer.model')
  if scan:  # One case also carries a tokenizer_config.json (its `legacy` flag) along.
    (src / 'tokenizer_config.json').write_text(json.dumps({'legacy': False}))
  out = str(tmp_path / 'out')
  assert run_convert(*(['--scan_layers'] if scan else []), source='hf', input=src, output=out) == 0
  summary = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert summary['peak_rss_mib'] > 0 and summary['tokenizer_copied']
  stored, gin_text = checkpoints.restore(out)
  assert ('stacked_layers' in stored['decoder']) == scan
  assert ('layers_0' in stored['decoder']) == (not scan)
  assert ('scan_layers = True' in gin_text) == scan
  assert os.path.exists(os.path.join(out, 'tokenizer_config.json')) == scan
  tokens, ours = _score(capsys, out)
  assert len(tokens) > 4
  expected = _reference_logprobs(model, tokens)
  assert np.abs(ours - expected).max() < 1e-4, np.abs(ours - expected).max()


# ---------------------------------------------------------------------------------------------
# The official Uni-MoE layout, written from a tiny Mixtral's weights plus random LoRA adapters.

RANK, ALPHA = 4, 8.0


def _official_dir(tmp_path, tokenizer_path, rename=None):
  """(directory, HF reference model with the adapters merged in)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  # rope_theta 10000: the official rotary embedding ignores config.json's rope_theta.
  model, config = tiny_mixtral(num_hidden_layers=2, rope_theta=10000.0)
  # Copies: state_dict_numpy shares memory with the parameters that load_state_dict overwrites.
  sd = {k: v.copy() for k, v in state_dict_numpy(model).items()}
  f = config.intermediate_size
  rng = np.random.default_rng(0)
  official = {}
  lora = {}
  for name, value in sd.items():
    if '.experts.gate_up_proj' in name:
      p = name.replace('.gate_up_proj', '')
      for e in range(value.shape[0]):
        official[f'{p}.{e}.gate_proj.weight'] = value[e, :f]
        official[f'{p}.{e}.up_proj.weight'] = value[e, f:]
    elif '.experts.down_proj' in name:
      p = name.replace('.down_proj', '')
      for e in range(value.shape[0]):
        official[f'{p}.{e}.down_proj.weight'] = value[e]
    else:
      official[name] = value
  for name in list(official):
    if name.endswith('_proj.weight'):  # Every LLM Linear but the router and lm_head.
      out_dim, in_dim = official[name].shape
      module = name[: -len('.weight')]
      lora[f'{module}.lora_A.weight'] = rng.normal(0, 0.1, (RANK, in_dim)).astype(np.float32)
      lora[f'{module}.lora_B.weight'] = rng.normal(0, 0.1, (out_dim, RANK)).astype(np.float32)
  # The merged weights, back into the HF model as the reference.
  merged = dict(official)
  for name in lora:
    if name.endswith('.lora_A.weight'):
      module = name[: -len('.lora_A.weight')]
      merged[f'{module}.weight'] = official[f'{module}.weight'] + (ALPHA / RANK) * (
          lora[f'{module}.lora_B.weight'] @ lora[name]
      )
  new_sd = {}
  for name in sd:
    if '.experts.gate_up_proj' in name:
      p = name.replace('.gate_up_proj', '')
      new_sd[name] = np.stack(
          [
              np.concatenate(
                  [merged[f'{p}.{e}.gate_proj.weight'], merged[f'{p}.{e}.up_proj.weight']]
              )
              for e in range(config.num_local_experts)
          ]
      )
    elif '.experts.down_proj' in name:
      p = name.replace('.down_proj', '')
      new_sd[name] = np.stack(
          [merged[f'{p}.{e}.down_proj.weight'] for e in range(config.num_local_experts)]
      )
    else:
      new_sd[name] = merged[name]
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in new_sd.items()})
  projector = {
      'model.mm_projector.0.weight': rng.normal(0, 0.1, (64, 24)).astype(np.float32),
      'model.mm_projector.0.bias': rng.normal(0, 0.1, (64,)).astype(np.float32),
      'model.mm_projector.2.weight': rng.normal(0, 0.1, (64, 64)).astype(np.float32),
      'model.mm_projector.2.bias': rng.normal(0, 0.1, (64,)).astype(np.float32),
  }
  src = tmp_path / 'official'
  src.mkdir()
  # PEFT's spelling: base_model.model.<name>, base weights under .base_layer.
  peft = {}
  for name, value in {**official, **lora}.items():
    if name.endswith('_proj.weight'):
      name = name[: -len('.weight')] + '.base_layer.weight'
    peft['base_model.model.' + name] = value
  if rename:
    peft[rename[1]] = peft.pop(rename[0])
  safetensors.numpy.save_file(
      {k: np.ascontiguousarray(v) for k, v in peft.items()}, str(src / 'model.safetensors')
  )
  torch.save(
      {k: torch.from_numpy(v) for k, v in projector.items()}, src / 'non_lora_trainables.bin'
  )
  hf_cfg = {
      k: v for k, v in config.to_dict().items() if k not in ('num_local_experts', 'architectures')
  }
  hf_cfg.update(
      model_type='llava',
      moe={'enabled': True},
      num_experts=4,
      num_experts_per_tok=2,
      mm_projector_type='mlp2x_gelu',
      mm_hidden_size=24,
  )
  (src / 'config.json').write_text(json.dumps(hf_cfg))
  (src / 'adapter_config.json').write_text(
      json.dumps({'r': RANK, 'lora_alpha': ALPHA, 'lora_dropout': 0.05, 'peft_type': 'LORA'})
  )
  shutil.copy(tokenizer_path, src / 'tokenizer.model')
  return str(src), model


def test_official_layout_merged_and_kept_lora(tmp_path, capsys, tokenizer_path):
  src, reference = _official_dir(tmp_path, tokenizer_path)
  merged_out, kept_out = str(tmp_path / 'merged'), str(tmp_path / 'kept')
  # --dtype float32: the 4-expert router runs in the model dtype (MoEConfig.router_dtype), and
  # score.py's float32 does not change it.
  assert (
      run_convert('--merge_lora', source='unimoe', input=src, output=merged_out, dtype='float32')
      == 0
  )
  assert run_convert(source='unimoe', input=src, output=kept_out, dtype='float32') == 0
  params, gin_text = checkpoints.restore(kept_out)
  assert 'config.LoRAConfig' in gin_text and 'config.MoEConfig' in gin_text
  assert params['decoder']['layers_0']['moe']['wi_0']['lora_a'].shape == (4, 64, RANK)
  assert params['vision_projector']['linear_0']['kernel'].shape == (24, 64)
  tokens, merged = _score(capsys, merged_out)
  _, kept = _score(capsys, kept_out)
  expected = _reference_logprobs(reference, tokens)
  assert np.abs(merged - expected).max() < 1e-4, np.abs(merged - expected).max()
  assert np.abs(kept - merged).max() < 1e-4, np.abs(kept - merged).max()


def test_official_renamed_tensor_fails_and_writes_nothing(tmp_path, tokenizer_path):
  bad = 'base_model.model.model.layers.1.self_attn.k_proj.base_layer.weight'
  src, _ = _official_dir(tmp_path, tokenizer_path, rename=(bad, bad.replace('k_proj', 'key_proj')))
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match=r'model\.layers\.1\.self_attn\.k_proj\.weight'):
    run_convert('--merge_lora', source='unimoe', input=src, output=out)
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.out')]


# ---------------------------------------------------------------------------------------------
# Towers and aligners under their official names: the CLIP tower and the Whisper speech modules
# of Uni_MoE_speech, or the BEATs + Q-Former audio modules of Uni_MoE_audio, added to the
# official directory above (tower tensors in the PEFT-wrapped model file, the aligner and its
# query tokens in mm_audio_aligner.bin, as the official training writes them).

CLIP = 'model.vision_tower.vision_tower.vision_model.'
AUDIO_TOWER = 'model.audio_tower.audio_tower.'
WHISPER_ALIGNER = 'model.mm_audio_aligner.decoder.audio_decoder.'
QFORMER = 'model.mm_audio_aligner.qformer.qformer.'
NUM_QUERY = 4
TOL = 1e-4  # float32


def _perturb(model, seed):
  """Real values everywhere (LayerNorms near 1), keeping Whisper's fixed encoder sinusoids."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == 'encoder.embed_positions.weight':
        continue
      p.normal_(0.0, 0.1)
      if re.search(r'(norm\d?|layrnorm|LayerNorm)\.weight$', name):
        p.add_(1.0)
  return model.eval()


def _tiny_hf_model(name, seed, **config):
  """`transformers.{name}Model` of `config` with eager attention, `_perturb`ed with `seed`."""
  _, transformers = torch_and_transformers()
  model_config = getattr(transformers, f'{name}Config')(attn_implementation='eager', **config)
  return _perturb(getattr(transformers, f'{name}Model')(model_config), seed)


def tiny_hf_qformer():
  """A tiny random Blip2QFormerModel over the tiny BEATs: 2 layers, and 12 heads because
  Uni_MoE_audio hard-codes Blip2Config()'s Q-Former head count."""
  return _tiny_hf_model(
      'Blip2QFormer',
      3,
      **tiny_config(
          'blip2_qformer_uni_moe_audio', encoder_hidden_size=BEATS_CFG['encoder_embed_dim']
      ),
  )


@pytest.fixture(scope='module')
def towers(tmp_path_factory):
  """Tiny random CLIP and Whisper towers saved as the official code's tower directories, a tiny
  official BEATs .pt and a tiny Q-Former."""
  import torch  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('towers')
  clip = _tiny_hf_model('CLIPVision', 1, **tiny_config('clip_vision_tower'))
  whisper = _tiny_hf_model('Whisper', 2, **tiny_config('whisper_tower'))
  qformer = tiny_hf_qformer()
  clip.save_pretrained(root / 'clip-vit-tiny')
  whisper.save_pretrained(root / 'whisper-tiny')
  beats_sd = beats_official_state_dict(BEATS_CFG)
  torch.save(
      {'cfg': BEATS_CFG, 'model': {k: torch.tensor(v) for k, v in beats_sd.items()}},
      root / 'BEATs_tiny.pt',
  )
  return types.SimpleNamespace(
      clip=clip,
      whisper=whisper,
      qformer=qformer,
      beats_sd=beats_sd,
      clip_dir=str(root / 'clip-vit-tiny'),
      whisper_dir=str(root / 'whisper-tiny'),
      beats_path=str(root / 'BEATs_tiny.pt'),
  )


def _tower_tensors(towers, kind, with_towers=True):
  """(tower tensors of the model file, mm_audio_aligner.bin tensors, config.json fields)."""
  rng = np.random.default_rng(5)
  model = {}
  if with_towers:
    model = {CLIP + k: v for k, v in state_dict_numpy(towers.clip).items()}
    # A persistent buffer in the transformers 4.3x that the official code ran; dropped.
    model[CLIP + 'embeddings.position_ids'] = np.arange(5, dtype=np.int64)[None]
  fields = dict(
      mm_vision_tower=towers.clip_dir,
      mm_vision_select_layer=-2,
      mm_vision_select_feature='patch',
      query_tokens_size=NUM_QUERY,
      mm_audio_select_layer=0,
      mm_query_tokens=True,
  )
  if kind == 'speech':
    whisper = state_dict_numpy(towers.whisper)
    aligner = {
        WHISPER_ALIGNER + k[len('decoder.') :]: v
        for k, v in whisper.items()
        if k.startswith('decoder.')
    }
    aligner['model.query_tokens'] = rng.normal(0, 0.5, (1, NUM_QUERY, 16)).astype(np.float32)
    aligner['model.mm_audio_aligner.projector.weight'] = rng.normal(0, 0.2, (64, 16))
    aligner['model.mm_audio_aligner.projector.bias'] = rng.normal(0, 0.2, (64,))
    if with_towers:
      for k, v in whisper.items():
        if k.startswith('encoder.'):
          model[AUDIO_TOWER + k[len('encoder.') :]] = v
        # WhisperAudioTower is a WhisperModel: its own encoder and decoder, never run; dropped.
        model['model.audio_tower.' + k] = v
    fields.update(
        mm_audio_tower=towers.whisper_dir, audio_projector_type='linear', mm_audio_hidden_size=16
    )
  else:
    aligner = {QFORMER + k: v for k, v in state_dict_numpy(towers.qformer).items()}
    aligner['model.mm_audio_aligner.query_tokens'] = rng.normal(0, 0.5, (1, NUM_QUERY, 24)).astype(
        np.float32
    )
    for name, shape in (
        ('0.weight', (64, 24)),
        ('0.bias', (64,)),
        ('2.weight', (64, 64)),
        ('2.bias', (64,)),
    ):
      aligner['model.mm_audio_aligner.projector.' + name] = rng.normal(0, 0.2, shape)
    if with_towers:
      model.update({AUDIO_TOWER + k: v for k, v in towers.beats_sd.items()})
    fields.update(
        mm_audio_tower=towers.beats_path, audio_projector_type='mlp2x_gelu', mm_audio_hidden_size=24
    )
  aligner = {
      k: np.asarray(v, np.float32) if v.dtype == np.float64 else v for k, v in aligner.items()
  }
  return model, aligner, fields


def _add_towers(src, towers, kind, rename=None, with_towers=True, **field_overrides):
  """Adds the towers to `_official_dir`'s directory; returns every added tensor by its
  (normalised) official name."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  model, aligner, fields = _tower_tensors(towers, kind, with_towers)
  added = {**model, **aligner}
  if rename:
    for part in (model, aligner):
      if rename[0] in part:
        part[rename[1]] = part.pop(rename[0])
  path = os.path.join(src, 'model.safetensors')
  tensors = safetensors.numpy.load_file(path)
  tensors.update({'base_model.model.' + k: np.ascontiguousarray(v) for k, v in model.items()})
  safetensors.numpy.save_file(tensors, path)
  torch.save(
      {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in aligner.items()},
      os.path.join(src, 'mm_audio_aligner.bin'),
  )
  config_path = os.path.join(src, 'config.json')
  with open(config_path) as f:
    config = json.load(f)
  config.update(fields, **field_overrides)
  with open(config_path, 'w') as f:
    json.dump(config, f)
  return added


def _flat_shapes(tree):
  return {
      jax.tree_util.keystr(k): tuple(np.shape(v))
      for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _batch(cfg, media, seed=0):
  """One row: text, an image, text, one item of `media` ('speech' or 'audio'), text."""
  rng = np.random.default_rng(seed)
  text = lambda n: list(rng.integers(3, 90, n))  # pylint: disable=unnecessary-lambda-assignment
  tokens = (
      [1]
      + text(3)
      + [cfg.image_token_id] * cfg.num_soft_tokens('image')
      + text(3)
      + [cfg.token_id(media)] * cfg.num_soft_tokens(media)
      + text(4)
  )
  size = cfg.vision.image_size
  if media == 'speech':
    shape = (2 * cfg.speech_encoder.max_source_positions, cfg.speech_encoder.num_mel_bins)
  else:
    shape = (3 * cfg.audio_encoder.input_patch_size, cfg.audio_encoder.num_mel_bins)
  return {
      'decoder_input_tokens': np.asarray([tokens], np.int32),
      'image_features': rng.normal(size=(1, 1, size, size, 3)).astype(np.float32),
      'image_mask': np.ones((1, 1), bool),
      f'{media}_features': rng.normal(size=(1, 1) + shape).astype(np.float32),
      f'{media}_mask': np.ones((1, 1), bool),
  }


def _check_tree_and_forward(cfg, params, media):
  """The params tree is exactly `UniMoE(cfg).init`'s, and a forward pass with an image and one
  `media` item runs, with both inputs reaching the logits after them."""
  batch = _batch(cfg, media)
  abstract = jax.eval_shape(lambda: UniMoE(cfg).init(jax.random.PRNGKey(0), batch))
  assert _flat_shapes(params) == _flat_shapes(nn.meta.unbox(abstract['params']))
  network.check_placeholders(cfg, batch)
  forward = jax.jit(lambda p, b: UniMoE(cfg).apply({'params': p}, b)[0])
  logits = np.asarray(forward(params, batch))
  assert logits.shape == batch['decoder_input_tokens'].shape + (cfg.decoder.vocab_size,)
  assert np.isfinite(logits).all()
  for key in ('image_features', f'{media}_features'):
    other = np.asarray(forward(params, dict(batch, **{key: -batch[key]})))
    assert np.abs(other[0, -4:] - logits[0, -4:]).max() > 1e-3, key


def test_official_speech_towers_map_match_transformers_and_run(
    tmp_path, capsys, tokenizer_path, towers
):
  src, _ = _official_dir(tmp_path, tokenizer_path)
  sd = _add_towers(src, towers, 'speech')
  out = str(tmp_path / 'out')
  capsys.readouterr()
  assert run_convert('--merge_lora', source='unimoe', input=src, output=out, dtype='float32') == 0
  summary = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert summary['modalities'] == ['image', 'video', 'speech']
  raw, gin_text = checkpoints.restore(out)
  assert 'MODEL_CONFIG' in gin_text and 'whisper.WhisperEncoderConfig' in gin_text
  cfg, params = checkpoints.restore_model(out)
  assert cfg.vision.num_used_layers == 1 and cfg.num_soft_tokens('image') == 4
  assert cfg.num_soft_tokens('speech') == NUM_QUERY and cfg.speech_projector == 'linear'
  assert cfg.audio_encoder is None and cfg.vision_projector == 'mlp2x_gelu'

  # (a) The documented mapping, for representative tensors: Conv2d -> [p, p, 3, width],
  # Conv1d -> [taps, in, out], Linear [out, in] -> [in, (heads, head_dim) or out].
  np.testing.assert_array_equal(
      raw['vision_tower']['patch_embedding']['kernel'],
      sd[CLIP + 'embeddings.patch_embedding.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
      raw['vision_tower']['layers_0']['attention']['query']['kernel'],
      sd[CLIP + 'encoder.layers.0.self_attn.q_proj.weight'].T.reshape(24, 4, 6),
  )
  assert 'layers_1' not in raw['vision_tower']  # After mm_vision_select_layer = -2.
  np.testing.assert_array_equal(
      raw['speech_encoder']['conv1']['kernel'], sd[AUDIO_TOWER + 'conv1.weight'].transpose(2, 1, 0)
  )
  np.testing.assert_array_equal(
      raw['speech_encoder']['layers_0']['attn']['key']['kernel'],
      sd[AUDIO_TOWER + 'layers.0.self_attn.k_proj.weight'].T.reshape(16, 2, 8),
  )
  np.testing.assert_array_equal(raw['speech_aligner']['query_tokens'], sd['model.query_tokens'][0])
  np.testing.assert_array_equal(
      raw['speech_aligner']['layers_1']['cross_attn']['value']['kernel'],
      sd[WHISPER_ALIGNER + 'layers.1.encoder_attn.v_proj.weight'].T.reshape(16, 2, 8),
  )
  np.testing.assert_array_equal(
      raw['speech_aligner']['position_embedding'], sd[WHISPER_ALIGNER + 'embed_positions.weight']
  )
  np.testing.assert_array_equal(
      raw['speech_projector']['linear_0']['kernel'], sd['model.mm_audio_aligner.projector.weight'].T
  )

  # Against transformers: the CLIP tower's hidden state -2 without the class token, and the
  # official speech path (Whisper encoder, its decoder on the query tokens, the Linear).
  import torch  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  pixels = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    hidden = (
        towers.clip(
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True
        )
        .hidden_states[-2][:, 1:]
        .numpy()
    )

  def _connect(module, modality, x):
    return module._connect(modality, x, None)  # pylint: disable=protected-access

  connect = jax.jit(
      lambda p, x, m: UniMoE(cfg).apply({'params': p}, m, x, method=_connect), static_argnums=2
  )
  ours = UniMoE(cfg).apply(
      {'params': params}, pixels, method=lambda module, x: module.vision_tower(x)
  )
  assert np.abs(np.asarray(ours) - hidden).max() < TOL
  mel = rng.normal(size=(2, 20, 8)).astype(np.float32)
  with torch.no_grad():
    encoded = towers.whisper.encoder(torch.from_numpy(mel.transpose(0, 2, 1))).last_hidden_state
    queries = torch.from_numpy(np.repeat(sd['model.query_tokens'], 2, axis=0))
    aligned = towers.whisper.decoder(
        inputs_embeds=queries, encoder_hidden_states=encoded, use_cache=False
    ).last_hidden_state.numpy()
  expected = (
      aligned @ sd['model.mm_audio_aligner.projector.weight'].T
      + sd['model.mm_audio_aligner.projector.bias']
  )
  err = np.abs(np.asarray(connect(params, mel, 'speech')) - expected).max()
  assert err < TOL, err

  # (b) Exactly UniMoE(config).init's tree, and a forward pass with an image and speech.
  _check_tree_and_forward(cfg, params, 'speech')


def test_official_audio_towers_beats_qformer(tmp_path, capsys, tokenizer_path, towers):
  import torch  # pylint: disable=g-import-not-at-top

  src, _ = _official_dir(tmp_path, tokenizer_path)
  sd = _add_towers(src, towers, 'audio')
  out = str(tmp_path / 'out')
  assert run_convert(source='unimoe', input=src, output=out, dtype='float32') == 0
  raw, gin_text = checkpoints.restore(out)
  assert 'beats.BEATsConfig' in gin_text and 'qformer.QFormerConfig' in gin_text
  cfg, params = checkpoints.restore_model(out)
  assert cfg.modalities == ('image', 'video', 'audio') and cfg.audio_projector == 'mlp2x_gelu'
  assert cfg.audio_qformer.num_layers == 2 and cfg.audio_qformer.num_heads == 12
  np.testing.assert_array_equal(
      raw['audio_encoder']['layers_1']['mlp']['fc1']['kernel'],
      sd[AUDIO_TOWER + 'encoder.layers.1.fc1.weight'].T,
  )
  np.testing.assert_array_equal(
      raw['audio_qformer']['query_tokens'], sd['model.mm_audio_aligner.query_tokens'][0]
  )
  np.testing.assert_array_equal(
      raw['audio_qformer']['layers_0']['cross_attention']['key']['kernel'],
      sd[QFORMER + 'encoder.layer.0.crossattention.attention.key.weight'].T.reshape(32, 12, 2),
  )
  np.testing.assert_array_equal(
      raw['audio_projector']['linear_2']['kernel'],
      sd['model.mm_audio_aligner.projector.2.weight'].T,
  )
  # The Q-Former against transformers' Blip2QFormerModel on the same query tokens.
  states = np.random.default_rng(4).normal(size=(2, 6, 32)).astype(np.float32)
  query = np.repeat(sd['model.mm_audio_aligner.query_tokens'], 2, axis=0)
  with torch.no_grad():
    expected = towers.qformer(
        query_embeds=torch.from_numpy(query), encoder_hidden_states=torch.from_numpy(states)
    ).last_hidden_state
  ours = UniMoE(cfg).apply(
      {'params': params}, states, method=lambda module, x: module.audio_qformer(x)
  )
  err = np.abs(np.asarray(ours) - expected.numpy()).max()
  assert err < TOL, err
  _check_tree_and_forward(cfg, params, 'audio')


def test_official_towers_read_from_tower_directories(tmp_path, tokenizer_path, towers):
  """The released checkpoints hold no tower tensors: the towers come from the directories that
  config.json names, here found beside the checkpoint (the README's checkpoint/ layout)."""
  src, _ = _official_dir(tmp_path, tokenizer_path)
  for name in ('clip-vit-tiny', 'whisper-tiny'):
    shutil.copytree(getattr(towers, name.split('-')[0] + '_dir'), tmp_path / name)
  _add_towers(
      src,
      towers,
      'speech',
      with_towers=False,
      mm_vision_tower='checkpoints/clip-vit-tiny',
      mm_audio_tower='openai/whisper-tiny',
  )
  out = str(tmp_path / 'out')
  assert run_convert('--merge_lora', source='unimoe', input=src, output=out) == 0
  raw, _ = checkpoints.restore(out)
  cfg, _ = checkpoints.restore_model(out)
  want_vision = convert_clip.params_from_hf(state_dict_numpy(towers.clip), cfg.vision, prefix='')
  want_speech = convert_whisper.encoder_params_from_hf(
      state_dict_numpy(towers.whisper), cfg.speech_encoder
  )
  jax.tree_util.tree_map(np.testing.assert_array_equal, raw['vision_tower'], want_vision)
  jax.tree_util.tree_map(np.testing.assert_array_equal, raw['speech_encoder'], want_speech)
  # Without the tower directories the speech modules cannot be sized: a clear error, no output.
  shutil.rmtree(tmp_path / 'whisper-tiny')
  with pytest.raises(ValueError, match=r"mm_audio_tower='openai/whisper-tiny'.*--audio_tower"):
    run_convert('--merge_lora', source='unimoe', input=src, output=tmp_path / 'out2')
  assert not (tmp_path / 'out2').exists()


@pytest.mark.parametrize(
    'bad',
    [
        CLIP + 'encoder.layers.0.mlp.fc1.weight',  # In the PEFT-wrapped model file.
        WHISPER_ALIGNER + 'layers.0.encoder_attn.k_proj.weight',  # In mm_audio_aligner.bin.
    ],
)
def test_official_renamed_tower_tensor_fails_and_writes_nothing(
    tmp_path, tokenizer_path, towers, bad
):
  src, _ = _official_dir(tmp_path, tokenizer_path)
  _add_towers(src, towers, 'speech', rename=(bad, bad.replace('.weight', '_renamed.weight')))
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match=re.escape(repr(bad))):
    run_convert('--merge_lora', source='unimoe', input=src, output=out)
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.out')]
