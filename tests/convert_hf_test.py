"""Our decoder against tiny random Hugging Face LLaMA and Mixtral models (float32)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax.config import MoEConfig
from unimoe_jax.convert import hf as convert_hf
from unimoe_jax.decoder import Decoder

import hf_reference

TOL = 1e-4


def _ours(hf_model, hf_config, **overrides):
  cfg = convert_hf.config_from_hf(hf_config.to_dict(), dtype='float32', **overrides)
  params = convert_hf.decoder_params_from_hf(hf_reference.state_dict_numpy(hf_model), cfg)
  return Decoder(cfg), jax.tree_util.tree_map(jnp.asarray, params)


def _tokens(batch=2, length=16, vocab=97, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, size=(batch, length)).astype(np.int32)


def test_llama_logits_match_transformers():
  hf_model, hf_config = hf_reference.tiny_llama()
  model, params = _ours(hf_model, hf_config)
  tokens = _tokens()
  ours, aux = model.apply({'params': params}, jnp.asarray(tokens))
  theirs = hf_reference.logits(hf_model, tokens)
  assert aux == {}
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0)
  assert np.abs(theirs).max() > 1e-2  # The comparison is not between two near-zero arrays.


def test_llama_packed_segments_equal_separate_sequences():
  """Two sequences packed in one row give each sequence's own logits (segment mask + positions)."""
  hf_model, hf_config = hf_reference.tiny_llama()
  model, params = _ours(hf_model, hf_config)
  a, b = _tokens(1, 9, seed=1), _tokens(1, 7, seed=2)
  packed = np.concatenate([a, b], axis=1)
  segments = np.array([[1] * 9 + [2] * 7], np.int32)
  positions = np.array([list(range(9)) + list(range(7))], np.int32)
  ours, _ = model.apply(
      {'params': params},
      jnp.asarray(packed),
      segment_ids=jnp.asarray(segments),
      positions=jnp.asarray(positions),
  )
  np.testing.assert_allclose(np.asarray(ours)[:, :9], hf_reference.logits(hf_model, a), atol=TOL)
  np.testing.assert_allclose(np.asarray(ours)[:, 9:], hf_reference.logits(hf_model, b), atol=TOL)


@pytest.mark.parametrize('dispatch', ['dense', 'capacity', 'dropless'])
def test_mixtral_logits_match_transformers(dispatch):
  hf_model, hf_config = hf_reference.tiny_mixtral()
  moe = MoEConfig(
      num_experts=4, num_experts_per_tok=2, dispatch=dispatch, capacity_factor=4.0
  )  # Capacity for every assignment: nothing dropped.
  model, params = _ours(hf_model, hf_config, moe=moe)
  tokens = _tokens()
  ours, aux = model.apply({'params': params}, jnp.asarray(tokens))
  theirs = hf_reference.logits(hf_model, tokens)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0)
  assert float(aux['drop_fraction']) == 0.0
  assert aux['expert_fraction'].shape == (2, 4)


def test_converter_names_missing_and_unexpected_tensors():
  hf_model, hf_config = hf_reference.tiny_llama()
  sd = hf_reference.state_dict_numpy(hf_model)
  sd['model.layers.1.self_attn.q_proj.weight_renamed'] = sd.pop(
      'model.layers.1.self_attn.q_proj.weight'
  )
  cfg = convert_hf.config_from_hf(hf_config.to_dict(), dtype='float32')
  with pytest.raises(ValueError, match=r'q_proj\.weight.*q_proj\.weight_renamed'):
    convert_hf.decoder_params_from_hf(sd, cfg)


def test_converter_names_wrong_shape():
  hf_model, hf_config = hf_reference.tiny_llama()
  sd = hf_reference.state_dict_numpy(hf_model)
  sd['model.norm.weight'] = sd['model.norm.weight'][:10]
  cfg = convert_hf.config_from_hf(hf_config.to_dict(), dtype='float32')
  with pytest.raises(ValueError, match=r'model\.norm\.weight: expected shape \(64,\)'):
    convert_hf.decoder_params_from_hf(sd, cfg)


@pytest.mark.parametrize('cut', ['4 bytes', 'in the header', 'in the data'])
def test_a_truncated_weight_file_is_named(tmp_path, cut):
  """Issue 21: a truncated safetensors file gave a bare struct / JSON / mmap error."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from unimoe_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top

  path = str(tmp_path / 'model.safetensors')
  save_file({'a': np.ones((4, 8), np.float32), 'b': np.zeros(3, np.float32)}, path)
  size = os.path.getsize(path)
  keep = {'4 bytes': 4, 'in the header': 20, 'in the data': size - 8}[cut]
  with open(path, 'r+b') as f:
    f.truncate(keep)
  with pytest.raises(ValueError) as error:
    convert_io.file_entries(path)
  assert str(error.value).startswith(f'{path}: '), str(error.value)
  assert 'truncated or damaged?' in str(error.value)
  if cut == 'in the data':
    assert 'tensor ' in str(error.value)  # Names the tensor that lies past the end.


def test_a_truncated_torch_file_is_named(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  from unimoe_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top

  path = str(tmp_path / 'pytorch_model.bin')
  torch.save({'a': torch.ones(64, 64)}, path)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match=f'^{path}: not a readable PyTorch checkpoint file'):
    convert_io.file_entries(path)
