"""tools/convert_checkpoint.py --to hf (unimoe_jax/convert/export_hf.py): our checkpoints as
Hugging Face LLaMA / Mixtral directories; HF -> ours -> HF bit-exact, transformers logits."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
import flax.linen as nn

from hf_reference import logits as hf_logits
from hf_reference import randomize, state_dict_numpy, tiny_llama, tiny_mixtral
from tool_runs import convert_checkpoint, run_convert
from unimoe_jax import checkpoints, layer_stacking
from unimoe_jax.config import LoRAConfig
from unimoe_jax.convert import export_hf
from unimoe_jax.convert import hf as convert_hf
from unimoe_jax.decoder import Decoder

TOL = 1e-5
TOKENS = np.random.RandomState(0).randint(0, 97, size=(2, 12)).astype(np.int32)


def _tensors(directory):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith('.safetensors'):
      out.update(load_file(os.path.join(directory, name)))
  return out


def _load_hf(directory):
  import transformers  # pylint: disable=g-import-not-at-top

  return transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation='eager'
  ).eval()


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.splitlines()[-1])


@pytest.mark.parametrize('kind,scan', [('llama', False), ('mixtral', False), ('mixtral', True)])
def test_round_trip_is_bit_exact_and_transformers_loads_it(tmp_path, capsys, kind, scan):
  model, _ = (tiny_llama if kind == 'llama' else tiny_mixtral)(num_hidden_layers=2)
  randomize(model)
  src, ours, out = (str(tmp_path / n) for n in ('src', 'ours', 'out'))
  model.save_pretrained(src)
  with open(os.path.join(src, 'tokenizer.model'), 'wb') as f:
    f.write(b'not a real sentencepiece model: only copied')
  flags = ['--scan_layers'] if scan else []
  assert run_convert(*flags, source='hf', input=src, output=ours, dtype='float32') == 0
  capsys.readouterr()
  assert run_convert(to='hf', input=ours, output=out) == 0
  summary = _last_json(capsys)
  assert summary['architecture'] == (
      'LlamaForCausalLM' if kind == 'llama' else 'MixtralForCausalLM'
  )
  assert summary['notes'] == [] and summary['lora'] is None
  before, after = _tensors(src), _tensors(out)
  assert sorted(before) == sorted(after)
  for name, value in before.items():
    assert after[name].dtype == value.dtype and np.array_equal(after[name], value), name
  with open(os.path.join(out, 'tokenizer.model'), 'rb') as f:
    assert f.read().startswith(b'not a real')
  exported = _load_hf(out)
  assert type(exported).__name__ == type(model).__name__
  err = np.abs(hf_logits(exported, TOKENS) - hf_logits(model, TOKENS)).max()
  assert err == 0.0, err  # Same weights, same class: the same logits.


def test_fused_in_memory_mixtral_names_import_like_the_files(tmp_path):
  """transformers 5's in-memory names (mlp.gate, fused experts) and the files' per-expert
  names give the same params, and the export reproduces the files."""
  model, config = tiny_mixtral(num_hidden_layers=2)
  cfg = convert_hf.config_from_hf(config.to_dict(), dtype='float32')
  from_memory = convert_hf.decoder_params_from_hf(state_dict_numpy(model), cfg)
  model.save_pretrained(str(tmp_path))
  files = _tensors(str(tmp_path))
  from_files = convert_hf.decoder_params_from_hf(files, cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_memory, from_files)
  back = dict(export_hf.state_dict(from_memory, cfg))
  assert sorted(back) == sorted(files)
  for name, value in files.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def _lora_checkpoint(tmp_path, kind, targets, scan=False):
  """(our checkpoint dir, DecoderConfig with LoRA, our logits on TOKENS): a tiny HF model's
  weights plus random adapters."""
  model, config = (tiny_llama if kind == 'llama' else tiny_mixtral)(num_hidden_layers=2)
  randomize(model)
  lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=targets)
  cfg = convert_hf.config_from_hf(config.to_dict(), dtype='float32', lora=lora)
  base = convert_hf.decoder_params_from_hf(state_dict_numpy(model), cfg)
  abstract = jax.eval_shape(
      lambda: Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  )['params']
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract))
  flat_base = traverse_util.flatten_dict(base)
  rng = np.random.default_rng(0)
  for path, leaf in flat.items():
    if path[-1] in ('lora_a', 'lora_b'):
      flat_base[path] = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
  assert set(flat_base) == set(flat)
  params = traverse_util.unflatten_dict(flat_base)
  ours, _ = Decoder(cfg).apply(
      {'params': jax.tree_util.tree_map(jnp.asarray, params)}, jnp.asarray(TOKENS)
  )
  if scan:
    cfg = dataclasses.replace(cfg, scan_layers=True)
    params = layer_stacking.to_config_layout(params, cfg)
  directory = str(tmp_path / f'ours_{kind}')
  checkpoints.save(directory, {'decoder': params}, convert_checkpoint.gin_config_text(cfg, 'test'))
  return directory, cfg, np.asarray(ours)


def _apply_peft(model, adapter_dir):
  """W += (lora_alpha / r) * B @ A for every adapted module, as PEFT's merge does."""
  import torch  # pylint: disable=g-import-not-at-top

  with open(os.path.join(adapter_dir, 'adapter_config.json')) as f:
    config = json.load(f)
  scale = config['lora_alpha'] / config['r']
  tensors = _tensors(adapter_dir)
  modules = {k[: -len('.lora_A.weight')] for k in tensors if k.endswith('.lora_A.weight')}
  assert modules and all(m.split('.')[-1] in config['target_modules'] for m in modules)
  params = dict(model.named_parameters())
  with torch.no_grad():
    for m in modules:
      name = m[len(export_hf.PEFT_PREFIX) :] + '.weight'
      delta = tensors[f'{m}.lora_B.weight'] @ tensors[f'{m}.lora_A.weight']
      params[name] += scale * torch.from_numpy(delta)
  return len(modules)


@pytest.mark.parametrize(
    'kind,keep', [('llama', False), ('llama', True), ('mixtral', False), ('mixtral', True)]
)
def test_lora_export_matches_our_logits(tmp_path, capsys, kind, keep):
  """Merged (default): every target incl. experts; kept (PEFT adapter): Mixtral's attention
  adapters (expert adapters cannot be PEFT adapters of transformers 5's fused experts)."""
  targets = ('query', 'key', 'value', 'out', 'mlp', 'experts')
  if kind == 'mixtral' and keep:
    targets = ('query', 'key', 'value', 'out')
  ckpt, cfg, ours = _lora_checkpoint(tmp_path, kind, targets, scan=kind == 'mixtral' and keep)
  out = str(tmp_path / 'out')
  capsys.readouterr()
  assert run_convert(*(['--keep_lora'] if keep else []), to='hf', input=ckpt, output=out) == 0
  summary = _last_json(capsys)
  exported = _load_hf(out)
  if keep:
    assert summary['lora'].startswith('kept')
    base_err = np.abs(hf_logits(exported, TOKENS) - ours).max()
    assert base_err > 1e-3  # The base alone differs: the adapters matter.
    count = _apply_peft(exported, os.path.join(out, export_hf.ADAPTER_DIR))
    assert count == (14 if kind == 'llama' else 8)
  else:
    assert summary['lora'] == 'merged'
  err = np.abs(hf_logits(exported, TOKENS) - ours).max()
  print(f'{kind} keep_lora={keep}: max |logit err| {err:.2e}')
  assert err <= TOL, err


@pytest.mark.parametrize('kind', ['llama', 'mixtral'])
def test_peft_loads_the_kept_adapter(tmp_path, kind):
  """With `peft` installed (not in the default environment: skipped there), PeftModel loads
  OUTPUT/lora_adapter onto the exported base and gives our logits (peft 0.21.2: 4.5e-8 LLaMA,
  5.2e-8 Mixtral attention adapters)."""
  peft = pytest.importorskip('peft')
  import torch  # pylint: disable=g-import-not-at-top

  targets = (
      ('query', 'key', 'value', 'out', 'mlp')
      if kind == 'llama'
      else ('query', 'key', 'value', 'out')
  )
  ckpt, _, ours = _lora_checkpoint(tmp_path, kind, targets)
  out = str(tmp_path / 'out')
  assert run_convert('--keep_lora', to='hf', input=ckpt, output=out) == 0
  model = peft.PeftModel.from_pretrained(
      _load_hf(out), os.path.join(out, export_hf.ADAPTER_DIR)
  ).eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
  err = np.abs(theirs - ours).max()
  assert err <= TOL, err


def test_expert_adapters_cannot_be_kept_and_nothing_is_written(tmp_path):
  ckpt, _, _ = _lora_checkpoint(tmp_path, 'mixtral', ('query', 'experts'))
  out = str(tmp_path / 'out')
  with pytest.raises(ValueError, match=r"LoRAConfig.targets 'experts'"):
    run_convert('--keep_lora', to='hf', input=ckpt, output=out)
  assert not os.path.exists(out)


def test_training_run_directory_is_accepted(tmp_path, capsys):
  """A MODEL_DIR (latest step of checkpoints/<step>/state, MODEL_DIR/config.gin with the
  trainer's configurables) exports like the converted checkpoint holding the same params."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  model, _ = tiny_llama(num_hidden_layers=2)
  src, ours = str(tmp_path / 'src'), str(tmp_path / 'ours')
  model.save_pretrained(src)
  assert run_convert(source='hf', input=src, output=ours, dtype='float32') == 0
  params, gin_text = checkpoints.restore(ours)
  run = tmp_path / 'run'
  for step in (2, 4):
    ocp.PyTreeCheckpointer().save(
        str(run / 'checkpoints' / str(step) / 'state'), {'params': params, 'step': np.int32(step)}
    )
  (run / 'config.gin').write_text(
      gin_text + '\nunknown_trainer_fn.batch_size = 8\nMODEL_DIR = "/somewhere"\n'
  )
  capsys.readouterr()
  assert run_convert(to='hf', input=run, output=tmp_path / 'out') == 0
  summary = _last_json(capsys)
  assert summary['step'] == 4 and any('tokenizer' in n for n in summary['notes'])
  before, after = _tensors(src), _tensors(str(tmp_path / 'out'))
  assert sorted(before) == sorted(after)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_sharded_output_has_an_index(tmp_path):
  model, config = tiny_llama(num_hidden_layers=2)
  cfg = convert_hf.config_from_hf(config.to_dict(), dtype='float32')
  params = convert_hf.decoder_params_from_hf(state_dict_numpy(model), cfg)
  summary = export_hf.export(
      {'decoder': params}, cfg, str(tmp_path / 'out'), max_shard_bytes=40_000
  )
  shards = [f for f in summary['files'] if f.endswith('.safetensors')]
  assert len(shards) > 2 and shards[0] == f'model-00001-of-{len(shards):05d}.safetensors'
  exported = _load_hf(str(tmp_path / 'out'))
  assert np.abs(hf_logits(exported, TOKENS) - hf_logits(model, TOKENS)).max() == 0.0


def test_what_mixtral_cannot_express_is_refused_or_noted(tmp_path):
  _, config = tiny_mixtral(num_hidden_layers=2)
  cfg = convert_hf.config_from_hf(config.to_dict(), dtype='float32')
  for moe, field in (
      (dataclasses.replace(cfg.moe, layers='even'), 'MoEConfig.layers'),
      (
          dataclasses.replace(cfg.moe, second_expert_sampling=True),
          'MoEConfig.second_expert_sampling',
      ),
  ):
    with pytest.raises(ValueError, match=field):
      export_hf.check_exportable(dataclasses.replace(cfg, moe=moe))
  notes = export_hf.check_exportable(
      dataclasses.replace(
          cfg,
          dtype='bfloat16',
          moe=dataclasses.replace(
              cfg.moe, router_dtype='bfloat16', load_balance_loss_form='top1', dispatch='capacity'
          ),
      )
  )
  for field in (
      'MoEConfig.router_dtype',
      'MoEConfig.load_balance_loss_form',
      'MoEConfig.dispatch',
      'DecoderConfig.dtype',
  ):
    assert any(field in n for n in notes), (field, notes)
  # Towers and connectors are reported, not exported.
  _, others = export_hf.decoder_tree(
      {'decoder': {'layers_0': {}}, 'vision_tower': {}, 'vision_projector': {}}
  )
  assert others == ['vision_projector', 'vision_tower']


# ---------------------------------------------------------------------------------------------
# A Hugging Face directory with tokenizer.json only: the SentencePiece model it wraps.

_CORPUS = [
    'the cat sat on the mat',
    'a dog ran in the park',
    'the sun is hot today',
    'we like to read books 123',
    'birds fly over the sea',
]
_TEXTS = _CORPUS + [
    'hello world the cats',
    ' two  spaces ',
    'é中 unseen ✓ chars',
    'numbers 4567 the',
    'thethethe mat',
    '',
]


@pytest.fixture(scope='module')
def spm_model(tmp_path_factory):
  """A LLaMA-like SentencePiece BPE model (byte fallback, identity normalization), as bytes."""
  pytest.importorskip('sentencepiece')
  from unimoe_jax.data import vocabulary  # pylint: disable=g-import-not-at-top

  path = vocabulary.train_sentencepiece(
      _CORPUS * 10,
      str(tmp_path_factory.mktemp('spm') / 'tokenizer.model'),
      vocab_size=330,
      add_dummy_prefix=True,
      split_digits=True,
  )
  with open(path, 'rb') as f:
    return f.read()


def _tokenizer_json(spm_model, style):
  """tokenizer.json as transformers' LlamaConverter writes it: BPE with the merges of every
  split of every piece, ordered by the piece's score; 'legacy' escapes spaces in a normalizer,
  'metaspace' in a Metaspace pre-tokenizer (legacy=False)."""
  tokenizers = pytest.importorskip('tokenizers')
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  proto = sentencepiece_model_pb2.ModelProto.FromString(spm_model)
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  scores = {p.piece: p.score for p in proto.pieces}
  merges = []
  for piece in vocab:
    local = [
        (piece[:k], piece[k:], scores[piece])
        for k in range(1, len(piece))
        if piece[:k] in vocab and piece[k:] in vocab
    ]
    merges += sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
  merges = [(a, b) for a, b, _ in sorted(merges, key=lambda x: x[2], reverse=True)]
  tok = tokenizers.Tokenizer(
      tokenizers.models.BPE(vocab, merges, unk_token='<unk>', fuse_unk=True, byte_fallback=True)
  )
  tok.add_special_tokens(
      [tokenizers.AddedToken(t, normalized=False, special=True) for t in ('<unk>', '<s>', '</s>')]
  )
  if style == 'legacy':
    tok.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.Prepend('\u2581'), tokenizers.normalizers.Replace(' ', '\u2581')]
    )
  else:
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(
        replacement='\u2581', prepend_scheme='first', split=False
    )
  return tok.to_str()


@pytest.mark.parametrize('style', ['legacy', 'metaspace'])
def test_tokenizer_json_rebuilds_the_sentencepiece_model(tmp_path, spm_model, style):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from unimoe_jax.data import vocabulary  # pylint: disable=g-import-not-at-top

  path = tmp_path / 'tokenizer.json'
  path.write_text(_tokenizer_json(spm_model, style))
  original = spm.SentencePieceProcessor(model_proto=spm_model)
  rebuilt = spm.SentencePieceProcessor(
      model_proto=vocabulary.sentencepiece_from_tokenizer_json_file(str(path))
  )
  n = original.get_piece_size()
  assert rebuilt.get_piece_size() == n
  assert [rebuilt.id_to_piece(i) for i in range(n)] == [original.id_to_piece(i) for i in range(n)]
  assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.unk_id()) == (1, 2, 0)
  for text in _TEXTS:
    assert rebuilt.encode(text) == original.encode(text), text
  vocab = vocabulary.get_vocabulary(str(path))  # A tokenizer.json path works directly.
  assert list(vocab.encode(_TEXTS[0])) == original.encode(_TEXTS[0])


def test_tokenizer_json_that_wraps_no_sentencepiece_model_says_why(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  from unimoe_jax.data import vocabulary  # pylint: disable=g-import-not-at-top

  byte_level = tokenizers.Tokenizer(tokenizers.models.BPE({'a': 0, 'b': 1, 'ab': 2}, [('a', 'b')]))
  byte_level.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
  with pytest.raises(ValueError, match='ByteLevel'):
    vocabulary.sentencepiece_from_tokenizer_json(json.loads(byte_level.to_str()))
  unigram = tokenizers.Tokenizer(tokenizers.models.Unigram([('<unk>', 0.0), ('a', -1.0)], 0))
  with pytest.raises(ValueError, match="model type 'Unigram'"):
    vocabulary.sentencepiece_from_tokenizer_json(json.loads(unigram.to_str()))


def test_hf_directory_with_tokenizer_json_only(tmp_path, capsys, spm_model):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  model, _ = tiny_llama(num_hidden_layers=2)
  src, ours = tmp_path / 'src', str(tmp_path / 'ours')
  model.save_pretrained(str(src))
  (src / 'tokenizer.json').write_text(_tokenizer_json(spm_model, 'legacy'))
  (src / 'tokenizer_config.json').write_text(json.dumps({'legacy': True}))
  capsys.readouterr()
  assert run_convert(source='hf', input=src, output=ours) == 0
  summary = _last_json(capsys)
  assert summary['tokenizer_from_json'] and any('rebuilt' in n for n in summary['notes'])
  rebuilt = spm.SentencePieceProcessor(model_file=os.path.join(ours, 'tokenizer.model'))
  original = spm.SentencePieceProcessor(model_proto=spm_model)
  assert all(rebuilt.encode(t) == original.encode(t) for t in _TEXTS)
  assert os.path.exists(os.path.join(ours, 'tokenizer_config.json'))
