"""Hugging Face CLIP vision / LLaVA projector state dicts <-> our parameters (numpy, no torch).

Names handled:
  `{prefix}embeddings.patch_embedding.weight`  Conv2d `[width, 3, p, p]`
      -> kernel `[p, p, 3, width]`
  `{prefix}embeddings.class_embedding`, `{prefix}embeddings.position_embedding.weight`
  `{prefix}pre_layrnorm.*` (sic, HF's spelling) -> `pre_layernorm`
  `{prefix}encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1/2, mlp.fc1/fc2}.*`

Prefixes: 'vision_model.' (an original `CLIPVisionModel` / `CLIPModel` checkpoint file),
'model.vision_tower.vision_tower.vision_model.' (inside a LLaVA / Uni-MoE checkpoint), or ''
(`CLIPVisionModel.state_dict()` in transformers >= 5, which dropped the `vision_model.` level).

The inverses (`params_to_hf`, `projector_params_to_hf`, `config_to_hf`) write what the readers
read, bit for bit; the tensors the tower never computes (post_layernorm, the layers after the
selected hidden state) are not written.
"""

import re
from typing import Any, Dict, Mapping

import numpy as np

from unimoe_jax.connectors.projector import linear_names, projector_depth
from unimoe_jax.convert.common import TensorReader, TensorWriter
from unimoe_jax.convert.common import fields_from_hf, fields_to_hf, hf_activation, linear_kernel
from unimoe_jax.convert.common import ours_activation
from unimoe_jax.encoders.clip import CLIPVisionConfig

_LAYER = re.compile(r'^encoder\.layers\.(\d+)\.')
# CLIPVisionConfig field -> HF CLIPVisionConfig key, both directions.
_HF_FIELDS = {
    'image_size': 'image_size',
    'patch_size': 'patch_size',
    'width': 'hidden_size',
    'num_layers': 'num_hidden_layers',
    'num_heads': 'num_attention_heads',
    'mlp_dim': 'intermediate_size',
    'layer_norm_eps': 'layer_norm_eps',
}
_HF_DEFAULTS = {'layer_norm_eps': 1e-5}  # transformers' CLIPVisionConfig default.


def config_from_hf(hf: Mapping[str, Any], **overrides) -> CLIPVisionConfig:
  """A CLIPVisionConfig from a HF `CLIPVisionConfig.to_dict()` (or a `CLIPConfig` dict, whose
  `vision_config` is used). LLaVA's choices come in as overrides, e.g.
  `config_from_hf(d, select_layer=llava['mm_vision_select_layer'])`."""
  hf = hf.get('vision_config', hf)
  if hf.get('num_channels', 3) != 3:
    raise ValueError(f"config_from_hf: num_channels={hf['num_channels']}; only RGB is supported")
  fields = dict(
      fields_from_hf(hf, _HF_FIELDS, _HF_DEFAULTS),
      act=ours_activation(hf.get('hidden_act', 'quick_gelu'), 'hidden_act'),
  )
  return CLIPVisionConfig(**{**fields, **overrides})


def config_to_hf(config: CLIPVisionConfig) -> Dict[str, Any]:
  """`config_from_hf`'s inverse, a `CLIPVisionConfig.to_dict()`-style dict (LLaVA's
  select_layer / select_feature are not CLIP fields: the caller writes them as
  `mm_vision_select_*`)."""
  return {
      'model_type': 'clip_vision_model',
      **fields_to_hf(config, _HF_FIELDS),
      'hidden_act': hf_activation(config.act, 'CLIPVisionConfig.act'),
      'num_channels': 3,
  }


def _is_ignored(name: str, cfg: CLIPVisionConfig) -> bool:
  """Tensors the tower does not use: post_layernorm (LLaVA reads a hidden state before it),
  the position_ids buffer, and encoder layers after the selected hidden state."""
  if name.startswith('post_layernorm.') or name == 'embeddings.position_ids':
    return True
  match = _LAYER.match(name)
  return bool(match) and cfg.num_used_layers <= int(match.group(1)) < cfg.num_layers


def params_from_hf(
    state_dict: Mapping[str, np.ndarray], config: CLIPVisionConfig, prefix: str = 'vision_model.'
) -> Dict[str, Any]:
  """Converts a HF CLIP vision state dict into `CLIPVisionTower` params.

  Only tensors whose name starts with `prefix` are read, so a whole LLaVA state dict can be
  passed. Among them `post_layernorm.*`, `embeddings.position_ids` and the encoder layers after
  the selected one (`encoder.layers.{i}` for i >= config.num_used_layers, e.g. layer 23 of
  ViT-L/14 with select_layer=-2) are accepted and dropped: the tower never computes them.
  Raises ValueError naming every missing or unexpected tensor, or one of the wrong shape.
  """
  cfg = config
  r = TensorReader(
      {
          k: v
          for k, v in state_dict.items()
          if k.startswith(prefix) and not _is_ignored(k[len(prefix) :], cfg)
      }
  )
  d, h, hd, f, p = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.patch_size
  conv = r.pop(f'{prefix}embeddings.patch_embedding.weight', (d, 3, p, p))
  params: Dict[str, Any] = {
      'patch_embedding': {'kernel': np.ascontiguousarray(conv.transpose(2, 3, 1, 0))},
      'class_embedding': r.pop(f'{prefix}embeddings.class_embedding', (d,)),
      'position_embedding': r.pop(
          f'{prefix}embeddings.position_embedding.weight', (cfg.num_positions, d)
      ),
      'pre_layernorm': r.layer_norm(f'{prefix}pre_layrnorm', d),
  }
  for i in range(cfg.num_used_layers):
    q = f'{prefix}encoder.layers.{i}'
    params[f'layers_{i}'] = {
        'layer_norm1': r.layer_norm(f'{q}.layer_norm1', d),
        'layer_norm2': r.layer_norm(f'{q}.layer_norm2', d),
        'attention': {
            'query': r.linear(f'{q}.self_attn.q_proj', (d,), (h, hd)),
            'key': r.linear(f'{q}.self_attn.k_proj', (d,), (h, hd)),
            'value': r.linear(f'{q}.self_attn.v_proj', (d,), (h, hd)),
            'out': r.linear(f'{q}.self_attn.out_proj', (h, hd), (d,)),
        },
        'mlp': {
            'fc1': r.linear(f'{q}.mlp.fc1', (d,), (f,)),
            'fc2': r.linear(f'{q}.mlp.fc2', (f,), (d,)),
        },
    }
  r.finish()
  return params


def params_to_hf(
    params: Mapping[str, Any], config: CLIPVisionConfig, prefix: str = 'vision_model.'
) -> Dict[str, np.ndarray]:
  """`params_from_hf`'s inverse: `CLIPVisionTower` params -> the HF tensors under `prefix`
  (float32; the first `num_used_layers` encoder layers, no post_layernorm, no position_ids).
  Raises ValueError naming a tensor whose shape does not fit `config`."""
  cfg = config
  w = TensorWriter()
  d, h, hd, f, p = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.patch_size
  kernel = w.checked(
      f'{prefix}embeddings.patch_embedding.weight (our kernel)',
      params['patch_embedding']['kernel'],
      (p, p, 3, d),
  )
  w.put(f'{prefix}embeddings.patch_embedding.weight', kernel.transpose(3, 2, 0, 1), (d, 3, p, p))
  w.put(f'{prefix}embeddings.class_embedding', params['class_embedding'], (d,))
  w.put(
      f'{prefix}embeddings.position_embedding.weight',
      params['position_embedding'],
      (cfg.num_positions, d),
  )
  w.layer_norm(f'{prefix}pre_layrnorm', params['pre_layernorm'], d)
  for i in range(cfg.num_used_layers):
    q = f'{prefix}encoder.layers.{i}'
    layer = params[f'layers_{i}']
    w.layer_norm(f'{q}.layer_norm1', layer['layer_norm1'], d)
    w.layer_norm(f'{q}.layer_norm2', layer['layer_norm2'], d)
    attention = layer['attention']
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      w.linear(f'{q}.self_attn.{theirs}', attention[ours], (d,), (h, hd))
    w.linear(f'{q}.self_attn.out_proj', attention['out'], (h, hd), (d,))
    w.linear(f'{q}.mlp.fc1', layer['mlp']['fc1'], (d,), (f,))
    w.linear(f'{q}.mlp.fc2', layer['mlp']['fc2'], (f,), (d,))
  return w.state_dict


def projector_params_from_hf(
    state_dict: Mapping[str, np.ndarray], kind: str, prefix: str = 'model.mm_projector.'
) -> Dict[str, Any]:
  """Converts LLaVA's `mm_projector` (a Linear, or an nn.Sequential of Linear/GELU) into
  `Projector(kind, ...)` params. Sizes are read from the tensors and checked to chain
  (the first Linear is `[out, in]`, every later one `[out, out]`). Only names starting with
  `prefix` are read; raises ValueError naming missing, unexpected or wrong-shaped tensors."""
  depth = projector_depth(kind)
  r = TensorReader({k: v for k, v in state_dict.items() if k.startswith(prefix)})
  sources = [f'{prefix}'] if kind == 'linear' else [f'{prefix}{2 * i}.' for i in range(depth)]
  params: Dict[str, Any] = {}
  in_dim = None
  for source, name in zip(sources, linear_names(kind)):
    weight_name = f'{source}weight'
    if not r.has(weight_name):
      r.pop(weight_name)  # Recorded as missing; finish() reports it with the rest.
      continue
    weight = np.asarray(state_dict[weight_name])
    if weight.ndim != 2:
      raise ValueError(f'{weight_name}: expected a 2-D Linear weight, got shape {weight.shape}')
    # Every Linear after the first maps out_dim -> out_dim.
    expected = tuple(weight.shape) if in_dim is None else (in_dim, in_dim)
    params[name] = {
        'kernel': linear_kernel(r.pop(weight_name, expected)),
        'bias': r.pop(f'{source}bias', (expected[0],)),
    }
    in_dim = expected[0]
  r.finish()
  return params


def projector_params_to_hf(
    params: Mapping[str, Any], kind: str, prefix: str = 'model.mm_projector.'
) -> Dict[str, np.ndarray]:
  """`projector_params_from_hf`'s inverse: `Projector(kind)` params -> LLaVA's `mm_projector`
  tensors under `prefix` (a Linear for 'linear', else `{2 i}.weight` / `.bias`, the Linears of
  the nn.Sequential between its GELUs)."""
  w = TensorWriter()
  depth = projector_depth(kind)
  targets = [prefix] if kind == 'linear' else [f'{prefix}{2 * i}.' for i in range(depth)]
  for target, name in zip(targets, linear_names(kind)):
    if name not in params:
      raise ValueError(f'projector params ({kind}) have no {name!r}; they hold {sorted(params)}')
    kernel = np.asarray(params[name]['kernel'])
    if kernel.ndim != 2:
      raise ValueError(f'{target}weight: expected a 2-D kernel, got shape {kernel.shape}')
    w.linear(target.rstrip('.'), params[name], kernel.shape[:1], kernel.shape[1:])
  return w.state_dict
