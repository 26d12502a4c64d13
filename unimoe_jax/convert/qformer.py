"""transformers `Blip2QFormerModel` state dicts <-> our `QFormer` parameters (numpy, no torch).

Accepted layouts:
  * a bare `Blip2QFormerModel` state dict (`layernorm.*`, `encoder.layer.{i}.*`), with the
    query tokens passed in or stored as `query_tokens`;
  * the Q-Former inside a bigger state dict, selected by `prefix`: BLIP-2's `qformer.` with
    `query_tokens` beside it, or Uni-MoE's `model.mm_audio_aligner.qformer.qformer.` with
    `model.mm_audio_aligner.query_tokens` two levels up. Tensors outside the prefix (vision
    tower, LLM, the aligner's projector) are left alone.

The text-only FFN (`encoder.layer.{i}.intermediate.*` / `output.*`, present when the HF config
has `use_qformer_text_input`) never runs on query tokens and is dropped.

The inverse, `params_to_hf` / `config_to_hf`, writes every tensor `params_from_hf` reads (the
text FFN is not written: we never had it; the exported config says `use_qformer_text_input=False`
so that transformers builds a model without it) and returns the query tokens separately.
"""

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from unimoe_jax.connectors.qformer import QFormerConfig
from unimoe_jax.convert.common import TensorReader, TensorWriter
from unimoe_jax.convert.common import fields_from_hf, fields_to_hf, hf_activation, ours_activation

# QFormerConfig field -> Blip2QFormerConfig key, both directions.
_HF_FIELDS = {
    'hidden_size': 'hidden_size',
    'num_layers': 'num_hidden_layers',
    'num_heads': 'num_attention_heads',
    'intermediate_size': 'intermediate_size',
    'cross_attention_frequency': 'cross_attention_frequency',
    'encoder_hidden_size': 'encoder_hidden_size',
    'layer_norm_eps': 'layer_norm_eps',
}
_HF_DEFAULTS = {'cross_attention_frequency': 2, 'layer_norm_eps': 1e-12}  # transformers'.


def config_from_hf(
    hf: Mapping[str, Any], num_query_tokens: Optional[int] = None, **overrides
) -> QFormerConfig:
  """A QFormerConfig from `Blip2QFormerConfig.to_dict()` (or a whole `Blip2Config` dict, whose
  `qformer_config` and `num_query_tokens` are used). `num_query_tokens` is required for a bare
  Q-Former config, which does not know it (Uni-MoE audio: 50)."""
  if 'qformer_config' in hf:
    if num_query_tokens is None:
      num_query_tokens = hf.get('num_query_tokens')
    hf = hf['qformer_config']
  if num_query_tokens is None:
    raise ValueError(
        'config_from_hf: num_query_tokens is required for a Q-Former config '
        '(it is a field of the enclosing BLIP-2 / Uni-MoE config)'
    )
  fields = dict(
      fields_from_hf(hf, _HF_FIELDS, _HF_DEFAULTS),
      num_query_tokens=int(num_query_tokens),
      act=ours_activation(hf.get('hidden_act', 'gelu'), 'config_from_hf: hidden_act'),
  )
  return QFormerConfig(**{**fields, **overrides})


def config_to_hf(config: QFormerConfig) -> Dict[str, Any]:
  """Our config -> a `Blip2QFormerConfig.to_dict()`-style dict, `config_from_hf`'s inverse:
  `config_from_hf(config_to_hf(c), num_query_tokens=c.num_query_tokens) == c` (for the default
  `init_std`: it is written as `initializer_range`, which `config_from_hf` does not read).
  `num_query_tokens` is not a Q-Former field; the enclosing config carries it.
  `transformers.Blip2QFormerConfig(**config_to_hf(c))` builds the matching model."""
  return {
      'model_type': 'blip_2_qformer',
      **fields_to_hf(config, _HF_FIELDS),
      'hidden_act': hf_activation(config.act, 'QFormerConfig.act'),
      'initializer_range': config.init_std,
      'use_qformer_text_input': False,  # The text FFN is not exported.
  }


def _query_token_candidates(prefix: str):
  """`query_tokens` inside the prefix, then beside each enclosing module, innermost first."""
  parts = [p for p in prefix.split('.') if p]
  return ['.'.join(parts[:n] + ['query_tokens']) for n in range(len(parts), -1, -1)]


def _pop_query_tokens(
    r: TensorReader,
    state_dict: Mapping[str, np.ndarray],
    prefix: str,
    query_tokens: Union[None, str, np.ndarray],
    cfg: QFormerConfig,
):
  n, d = cfg.num_query_tokens, cfg.hidden_size
  if query_tokens is None or isinstance(query_tokens, str):
    names = [query_tokens] if query_tokens else _query_token_candidates(prefix)
    found = [name for name in names if name in state_dict]
    if not found:
      r.missing.append(names[0] if len(names) == 1 else f'query_tokens (looked for {names})')
      return np.zeros((n, d), np.float32)
    name = found[0]
    value = np.asarray(state_dict[name], np.float32)
    if r.has(name):  # Under the prefix: consume it so that it is not reported as unexpected.
      r.pop(name)
  else:
    name, value = 'query_tokens', np.asarray(query_tokens, np.float32)
  # BLIP-2 and Uni-MoE store `[1, num_query, hidden]`, broadcast over the batch.
  if value.shape not in ((n, d), (1, n, d)):
    raise ValueError(f'{name}: expected shape {(1, n, d)} or {(n, d)}, got {value.shape}')
  return value.reshape(n, d)


def _sizes(config: QFormerConfig) -> Tuple[int, int, int, int, int]:
  """(hidden, heads, head_dim, intermediate, encoder_hidden) of `config`: the tensor shapes'
  sizes both directions check against."""
  return (
      config.hidden_size,
      config.num_heads,
      config.head_dim,
      config.intermediate_size,
      config.encoder_hidden_size,
  )


def params_from_hf(
    state_dict: Mapping[str, np.ndarray],
    config: QFormerConfig,
    prefix: str = '',
    query_tokens: Union[None, str, np.ndarray] = None,
) -> Dict[str, Any]:
  """Converts a `Blip2QFormerModel` state dict into `QFormer` params.

  Args:
    state_dict: tensor name -> numpy array.
    config: our config (`config_from_hf`).
    prefix: prepended to every Q-Former tensor name, e.g. 'qformer.'; with a prefix, tensors
      outside it are ignored.
    query_tokens: `[num_query, hidden]` or `[1, num_query, hidden]` array; or the state-dict
      name of that tensor; or None: `query_tokens` under the prefix or beside any enclosing
      module (`qformer.` -> `query_tokens`).
  Returns:
    A params tree like `nn.meta.unbox(QFormer(config).init(...)['params'])`.
  Raises:
    ValueError naming every missing or unexpected tensor, or a tensor of the wrong shape.
  """
  if prefix and not prefix.endswith('.'):
    prefix += '.'
  r = TensorReader({k: v for k, v in state_dict.items() if k.startswith(prefix)})
  cfg = config
  d, h, hd, f, e = _sizes(cfg)

  def attention(name, kv_dim):
    """Flat torch Linears -> `query/key/value` kernels `[in, h, hd]`, `out` `[h, hd, d]`; and
    the block's output LayerNorm."""
    out = {
        ours: r.linear(f'{name}.attention.{ours}', (in_dim,), (h, hd))
        for ours, in_dim in (('query', d), ('key', kv_dim), ('value', kv_dim))
    }
    out['out'] = r.linear(f'{name}.output.dense', (h, hd), (d,))
    return out, r.layer_norm(f'{name}.output.LayerNorm', d)

  params: Dict[str, Any] = {
      'query_tokens': _pop_query_tokens(r, state_dict, prefix, query_tokens, cfg),
      'embed_norm': r.layer_norm(f'{prefix}layernorm', d),
  }
  for i in range(cfg.num_layers):
    p = f'{prefix}encoder.layer.{i}'
    layer: Dict[str, Any] = {}
    layer['self_attention'], layer['self_attention_norm'] = attention(f'{p}.attention', d)
    if cfg.has_cross_attention(i):
      layer['cross_attention'], layer['cross_attention_norm'] = attention(f'{p}.crossattention', e)
    layer['mlp'] = {
        'fc1': r.linear(f'{p}.intermediate_query.dense', (d,), (f,)),
        'fc2': r.linear(f'{p}.output_query.dense', (f,), (d,)),
    }
    layer['mlp_norm'] = r.layer_norm(f'{p}.output_query.LayerNorm', d)
    # The text FFN: shape-checked so a mis-sized checkpoint still fails, then dropped.
    if r.has(f'{p}.intermediate.dense.weight'):
      r.linear(f'{p}.intermediate.dense', (d,), (f,))
      r.linear(f'{p}.output.dense', (f,), (d,))
      r.layer_norm(f'{p}.output.LayerNorm', d)
    params[f'layers_{i}'] = layer
  r.finish()
  return params


def params_to_hf(
    params: Mapping[str, Any], config: QFormerConfig, prefix: str = ''
) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
  """`params_from_hf`'s inverse: `QFormer` params -> a `Blip2QFormerModel` state dict.

  Args:
    params: a params tree like `nn.meta.unbox(QFormer(config).init(...)['params'])` (numpy or
      jax arrays).
    config: our config.
    prefix: prepended to every tensor name, e.g. 'model.mm_audio_aligner.qformer.qformer.'.
  Returns:
    `(state_dict, query_tokens)`: every tensor `params_from_hf` reads under `prefix` (float32,
    C-contiguous, torch names and layouts) except the query tokens, which come back as
    `[1, num_query, hidden]` for the caller to name (BLIP-2: `query_tokens` beside `qformer.`;
    Uni-MoE: `model.mm_audio_aligner.query_tokens`). The text-only FFN
    (`encoder.layer.{i}.intermediate.*` / `output.*`) is not written: the forward converter
    drops it and our model has none.
  Raises:
    ValueError if a tensor has the wrong shape for `config`.
  """
  if prefix and not prefix.endswith('.'):
    prefix += '.'
  cfg = config
  d, h, hd, f, e = _sizes(cfg)
  w = TensorWriter()

  def attention(name, p, norm, kv_dim):
    """`query/key/value` kernels `[in, h, hd]`, `out` `[h, hd, d]` -> flat torch Linears."""
    for ours, in_dim in (('query', d), ('key', kv_dim), ('value', kv_dim)):
      w.linear(f'{name}.attention.{ours}', p[ours], (in_dim,), (h, hd))
    w.linear(f'{name}.output.dense', p['out'], (h, hd), (d,))
    w.layer_norm(f'{name}.output.LayerNorm', norm, d)

  n = cfg.num_query_tokens
  query_tokens = w.checked('query_tokens', params['query_tokens'], (n, d)).reshape(1, n, d)
  w.layer_norm(f'{prefix}layernorm', params['embed_norm'], d)
  for i in range(cfg.num_layers):
    p = f'{prefix}encoder.layer.{i}'
    layer = params[f'layers_{i}']
    attention(f'{p}.attention', layer['self_attention'], layer['self_attention_norm'], d)
    if cfg.has_cross_attention(i):
      attention(f'{p}.crossattention', layer['cross_attention'], layer['cross_attention_norm'], e)
    w.linear(f'{p}.intermediate_query.dense', layer['mlp']['fc1'], (d,), (f,))
    w.linear(f'{p}.output_query.dense', layer['mlp']['fc2'], (f,), (d,))
    w.layer_norm(f'{p}.output_query.LayerNorm', layer['mlp_norm'], d)
  return w.state_dict, np.ascontiguousarray(query_tokens)
