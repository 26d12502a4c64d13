"""Hugging Face Whisper state dicts -> `WhisperEncoder` and `WhisperAligner` parameters (numpy).

Both halves come from the same Whisper checkpoint, as in the official Uni-MoE code (the encoder is
`WhisperModel.encoder`, the aligner's decoder is `WhisperModel.decoder`). A converter reads only
the tensors under its prefix, so one full state dict serves both calls; within the prefix every
tensor must be used and every expected tensor present (ValueError naming them otherwise).

Prefixes: `model.encoder.` / `model.decoder.` (WhisperForConditionalGeneration) or `encoder.` /
`decoder.` (WhisperModel); `prefix=None` picks whichever the state dict has. An official Uni-MoE
checkpoint keeps the aligner's decoder under `model.mm_audio_aligner.decoder.audio_decoder.` and the
queries as `model.query_tokens` `[1, num_query, d_model]` (pass that array as `query_tokens`).
"""

from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from unimoe_jax.connectors.whisper_aligner import WhisperAlignerConfig
from unimoe_jax.convert.common import TensorReader, linear_kernel
from unimoe_jax.encoders.whisper import WhisperEncoderConfig, sinusoids

# A checkpoint's fixed encoder positions are Whisper's sinusoids up to float32 rounding of the
# argument (~1e-4 at position 1500); a trained or different table is far off.
_SINUSOID_ATOL = 1e-3


def encoder_config_from_hf(hf: Mapping[str, Any], **overrides) -> WhisperEncoderConfig:
  """A WhisperEncoderConfig from a Hugging Face `WhisperConfig.to_dict()`."""
  fields = dict(
      num_mel_bins=hf['num_mel_bins'], d_model=hf['d_model'], num_layers=hf['encoder_layers'],
      num_heads=hf['encoder_attention_heads'], ffn_dim=hf['encoder_ffn_dim'],
      max_source_positions=hf['max_source_positions'],
      act=hf.get('activation_function', 'gelu'))
  fields.update(overrides)
  return WhisperEncoderConfig(**fields)


def aligner_config_from_hf(hf: Mapping[str, Any], num_query_tokens: int = 50,
                           **overrides) -> WhisperAlignerConfig:
  """A WhisperAlignerConfig from a Hugging Face `WhisperConfig.to_dict()` (decoder sizes)."""
  fields = dict(
      num_query_tokens=num_query_tokens, d_model=hf['d_model'], num_layers=hf['decoder_layers'],
      num_heads=hf['decoder_attention_heads'], ffn_dim=hf['decoder_ffn_dim'],
      max_target_positions=hf['max_target_positions'],
      act=hf.get('activation_function', 'gelu'))
  fields.update(overrides)
  return WhisperAlignerConfig(**fields)


def _choose_prefix(state_dict: Mapping[str, np.ndarray], prefix: Optional[str],
                   candidates: Sequence[str]) -> str:
  if prefix is not None:
    if not any(k.startswith(prefix) for k in state_dict):
      raise ValueError(f'no tensor in the state dict starts with prefix {prefix!r}')
    return prefix
  for candidate in candidates:
    if any(k.startswith(candidate) for k in state_dict):
      return candidate
  raise ValueError(f'no tensor in the state dict starts with any of {list(candidates)}; '
                   'pass `prefix`')


def _reader(state_dict: Mapping[str, np.ndarray], prefix: str) -> TensorReader:
  return TensorReader({k: v for k, v in state_dict.items() if k.startswith(prefix)})


def _layer_norm(r: TensorReader, name: str, d: int) -> Dict[str, np.ndarray]:
  return {'scale': r.pop(f'{name}.weight', (d,)), 'bias': r.pop(f'{name}.bias', (d,))}


def _dense(r: TensorReader, name: str, d_in: int, d_out: int) -> Dict[str, np.ndarray]:
  return {'kernel': linear_kernel(r.pop(f'{name}.weight', (d_out, d_in))),
          'bias': r.pop(f'{name}.bias', (d_out,))}


def _attention(r: TensorReader, name: str, d: int, heads: int) -> Dict[str, Any]:
  """WhisperAttention (no key bias) -> MultiHeadAttention `[embed, heads, head_dim]` kernels."""
  hd = d // heads
  proj = lambda p: linear_kernel(r.pop(f'{name}.{p}.weight', (d, d)))  # pylint: disable=g-long-lambda
  bias = lambda p: r.pop(f'{name}.{p}.bias', (d,))  # pylint: disable=g-long-lambda
  return {
      'query': {'kernel': proj('q_proj').reshape(d, heads, hd),
                'bias': bias('q_proj').reshape(heads, hd)},
      'key': {'kernel': proj('k_proj').reshape(d, heads, hd)},
      'value': {'kernel': proj('v_proj').reshape(d, heads, hd),
                'bias': bias('v_proj').reshape(heads, hd)},
      'out': {'kernel': proj('out_proj').reshape(heads, hd, d), 'bias': bias('out_proj')},
  }


def _mlp(r: TensorReader, p: str, d: int, f: int) -> Dict[str, Any]:
  return {'fc1': _dense(r, f'{p}.fc1', d, f), 'fc2': _dense(r, f'{p}.fc2', f, d)}


def _conv(r: TensorReader, name: str, c_in: int, c_out: int) -> Dict[str, np.ndarray]:
  """torch Conv1d weight `[out, in, taps]` -> Dense kernel `[taps, in, out]`."""
  w = r.pop(f'{name}.weight', (c_out, c_in, 3))
  return {'kernel': np.ascontiguousarray(w.transpose(2, 1, 0)),
          'bias': r.pop(f'{name}.bias', (c_out,))}


def encoder_params_from_hf(state_dict: Mapping[str, np.ndarray], config: WhisperEncoderConfig,
                           prefix: Optional[str] = None) -> Dict[str, Any]:
  """The `WhisperEncoder` params from the tensors under `prefix` (see the module docstring).

  The checkpoint's `embed_positions.weight` is checked against the sinusoids the module computes
  (ValueError if they differ) and not stored.
  """
  prefix = _choose_prefix(state_dict, prefix, ('model.encoder.', 'encoder.'))
  r = _reader(state_dict, prefix)
  d, f, h = config.d_model, config.ffn_dim, config.num_heads
  params: Dict[str, Any] = {
      'conv1': _conv(r, f'{prefix}conv1', config.num_mel_bins, d),
      'conv2': _conv(r, f'{prefix}conv2', d, d),
      'final_norm': _layer_norm(r, f'{prefix}layer_norm', d),
  }
  name = f'{prefix}embed_positions.weight'
  table = r.pop(name, (config.max_source_positions, d))
  if name not in r.missing:
    err = float(np.max(np.abs(table - sinusoids(config.max_source_positions, d))))
    if err > _SINUSOID_ATOL:
      raise ValueError(f'{name} is not Whisper\'s fixed sinusoid table (max abs difference '
                       f'{err:.3g}); WhisperEncoder computes its positions and cannot load it')
  for i in range(config.num_layers):
    p = f'{prefix}layers.{i}'
    params[f'layers_{i}'] = {
        'attn_norm': _layer_norm(r, f'{p}.self_attn_layer_norm', d),
        'attn': _attention(r, f'{p}.self_attn', d, h),
        'mlp_norm': _layer_norm(r, f'{p}.final_layer_norm', d),
        'mlp': _mlp(r, p, d, f),
    }
  r.finish()
  return params


def aligner_params_from_hf(state_dict: Mapping[str, np.ndarray], config: WhisperAlignerConfig,
                           prefix: Optional[str] = None, query_tokens: Optional[Any] = None,
                           seed: int = 0, init_std: float = 0.02) -> Dict[str, Any]:
  """The `WhisperAligner` params from the Whisper decoder tensors under `prefix`.

  The decoder's token embedding (`embed_tokens.weight`) is deliberately dropped: the aligner feeds
  query tokens as `inputs_embeds` and never looks up a token. `query_tokens`: None draws
  `normal(0, init_std)` with `seed` (the official code starts from zeros and trains them), or an
  array `[num_query, d_model]` / `[1, num_query, d_model]` (the official `model.query_tokens`).
  """
  prefix = _choose_prefix(state_dict, prefix, ('model.decoder.', 'decoder.'))
  r = _reader(state_dict, prefix)
  d, f, h, n = config.d_model, config.ffn_dim, config.num_heads, config.num_query_tokens
  if r.has(f'{prefix}embed_tokens.weight'):
    r.pop(f'{prefix}embed_tokens.weight')  # Unused by the aligner (see the docstring).
  if query_tokens is None:
    queries = np.random.default_rng(seed).normal(0.0, init_std, (n, d)).astype(np.float32)
  else:
    queries = np.asarray(query_tokens, np.float32)
    if queries.ndim == 3 and queries.shape[0] == 1:
      queries = queries[0]
    if queries.shape != (n, d):
      raise ValueError(f'query_tokens: expected shape {(n, d)} (or {(1, n, d)}), got '
                       f'{np.shape(query_tokens)}')
  params: Dict[str, Any] = {
      'query_tokens': queries,
      'position_embedding': r.pop(f'{prefix}embed_positions.weight',
                                  (config.max_target_positions, d)),
      'final_norm': _layer_norm(r, f'{prefix}layer_norm', d),
  }
  for i in range(config.num_layers):
    p = f'{prefix}layers.{i}'
    params[f'layers_{i}'] = {
        'self_attn_norm': _layer_norm(r, f'{p}.self_attn_layer_norm', d),
        'self_attn': _attention(r, f'{p}.self_attn', d, h),
        'cross_attn_norm': _layer_norm(r, f'{p}.encoder_attn_layer_norm', d),
        'cross_attn': _attention(r, f'{p}.encoder_attn', d, h),
        'mlp_norm': _layer_norm(r, f'{p}.final_layer_norm', d),
        'mlp': _mlp(r, p, d, f),
    }
  r.finish()
  return params
