"""Official BEATs checkpoints (`BEATs_iter3_plus_AS2M.pt`) -> `encoders.beats.BEATs` params.

The official file is a torch pickle `{'cfg': dict, 'model': state dict}`. `params_from_official`
takes the state dict as numpy arrays; `load_official_checkpoint` reads the file and is the only
place that imports torch (lazily, inside the function).

Weight norm: the positional convolution is stored as `weight_g [1, 1, kernel]` and
`weight_v [width, width / groups, kernel]` (torch `weight_norm(dim=2)`: one norm per tap, over
output and input channels). The weight is `g * v / ||v||`; we fold it here into one kernel. The
split is a training reparametrisation only, and Uni-MoE keeps this tower frozen.

Tied tensors: the official encoder ties every layer's relative position table to layer 0's, so
its state dict repeats `encoder.layers.{i}.self_attn.relative_attention_bias.weight` for each
layer. Only layer 0's is required; a copy present for another layer must equal it.
"""

from typing import Any, Dict, Mapping, Tuple

import numpy as np

from unimoe_jax.convert.common import TensorReader, linear_kernel
from unimoe_jax.encoders.beats import BEATsConfig, config_from_official

# Tensors of the official model that the encoder does not use: the AudioSet classifier of
# fine-tuned checkpoints (`finetuned_model=True`).
TRAINING_ONLY_TENSORS = ('predictor.weight', 'predictor.bias')


def fold_weight_norm(weight_g: np.ndarray, weight_v: np.ndarray) -> np.ndarray:
  """torch `weight_norm(dim=2)`: `g * v / ||v||`, the norm over axes 0 and 1 per tap."""
  norm = np.sqrt(np.sum(np.square(weight_v.astype(np.float64)), axis=(0, 1), keepdims=True))
  with np.errstate(divide='ignore', invalid='ignore'):  # All-zero placeholders of missing tensors.
    return (weight_g.astype(np.float64) * weight_v / norm).astype(np.float32)


def _layer_norm(r: TensorReader, prefix: str, width: int) -> Dict[str, np.ndarray]:
  return {'scale': r.pop(f'{prefix}.weight', (width,)), 'bias': r.pop(f'{prefix}.bias', (width,))}


def _linear(r: TensorReader, prefix: str, d_in: int, d_out: int) -> Dict[str, np.ndarray]:
  return {'kernel': linear_kernel(r.pop(f'{prefix}.weight', (d_out, d_in))),
          'bias': r.pop(f'{prefix}.bias', (d_out,))}


def _attention(r: TensorReader, prefix: str, cfg: BEATsConfig) -> Dict[str, Any]:
  d, h, hd = cfg.encoder_embed_dim, cfg.encoder_attention_heads, cfg.head_dim
  out = {}
  for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
    w = r.pop(f'{prefix}.{theirs}.weight', (d, d))
    out[ours] = {'kernel': linear_kernel(w).reshape(d, h, hd),
                 'bias': r.pop(f'{prefix}.{theirs}.bias', (d,)).reshape(h, hd)}
  out['out'] = {'kernel': linear_kernel(r.pop(f'{prefix}.out_proj.weight', (d, d))).reshape(
      h, hd, d), 'bias': r.pop(f'{prefix}.out_proj.bias', (d,))}
  if cfg.gru_rel_pos:
    out['gate'] = _linear(r, f'{prefix}.grep_linear', hd, 8)
    out['gate_scale'] = r.pop(f'{prefix}.grep_a', (1, h, 1, 1)).reshape(h)
  return out


def params_from_official(state_dict: Mapping[str, np.ndarray],
                         config: BEATsConfig) -> Dict[str, Any]:
  """The official BEATs state dict (numpy, official names) -> `BEATs` params (no 'params' key).

  Raises ValueError naming every missing, unexpected or wrong-shaped tensor; the tensors in
  `TRAINING_ONLY_TENSORS` are dropped.
  """
  cfg = config
  sd = {k: v for k, v in state_dict.items() if k not in TRAINING_ONLY_TENSORS}
  r = TensorReader(sd)
  p, e, d = cfg.input_patch_size, cfg.embed_dim, cfg.encoder_embed_dim
  params: Dict[str, Any] = {}

  patch = {'kernel': r.pop('patch_embedding.weight', (e, 1, p, p))[:, 0].transpose(1, 2, 0)}
  if cfg.conv_bias:
    patch['bias'] = r.pop('patch_embedding.bias', (e,))
  params['patch_embedding'] = patch
  params['layer_norm'] = _layer_norm(r, 'layer_norm', e)
  if e != d:
    params['post_extract_proj'] = _linear(r, 'post_extract_proj', e, d)

  k, g = cfg.conv_pos, cfg.conv_pos_groups
  weight = fold_weight_norm(r.pop('encoder.pos_conv.0.weight_g', (1, 1, k)),
                            r.pop('encoder.pos_conv.0.weight_v', (d, d // g, k)))
  params['pos_conv'] = {'kernel': np.ascontiguousarray(weight.transpose(2, 1, 0)),
                        'bias': r.pop('encoder.pos_conv.0.bias', (d,))}
  params['encoder_layer_norm'] = _layer_norm(r, 'encoder.layer_norm', d)

  if cfg.relative_position_embedding:
    name = 'encoder.layers.{}.self_attn.relative_attention_bias.weight'
    table = r.pop(name.format(0), (cfg.num_buckets, cfg.encoder_attention_heads))
    for i in range(1, cfg.encoder_layers):
      if r.has(name.format(i)):
        copy = r.pop(name.format(i), table.shape)
        if not np.array_equal(copy, table):
          raise ValueError(f'{name.format(i)} differs from layer 0\'s table; the official '
                           'encoder ties them, so this state dict is not a BEATs one')
    params['relative_attention_bias'] = table

  f = cfg.encoder_ffn_embed_dim
  for i in range(cfg.encoder_layers):
    prefix = f'encoder.layers.{i}'
    params[f'layers_{i}'] = {
        'self_attn': _attention(r, f'{prefix}.self_attn', cfg),
        'self_attn_layer_norm': _layer_norm(r, f'{prefix}.self_attn_layer_norm', d),
        'mlp': {'fc1': _linear(r, f'{prefix}.fc1', d, f), 'fc2': _linear(r, f'{prefix}.fc2', f, d)},
        'final_layer_norm': _layer_norm(r, f'{prefix}.final_layer_norm', d),
    }
  r.finish()
  return params


def load_official_checkpoint(path: str) -> Tuple[BEATsConfig, Dict[str, Any]]:
  """Reads an official BEATs `.pt` file -> `(BEATsConfig, params)`.

  torch is imported here only. The file is read with `weights_only=True` (plain dicts and
  tensors, no arbitrary unpickling).
  """
  import torch  # pylint: disable=g-import-not-at-top

  checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(checkpoint, dict) or 'cfg' not in checkpoint or 'model' not in checkpoint:
    keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(f'{path}: expected an official BEATs checkpoint {{"cfg", "model"}}, got '
                     f'{keys}')
  config = config_from_official(checkpoint['cfg'])
  state_dict = {name: tensor.detach().float().cpu().numpy()
                for name, tensor in checkpoint['model'].items()}
  return config, params_from_official(state_dict, config)
