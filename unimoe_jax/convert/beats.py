"""Official BEATs checkpoints (`BEATs_iter3_plus_AS2M.pt`) <-> `encoders.beats.BEATs` params.

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

The inverse, `params_to_official` (with `encoders.beats.config_to_official` for the `cfg`),
writes the state dict that `BEATs(cfg).state_dict()` has: the table under every layer, and the
positional kernel split back into `weight_v` (the kernel) and `weight_g` (its per-tap norm), so
that folding gives the kernel back to float32 rounding (relative error ~1e-7, not bit-exact).
"""

from typing import Any, Dict, Mapping, Tuple

import numpy as np

from unimoe_jax.convert.common import TensorReader, TensorWriter
from unimoe_jax.encoders.beats import BEATsConfig, config_from_official

# Tensors of the official model that the encoder does not use: the AudioSet classifier of
# fine-tuned checkpoints (`finetuned_model=True`).
TRAINING_ONLY_TENSORS = ('predictor.weight', 'predictor.bias')


def fold_weight_norm(weight_g: np.ndarray, weight_v: np.ndarray) -> np.ndarray:
  """torch `weight_norm(dim=2)`: `g * v / ||v||`, the norm over axes 0 and 1 per tap."""
  norm = np.sqrt(np.sum(np.square(weight_v.astype(np.float64)), axis=(0, 1), keepdims=True))
  with np.errstate(divide='ignore', invalid='ignore'):  # All-zero placeholders of missing tensors.
    return (weight_g.astype(np.float64) * weight_v / norm).astype(np.float32)


def split_weight_norm(weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """`fold_weight_norm`'s inverse for `weight [out, in / groups, kernel]`: `(weight_g [1, 1,
  kernel], weight_v)` with `weight_v = weight` and `weight_g` its norm over axes 0 and 1 per tap
  (computed in float64, stored in float32). A tap of all zeros folds back to NaN, as in torch."""
  v = np.ascontiguousarray(np.asarray(weight, np.float32))
  g = np.sqrt(np.sum(np.square(v.astype(np.float64)), axis=(0, 1), keepdims=True))
  return g.astype(np.float32), v


def _attention(r: TensorReader, prefix: str, cfg: BEATsConfig) -> Dict[str, Any]:
  d, h, hd = cfg.encoder_embed_dim, cfg.encoder_attention_heads, cfg.head_dim
  out = {
      ours: r.linear(f'{prefix}.{theirs}', (d,), (h, hd))
      for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj'))
  }
  out['out'] = r.linear(f'{prefix}.out_proj', (h, hd), (d,))
  if cfg.gru_rel_pos:
    out['gate'] = r.linear(f'{prefix}.grep_linear', (hd,), (8,))
    out['gate_scale'] = r.pop(f'{prefix}.grep_a', (1, h, 1, 1)).reshape(h)
  return out


def _attention_to_official(w: TensorWriter, prefix: str, p: Mapping[str, Any], cfg: BEATsConfig):
  """`_attention`'s inverse: kernels `[d, h, hd]` / `[h, hd, d]` -> torch `[d, d]` weights."""
  d, h, hd = cfg.encoder_embed_dim, cfg.encoder_attention_heads, cfg.head_dim
  for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
    w.linear(f'{prefix}.{theirs}', p[ours], (d,), (h, hd))
  w.linear(f'{prefix}.out_proj', p['out'], (h, hd), (d,))
  if cfg.gru_rel_pos:
    w.linear(f'{prefix}.grep_linear', p['gate'], (hd,), (8,))
    w.put(
        f'{prefix}.grep_a',
        w.checked(f'{prefix}.grep_a', p['gate_scale'], (h,)).reshape(1, h, 1, 1),
        (1, h, 1, 1),
    )


def params_from_official(
    state_dict: Mapping[str, np.ndarray], config: BEATsConfig
) -> Dict[str, Any]:
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
  params['layer_norm'] = r.layer_norm('layer_norm', e)
  if e != d:
    params['post_extract_proj'] = r.linear('post_extract_proj', (e,), (d,))

  k, g = cfg.conv_pos, cfg.conv_pos_groups
  weight = fold_weight_norm(
      r.pop('encoder.pos_conv.0.weight_g', (1, 1, k)),
      r.pop('encoder.pos_conv.0.weight_v', (d, d // g, k)),
  )
  params['pos_conv'] = {
      'kernel': np.ascontiguousarray(weight.transpose(2, 1, 0)),
      'bias': r.pop('encoder.pos_conv.0.bias', (d,)),
  }
  params['encoder_layer_norm'] = r.layer_norm('encoder.layer_norm', d)

  if cfg.relative_position_embedding:
    name = 'encoder.layers.{}.self_attn.relative_attention_bias.weight'
    table = r.pop(name.format(0), (cfg.num_buckets, cfg.encoder_attention_heads))
    for i in range(1, cfg.encoder_layers):
      if r.has(name.format(i)):
        copy = r.pop(name.format(i), table.shape)
        if not np.array_equal(copy, table):
          raise ValueError(
              f"{name.format(i)} differs from layer 0's table; the official "
              'encoder ties them, so this state dict is not a BEATs one'
          )
    params['relative_attention_bias'] = table

  f = cfg.encoder_ffn_embed_dim
  for i in range(cfg.encoder_layers):
    prefix = f'encoder.layers.{i}'
    params[f'layers_{i}'] = {
        'self_attn': _attention(r, f'{prefix}.self_attn', cfg),
        'self_attn_layer_norm': r.layer_norm(f'{prefix}.self_attn_layer_norm', d),
        'mlp': {
            'fc1': r.linear(f'{prefix}.fc1', (d,), (f,)),
            'fc2': r.linear(f'{prefix}.fc2', (f,), (d,)),
        },
        'final_layer_norm': r.layer_norm(f'{prefix}.final_layer_norm', d),
    }
  r.finish()
  return params


def params_to_official(params: Mapping[str, Any], config: BEATsConfig) -> Dict[str, np.ndarray]:
  """`params_from_official`'s inverse: `BEATs` params (no 'params' key; numpy or jax arrays) ->
  the official state dict (float32, C-contiguous, official names and torch layouts).

  Written as `BEATs(cfg).state_dict()` of the official encoder has it (`finetuned_model=False`:
  no `predictor.*`): `patch_embedding.weight [embed_dim, 1, p, p]` (bias with conv_bias),
  `post_extract_proj.*` when embed_dim != encoder_embed_dim, `encoder.pos_conv.0.weight_g
  [1, 1, conv_pos]` / `weight_v [width, width / groups, conv_pos]` (`split_weight_norm`; folding
  them gives our kernel back to float32 rounding), the relative position table under every
  layer (a copy each; the official modules are tied to layer 0's), and `grep_linear` /
  `grep_a [1, heads, 1, 1]` with gru_rel_pos. Raises ValueError on a wrong-shaped tensor.
  """
  cfg = config
  p, e, d = cfg.input_patch_size, cfg.embed_dim, cfg.encoder_embed_dim
  w = TensorWriter()

  patch = params['patch_embedding']
  kernel = w.checked('patch_embedding.weight (our kernel)', patch['kernel'], (p, p, e))
  w.put('patch_embedding.weight', kernel.transpose(2, 0, 1)[:, None], (e, 1, p, p))
  if cfg.conv_bias:
    w.put('patch_embedding.bias', patch['bias'], (e,))
  w.layer_norm('layer_norm', params['layer_norm'], e)
  if e != d:
    w.linear('post_extract_proj', params['post_extract_proj'], (e,), (d,))

  k, g = cfg.conv_pos, cfg.conv_pos_groups
  kernel = w.checked(
      'encoder.pos_conv.0 (our kernel)', params['pos_conv']['kernel'], (k, d // g, d)
  )
  weight_g, weight_v = split_weight_norm(kernel.transpose(2, 1, 0))
  w.put('encoder.pos_conv.0.weight_g', weight_g, (1, 1, k))
  w.put('encoder.pos_conv.0.weight_v', weight_v, (d, d // g, k))
  w.put('encoder.pos_conv.0.bias', params['pos_conv']['bias'], (d,))
  w.layer_norm('encoder.layer_norm', params['encoder_layer_norm'], d)

  if cfg.relative_position_embedding:
    name = 'encoder.layers.{}.self_attn.relative_attention_bias.weight'
    for i in range(cfg.encoder_layers):  # A copy under every layer, as the state dict has.
      w.put(
          name.format(i),
          params['relative_attention_bias'],
          (cfg.num_buckets, cfg.encoder_attention_heads),
      )

  f = cfg.encoder_ffn_embed_dim
  for i in range(cfg.encoder_layers):
    prefix = f'encoder.layers.{i}'
    layer = params[f'layers_{i}']
    _attention_to_official(w, f'{prefix}.self_attn', layer['self_attn'], cfg)
    w.layer_norm(f'{prefix}.self_attn_layer_norm', layer['self_attn_layer_norm'], d)
    w.linear(f'{prefix}.fc1', layer['mlp']['fc1'], (d,), (f,))
    w.linear(f'{prefix}.fc2', layer['mlp']['fc2'], (f,), (d,))
    w.layer_norm(f'{prefix}.final_layer_norm', layer['final_layer_norm'], d)
  return w.state_dict


def load_official_checkpoint(path: str) -> Tuple[BEATsConfig, Dict[str, Any]]:
  """Reads an official BEATs `.pt` file -> `(BEATsConfig, params)`.

  torch is imported here only. The file is read with `weights_only=True` (plain dicts and
  tensors, no arbitrary unpickling).
  """
  import torch  # pylint: disable=g-import-not-at-top

  checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(checkpoint, dict) or 'cfg' not in checkpoint or 'model' not in checkpoint:
    keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(
        f'{path}: expected an official BEATs checkpoint {{"cfg", "model"}}, got ' f'{keys}'
    )
  config = config_from_official(checkpoint['cfg'])
  state_dict = {
      name: tensor.detach().float().cpu().numpy() for name, tensor in checkpoint['model'].items()
  }
  return config, params_from_official(state_dict, config)
