"""transformers `Blip2QFormerModel` state dicts -> our `QFormer` parameters (numpy, no torch).

Accepted layouts:
  * a bare `Blip2QFormerModel` state dict (`layernorm.*`, `encoder.layer.{i}.*`), with the
    query tokens passed in or stored as `query_tokens`;
  * the Q-Former inside a bigger state dict, selected by `prefix`: BLIP-2's `qformer.` with
    `query_tokens` beside it, or Uni-MoE's `model.mm_audio_aligner.qformer.qformer.` with
    `model.mm_audio_aligner.query_tokens` two levels up. Tensors outside the prefix (vision
    tower, LLM, the aligner's projector) are left alone.

The text-only FFN (`encoder.layer.{i}.intermediate.*` / `output.*`, present when the HF config
has `use_qformer_text_input`) never runs on query tokens and is dropped.
"""

from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from unimoe_jax.connectors.qformer import QFormerConfig
from unimoe_jax.convert.common import TensorReader, linear_kernel

# HF `hidden_act` -> our activation name.
_HF_ACTIVATIONS = {
    'gelu': 'gelu',
    'gelu_new': 'gelu_tanh',
    'gelu_pytorch_tanh': 'gelu_tanh',
    'quick_gelu': 'quick_gelu',
    'relu': 'relu',
}


def config_from_hf(hf: Mapping[str, Any], num_query_tokens: Optional[int] = None,
                   **overrides) -> QFormerConfig:
  """A QFormerConfig from `Blip2QFormerConfig.to_dict()` (or a whole `Blip2Config` dict, whose
  `qformer_config` and `num_query_tokens` are used). `num_query_tokens` is required for a bare
  Q-Former config, which does not know it (Uni-MoE audio: 50)."""
  if 'qformer_config' in hf:
    if num_query_tokens is None:
      num_query_tokens = hf.get('num_query_tokens')
    hf = hf['qformer_config']
  if num_query_tokens is None:
    raise ValueError('config_from_hf: num_query_tokens is required for a Q-Former config '
                     '(it is a field of the enclosing BLIP-2 / Uni-MoE config)')
  act = hf.get('hidden_act', 'gelu')
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f'config_from_hf: hidden_act {act!r} is not supported; '
                     f'known: {sorted(_HF_ACTIVATIONS)}')
  fields = dict(
      hidden_size=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
      num_heads=hf['num_attention_heads'], intermediate_size=hf['intermediate_size'],
      cross_attention_frequency=hf.get('cross_attention_frequency', 2),
      encoder_hidden_size=hf['encoder_hidden_size'], num_query_tokens=int(num_query_tokens),
      layer_norm_eps=hf.get('layer_norm_eps', 1e-12), act=_HF_ACTIVATIONS[act])
  fields.update(overrides)
  return QFormerConfig(**fields)


def _query_token_candidates(prefix: str):
  """`query_tokens` inside the prefix, then beside each enclosing module, innermost first."""
  parts = [p for p in prefix.split('.') if p]
  return ['.'.join(parts[:n] + ['query_tokens']) for n in range(len(parts), -1, -1)]


def _pop_query_tokens(r: TensorReader, state_dict: Mapping[str, np.ndarray], prefix: str,
                      query_tokens: Union[None, str, np.ndarray], cfg: QFormerConfig):
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


def params_from_hf(state_dict: Mapping[str, np.ndarray], config: QFormerConfig,
                   prefix: str = '',
                   query_tokens: Union[None, str, np.ndarray] = None) -> Dict[str, Any]:
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
  d, h, hd, f, e = (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size,
                    cfg.encoder_hidden_size)

  def linear(name, in_dim, out_dim):
    return (linear_kernel(r.pop(f'{name}.weight', (out_dim, in_dim))),
            r.pop(f'{name}.bias', (out_dim,)))

  def layer_norm(name):
    return {'scale': r.pop(f'{name}.weight', (d,)), 'bias': r.pop(f'{name}.bias', (d,))}

  def attention(name, kv_dim):
    out = {}
    for ours, theirs, in_dim in (('query', 'query', d), ('key', 'key', kv_dim),
                                 ('value', 'value', kv_dim)):
      kernel, bias = linear(f'{name}.attention.{theirs}', in_dim, h * hd)
      out[ours] = {'kernel': kernel.reshape(in_dim, h, hd), 'bias': bias.reshape(h, hd)}
    kernel, bias = linear(f'{name}.output.dense', h * hd, d)
    out['out'] = {'kernel': kernel.reshape(h, hd, d), 'bias': bias}
    return out, layer_norm(f'{name}.output.LayerNorm')

  params: Dict[str, Any] = {
      'query_tokens': _pop_query_tokens(r, state_dict, prefix, query_tokens, cfg),
      'embed_norm': layer_norm(f'{prefix}layernorm'),
  }
  for i in range(cfg.num_layers):
    p = f'{prefix}encoder.layer.{i}'
    layer: Dict[str, Any] = {}
    layer['self_attention'], layer['self_attention_norm'] = attention(f'{p}.attention', d)
    if cfg.has_cross_attention(i):
      layer['cross_attention'], layer['cross_attention_norm'] = attention(
          f'{p}.crossattention', e)
    fc1_kernel, fc1_bias = linear(f'{p}.intermediate_query.dense', d, f)
    fc2_kernel, fc2_bias = linear(f'{p}.output_query.dense', f, d)
    layer['mlp'] = {'fc1': {'kernel': fc1_kernel, 'bias': fc1_bias},
                    'fc2': {'kernel': fc2_kernel, 'bias': fc2_bias}}
    layer['mlp_norm'] = layer_norm(f'{p}.output_query.LayerNorm')
    # The text FFN: shape-checked so a mis-sized checkpoint still fails, then dropped.
    if r.has(f'{p}.intermediate.dense.weight'):
      linear(f'{p}.intermediate.dense', d, f)
      linear(f'{p}.output.dense', f, d)
      layer_norm(f'{p}.output.LayerNorm')
    params[f'layers_{i}'] = layer
  r.finish()
  return params
