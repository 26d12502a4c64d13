"""tools/convert_checkpoint.py + unimoe_jax.score: HF and official Uni-MoE directories end to end."""

import io as std_io
import json
import os
import sys

import numpy as np
import pytest

from hf_reference import logits as hf_logits
from hf_reference import state_dict_numpy, tiny_llama, tiny_mixtral

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tools'))
import convert_checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from unimoe_jax import checkpoint, score  # pylint: disable=g-import-not-at-top,wrong-import-position

_CORPUS = ['the cat sat on the mat', 'a dog ran in the park', 'the sun is hot today',
           'we like to read books', 'birds fly over the sea']
TEXT = 'the cat ran over the park'


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  spm = pytest.importorskip('sentencepiece')
  model = std_io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_CORPUS * 10), model_writer=model, vocab_size=60,
      model_type='bpe', unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  path = str(tmp_path_factory.mktemp('spm') / 'tokenizer.model')
  with open(path, 'wb') as f:
    f.write(model.getvalue())
  return path


def _randomize(model):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.1)
  return model


def _score(capsys, ckpt, vocab=None):
  capsys.readouterr()
  assert score.main(['--checkpoint', ckpt, '--text', TEXT] +
                    (['--vocab', vocab] if vocab else [])) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert 'logprob' not in records[0] and records[0]['token'] == 1
  return [r['token'] for r in records], np.array([r['logprob'] for r in records[1:]])


def _reference_logprobs(model, tokens):
  logits = hf_logits(model, [tokens])[0].astype(np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  return np.array([logp[i, tokens[i + 1]] for i in range(len(tokens) - 1)])


@pytest.mark.parametrize('kind,layout', [('llama', 'safetensors'), ('mixtral', 'sharded'),
                                         ('llama', 'bin')])
def test_hf_directory_scores_like_transformers(tmp_path, capsys, tokenizer_path, kind, layout):
  import torch  # pylint: disable=g-import-not-at-top
  model, _ = (tiny_llama if kind == 'llama' else tiny_mixtral)(num_hidden_layers=2)
  _randomize(model)
  src = tmp_path / 'src'
  if layout == 'bin':
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / 'pytorch_model.bin')
  else:
    model.save_pretrained(src, max_shard_size='40KB' if layout == 'sharded' else '50GB')
  if layout == 'sharded':
    assert any(n.endswith('.index.json') for n in os.listdir(src)), os.listdir(src)
  with open(tokenizer_path, 'rb') as f, open(src / 'tokenizer.model', 'wb') as g:
    g.write(f.read())
  out = str(tmp_path / 'out')
  assert convert_checkpoint.main(['--source', 'hf', '--input', str(src), '--output', out]) == 0
  summary = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert summary['peak_rss_mib'] > 0 and summary['tokenizer_copied']
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
  model, config = tiny_mixtral(num_hidden_layers=2)
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
      module = name[:-len('.weight')]
      lora[f'{module}.lora_A.weight'] = rng.normal(0, 0.1, (RANK, in_dim)).astype(np.float32)
      lora[f'{module}.lora_B.weight'] = rng.normal(0, 0.1, (out_dim, RANK)).astype(np.float32)
  # The merged weights, back into the HF model as the reference.
  merged = dict(official)
  for name in lora:
    if name.endswith('.lora_A.weight'):
      module = name[:-len('.lora_A.weight')]
      merged[f'{module}.weight'] = official[f'{module}.weight'] + (ALPHA / RANK) * (
          lora[f'{module}.lora_B.weight'] @ lora[name])
  new_sd = {}
  for name in sd:
    if '.experts.gate_up_proj' in name:
      p = name.replace('.gate_up_proj', '')
      new_sd[name] = np.stack([np.concatenate([merged[f'{p}.{e}.gate_proj.weight'],
                                               merged[f'{p}.{e}.up_proj.weight']])
                               for e in range(config.num_local_experts)])
    elif '.experts.down_proj' in name:
      p = name.replace('.down_proj', '')
      new_sd[name] = np.stack([merged[f'{p}.{e}.down_proj.weight']
                               for e in range(config.num_local_experts)])
    else:
      new_sd[name] = merged[name]
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in new_sd.items()})
  projector = {'model.mm_projector.0.weight': rng.normal(0, 0.1, (64, 24)).astype(np.float32),
               'model.mm_projector.0.bias': rng.normal(0, 0.1, (64,)).astype(np.float32),
               'model.mm_projector.2.weight': rng.normal(0, 0.1, (64, 64)).astype(np.float32),
               'model.mm_projector.2.bias': rng.normal(0, 0.1, (64,)).astype(np.float32)}
  src = tmp_path / 'official'
  src.mkdir()
  # PEFT's spelling: base_model.model.<name>, base weights under .base_layer.
  peft = {}
  for name, value in {**official, **lora}.items():
    if name.endswith('_proj.weight'):
      name = name[:-len('.weight')] + '.base_layer.weight'
    peft['base_model.model.' + name] = value
  if rename:
    peft[rename[1]] = peft.pop(rename[0])
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in peft.items()},
                              str(src / 'model.safetensors'))
  torch.save({k: torch.from_numpy(v) for k, v in projector.items()},
             src / 'non_lora_trainables.bin')
  hf_cfg = {k: v for k, v in config.to_dict().items()
            if k not in ('num_local_experts', 'architectures')}
  hf_cfg.update(model_type='llava', moe={'enabled': True}, num_experts=4, num_experts_per_tok=2,
                mm_projector_type='mlp2x_gelu', mm_hidden_size=24)
  (src / 'config.json').write_text(json.dumps(hf_cfg))
  (src / 'adapter_config.json').write_text(json.dumps(
      {'r': RANK, 'lora_alpha': ALPHA, 'lora_dropout': 0.05, 'peft_type': 'LORA'}))
  with open(tokenizer_path, 'rb') as fi, open(src / 'tokenizer.model', 'wb') as fo:
    fo.write(fi.read())
  return str(src), model


def test_official_layout_merged_and_kept_lora(tmp_path, capsys, tokenizer_path):
  src, reference = _official_dir(tmp_path, tokenizer_path)
  merged_out, kept_out = str(tmp_path / 'merged'), str(tmp_path / 'kept')
  assert convert_checkpoint.main(['--source', 'unimoe', '--input', src, '--output', merged_out,
                                  '--merge_lora']) == 0
  assert convert_checkpoint.main(['--source', 'unimoe', '--input', src,
                                  '--output', kept_out]) == 0
  params, gin_text = checkpoint.restore(kept_out)
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
  src, _ = _official_dir(tmp_path, tokenizer_path,
                         rename=(bad, bad.replace('k_proj', 'key_proj')))
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match=r'model\.layers\.1\.self_attn\.k_proj\.weight'):
    convert_checkpoint.main(['--source', 'unimoe', '--input', src, '--output', str(out),
                             '--merge_lora'])
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.out')]


