"""Hugging Face Whisper state dicts <-> `WhisperEncoder` and `WhisperAligner` parameters (numpy).

Both halves come from the same Whisper checkpoint, as in the official Uni-MoE code (the encoder is
`WhisperModel.encoder`, the aligner's decoder is `WhisperModel.decoder`). A converter reads only
the tensors under its prefix, so one full state dict serves both calls; within the prefix every
tensor must be used and every expected tensor present (ValueError naming them otherwise).

Prefixes: `model.encoder.` / `model.decoder.` (WhisperForConditionalGeneration) or `encoder.` /
`decoder.` (WhisperModel); `prefix=None` picks whichever the state dict has. An official Uni-MoE
checkpoint keeps the aligner's decoder under `model.mm_audio_aligner.decoder.audio_decoder.` and the
queries as `model.query_tokens` `[1, num_query, d_model]` (pass that array as `query_tokens`).

The inverses (`encoder_params_to_hf`, `aligner_params_to_hf`, `config_to_hf`) write what the
readers read: every tensor bit for bit, the encoder's `embed_positions.weight` as the sinusoids
the module computes, and no `embed_tokens` (the aligner never looks a token up).
"""

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from unimoe_jax.connectors.whisper_aligner import WhisperAlignerConfig
from unimoe_jax.convert.common import TensorReader, TensorWriter
from unimoe_jax.convert.common import fields_from_hf, fields_to_hf, hf_activation, ours_activation
from unimoe_jax.encoders.whisper import WhisperEncoderConfig, sinusoids

# A checkpoint's fixed encoder positions are Whisper's sinusoids up to float32 rounding of the
# argument (~1e-4 at position 1500); a trained or different table is far off.
_SINUSOID_ATOL = 1e-3

# WhisperEncoderConfig field -> WhisperConfig key, both directions.
_ENCODER_FIELDS = {
    'num_mel_bins': 'num_mel_bins',
    'd_model': 'd_model',
    'num_layers': 'encoder_layers',
    'num_heads': 'encoder_attention_heads',
    'ffn_dim': 'encoder_ffn_dim',
    'max_source_positions': 'max_source_positions',
}
# The decoder's layer sizes: WhisperAlignerConfig's fields (WhisperEncoderConfig's have the same
# names) -> WhisperConfig keys. The aligner's d_model is the encoder's (one WhisperConfig key).
_DECODER_LAYER_FIELDS = {
    'num_layers': 'decoder_layers',
    'num_heads': 'decoder_attention_heads',
    'ffn_dim': 'decoder_ffn_dim',
}
_WHISPER_MAX_TARGET_POSITIONS = 448  # Whisper's; config_to_hf writes it when given no aligner.


def _activation_from_hf(hf: Mapping[str, Any]) -> str:
  return ours_activation(hf.get('activation_function', 'gelu'), 'activation_function')


def encoder_config_from_hf(hf: Mapping[str, Any], **overrides) -> WhisperEncoderConfig:
  """A WhisperEncoderConfig from a Hugging Face `WhisperConfig.to_dict()`."""
  fields = dict(fields_from_hf(hf, _ENCODER_FIELDS), act=_activation_from_hf(hf))
  return WhisperEncoderConfig(**{**fields, **overrides})


def aligner_config_from_hf(
    hf: Mapping[str, Any], num_query_tokens: int = 50, **overrides
) -> WhisperAlignerConfig:
  """A WhisperAlignerConfig from a Hugging Face `WhisperConfig.to_dict()` (decoder sizes)."""
  fields = dict(
      fields_from_hf(hf, _DECODER_LAYER_FIELDS),
      num_query_tokens=num_query_tokens,
      d_model=hf['d_model'],
      max_target_positions=hf['max_target_positions'],
      act=_activation_from_hf(hf),
  )
  return WhisperAlignerConfig(**{**fields, **overrides})


# Whisper's multilingual vocabulary and special ids (openai/whisper-*; HF WhisperConfig). The
# aligner never embeds a token, but a WhisperModel directory needs them to be built.
_WHISPER_TOKEN_IDS = dict(
    vocab_size=51865,
    pad_token_id=50257,
    bos_token_id=50257,
    eos_token_id=50257,
    decoder_start_token_id=50258,
)
_HF_LAYER_NORM_EPS = 1e-5  # WhisperEncoderLayer / WhisperDecoderLayer use nn.LayerNorm's default.


def config_to_hf(
    encoder: WhisperEncoderConfig, aligner: Optional[WhisperAlignerConfig] = None
) -> Dict[str, Any]:
  """A `WhisperConfig.to_dict()`-style dict for a WhisperModel holding `encoder` and, when
  given, `aligner` as its decoder (else a decoder of the encoder's sizes, which nothing reads).
  Raises ValueError for what a WhisperConfig cannot say: a LayerNorm epsilon other than 1e-5,
  a non-causal aligner, different activations or widths in the two halves."""
  for name, cfg in (('WhisperEncoderConfig', encoder), ('WhisperAlignerConfig', aligner)):
    if cfg is not None and cfg.layer_norm_eps != _HF_LAYER_NORM_EPS:
      raise ValueError(
          f'{name}.layer_norm_eps={cfg.layer_norm_eps}: Hugging Face Whisper '
          f'always uses {_HF_LAYER_NORM_EPS}'
      )
  if aligner is not None:
    if not aligner.causal:
      raise ValueError(
          'WhisperAlignerConfig.causal=False: a Hugging Face WhisperDecoder is ' 'always causal'
      )
    if aligner.act != encoder.act or aligner.d_model != encoder.d_model:
      raise ValueError(
          f'WhisperAlignerConfig (act={aligner.act!r}, d_model={aligner.d_model}) '
          f'and WhisperEncoderConfig (act={encoder.act!r}, d_model='
          f'{encoder.d_model}) must agree: one WhisperConfig holds both'
      )
  return dict(
      model_type='whisper',
      **fields_to_hf(encoder, _ENCODER_FIELDS),
      activation_function=hf_activation(encoder.act, 'WhisperEncoderConfig.act'),
      **fields_to_hf(encoder if aligner is None else aligner, _DECODER_LAYER_FIELDS),
      max_target_positions=(
          _WHISPER_MAX_TARGET_POSITIONS if aligner is None else aligner.max_target_positions
      ),
      **_WHISPER_TOKEN_IDS,
  )


def _choose_prefix(
    state_dict: Mapping[str, np.ndarray], prefix: Optional[str], candidates: Sequence[str]
) -> str:
  if prefix is not None:
    if not any(k.startswith(prefix) for k in state_dict):
      raise ValueError(f'no tensor in the state dict starts with prefix {prefix!r}')
    return prefix
  for candidate in candidates:
    if any(k.startswith(candidate) for k in state_dict):
      return candidate
  raise ValueError(
      f'no tensor in the state dict starts with any of {list(candidates)}; ' 'pass `prefix`'
  )


def _reader(state_dict: Mapping[str, np.ndarray], prefix: str) -> TensorReader:
  return TensorReader({k: v for k, v in state_dict.items() if k.startswith(prefix)})


def _attention(r: TensorReader, name: str, d: int, heads: int) -> Dict[str, Any]:
  """WhisperAttention (no key bias) -> MultiHeadAttention `[embed, heads, head_dim]` kernels."""
  hd = d // heads
  return {
      'query': r.linear(f'{name}.q_proj', (d,), (heads, hd)),
      'key': r.linear(f'{name}.k_proj', (d,), (heads, hd), bias=False),
      'value': r.linear(f'{name}.v_proj', (d,), (heads, hd)),
      'out': r.linear(f'{name}.out_proj', (heads, hd), (d,)),
  }


def _mlp(r: TensorReader, p: str, d: int, f: int) -> Dict[str, Any]:
  return {'fc1': r.linear(f'{p}.fc1', (d,), (f,)), 'fc2': r.linear(f'{p}.fc2', (f,), (d,))}


# Each layer's parts: our name -> (the HF submodule, which converter); read by both directions.
# The MLP's fc1 / fc2 sit on the layer itself ('' submodule).
_ENCODER_LAYER = {
    'attn_norm': ('self_attn_layer_norm', 'layer_norm'),
    'attn': ('self_attn', 'attention'),
    'mlp_norm': ('final_layer_norm', 'layer_norm'),
    'mlp': ('', 'mlp'),
}
_ALIGNER_LAYER = {
    'self_attn_norm': ('self_attn_layer_norm', 'layer_norm'),
    'self_attn': ('self_attn', 'attention'),
    'cross_attn_norm': ('encoder_attn_layer_norm', 'layer_norm'),
    'cross_attn': ('encoder_attn', 'attention'),
    'mlp_norm': ('final_layer_norm', 'layer_norm'),
    'mlp': ('', 'mlp'),
}


def _submodule(layer: str, name: str) -> str:
  return f'{layer}.{name}' if name else layer


def _layer_from_hf(
    r: TensorReader, layer: str, parts: Mapping[str, Tuple[str, str]], d: int, f: int, h: int
) -> Dict[str, Any]:
  read = {
      'layer_norm': lambda name: r.layer_norm(name, d),
      'attention': lambda name: _attention(r, name, d, h),
      'mlp': lambda name: _mlp(r, name, d, f),
  }
  return {ours: read[kind](_submodule(layer, theirs)) for ours, (theirs, kind) in parts.items()}


def _conv(r: TensorReader, name: str, c_in: int, c_out: int) -> Dict[str, np.ndarray]:
  """torch Conv1d weight `[out, in, taps]` -> Dense kernel `[taps, in, out]`."""
  w = r.pop(f'{name}.weight', (c_out, c_in, 3))
  return {
      'kernel': np.ascontiguousarray(w.transpose(2, 1, 0)),
      'bias': r.pop(f'{name}.bias', (c_out,)),
  }


def encoder_params_from_hf(
    state_dict: Mapping[str, np.ndarray], config: WhisperEncoderConfig, prefix: Optional[str] = None
) -> Dict[str, Any]:
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
      'final_norm': r.layer_norm(f'{prefix}layer_norm', d),
  }
  name = f'{prefix}embed_positions.weight'
  table = r.pop(name, (config.max_source_positions, d))
  if name not in r.missing:
    err = float(np.max(np.abs(table - sinusoids(config.max_source_positions, d))))
    if err > _SINUSOID_ATOL:
      raise ValueError(
          f"{name} is not Whisper's fixed sinusoid table (max abs difference "
          f'{err:.3g}); WhisperEncoder computes its positions and cannot load it'
      )
  for i in range(config.num_layers):
    params[f'layers_{i}'] = _layer_from_hf(r, f'{prefix}layers.{i}', _ENCODER_LAYER, d, f, h)
  r.finish()
  return params


def aligner_params_from_hf(
    state_dict: Mapping[str, np.ndarray],
    config: WhisperAlignerConfig,
    prefix: Optional[str] = None,
    query_tokens: Optional[Any] = None,
    seed: int = 0,
    init_std: float = 0.02,
) -> Dict[str, Any]:
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
      raise ValueError(
          f'query_tokens: expected shape {(n, d)} (or {(1, n, d)}), got '
          f'{np.shape(query_tokens)}'
      )
  params: Dict[str, Any] = {
      'query_tokens': queries,
      'position_embedding': r.pop(
          f'{prefix}embed_positions.weight', (config.max_target_positions, d)
      ),
      'final_norm': r.layer_norm(f'{prefix}layer_norm', d),
  }
  for i in range(config.num_layers):
    params[f'layers_{i}'] = _layer_from_hf(r, f'{prefix}layers.{i}', _ALIGNER_LAYER, d, f, h)
  r.finish()
  return params


def _attention_to_hf(w: TensorWriter, name: str, p: Mapping[str, Any], d: int, heads: int):
  """`_attention`'s inverse (Whisper's key projection has no bias)."""
  hd = d // heads
  w.linear(f'{name}.q_proj', p['query'], (d,), (heads, hd))
  w.linear(f'{name}.k_proj', p['key'], (d,), (heads, hd), bias=False)
  w.linear(f'{name}.v_proj', p['value'], (d,), (heads, hd))
  w.linear(f'{name}.out_proj', p['out'], (heads, hd), (d,))


def _mlp_to_hf(w: TensorWriter, name: str, p: Mapping[str, Any], d: int, f: int):
  w.linear(f'{name}.fc1', p['fc1'], (d,), (f,))
  w.linear(f'{name}.fc2', p['fc2'], (f,), (d,))


def _layer_to_hf(
    w: TensorWriter,
    layer: str,
    params: Mapping[str, Any],
    parts: Mapping[str, Tuple[str, str]],
    d: int,
    f: int,
    h: int,
):
  """`_layer_from_hf`'s inverse."""
  write = {
      'layer_norm': lambda name, p: w.layer_norm(name, p, d),
      'attention': lambda name, p: _attention_to_hf(w, name, p, d, h),
      'mlp': lambda name, p: _mlp_to_hf(w, name, p, d, f),
  }
  for ours, (theirs, kind) in parts.items():
    write[kind](_submodule(layer, theirs), params[ours])


def _conv_to_hf(w: TensorWriter, name: str, p: Mapping[str, Any], c_in: int, c_out: int):
  """Dense kernel `[taps, in, out]` -> torch Conv1d weight `[out, in, taps]`."""
  kernel = w.checked(f'{name}.weight (our kernel)', p['kernel'], (3, c_in, c_out))
  w.put(f'{name}.weight', kernel.transpose(2, 1, 0), (c_out, c_in, 3))
  w.put(f'{name}.bias', p['bias'], (c_out,))


def encoder_params_to_hf(
    params: Mapping[str, Any], config: WhisperEncoderConfig, prefix: str = 'model.encoder.'
) -> Dict[str, np.ndarray]:
  """`encoder_params_from_hf`'s inverse: `WhisperEncoder` params -> the HF tensors under
  `prefix` ('model.encoder.' is WhisperForConditionalGeneration's and a saved WhisperModel's
  layout), with `embed_positions.weight` = `sinusoids(max_source_positions, d_model)`."""
  w = TensorWriter()
  d, f, h = config.d_model, config.ffn_dim, config.num_heads
  _conv_to_hf(w, f'{prefix}conv1', params['conv1'], config.num_mel_bins, d)
  _conv_to_hf(w, f'{prefix}conv2', params['conv2'], d, d)
  w.put(
      f'{prefix}embed_positions.weight',
      sinusoids(config.max_source_positions, d),
      (config.max_source_positions, d),
  )
  for i in range(config.num_layers):
    _layer_to_hf(w, f'{prefix}layers.{i}', params[f'layers_{i}'], _ENCODER_LAYER, d, f, h)
  w.layer_norm(f'{prefix}layer_norm', params['final_norm'], d)
  return w.state_dict


def aligner_params_to_hf(
    params: Mapping[str, Any], config: WhisperAlignerConfig, prefix: str = 'model.decoder.'
) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
  """`aligner_params_from_hf`'s inverse: `WhisperAligner` params -> `(the Whisper decoder's
  tensors under prefix, query_tokens [1, num_query, d_model])`. No `embed_tokens.weight` is
  written (the aligner has none); the caller names the queries (Uni-MoE: `model.query_tokens`).
  """
  w = TensorWriter()
  d, f, h, n = config.d_model, config.ffn_dim, config.num_heads, config.num_query_tokens
  queries = w.checked('query_tokens', params['query_tokens'], (n, d)).reshape(1, n, d)
  w.put(
      f'{prefix}embed_positions.weight',
      params['position_embedding'],
      (config.max_target_positions, d),
  )
  for i in range(config.num_layers):
    _layer_to_hf(w, f'{prefix}layers.{i}', params[f'layers_{i}'], _ALIGNER_LAYER, d, f, h)
  w.layer_norm(f'{prefix}layer_norm', params['final_norm'], d)
  return w.state_dict, np.ascontiguousarray(queries)
