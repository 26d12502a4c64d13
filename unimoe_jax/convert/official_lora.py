"""LoRA adapters in the official Uni-MoE v1 checkpoints: PEFT's and loralib's (`official.py`
reads the checkpoints; this file merges or keeps their adapters).

PEFT adds `<module>.lora_A.weight` `[rank, in]` and `<module>.lora_B.weight` `[out, rank]`,
scale `lora_alpha / r` of adapter_config.json; the 8e checkpoints' `LlamaMLPLoRA` holds loralib
adapters `<proj>_lora_{A,B}` (after `official.normalize_name`: `<module>.loralib_{A,B}.weight`),
scale `lora_alpha / lora_r` of config.json. Merging gives `W + scale · B·A` (PEFT's
`merge_and_unload`, loralib's merge); kept adapters become our `lora_a` / `lora_b` leaves.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from unimoe_jax.config import DecoderConfig
from unimoe_jax.convert.common import TensorReader
from unimoe_jax.convert.io import LazyStateDict, LazyTensor

# The two spellings of an adapter's (A, B) tensors after `official.normalize_name`.
PEFT_SUFFIXES = ('.lora_A.weight', '.lora_B.weight')
LORALIB_SUFFIXES = ('.loralib_A.weight', '.loralib_B.weight')
# torch module suffix -> our projection name.
_ATTENTION = {
    'self_attn.q_proj': 'query',
    'self_attn.k_proj': 'key',
    'self_attn.v_proj': 'value',
    'self_attn.o_proj': 'out',
}
_MLP = {'gate_proj': 'wi_0', 'up_proj': 'wi_1', 'down_proj': 'wo'}


def adapter_modules(names, suffixes) -> Dict[str, Tuple[str, str]]:
  """module name -> (A name, B name) for one adapter spelling; a lone A or B is an error."""
  found: Dict[str, Dict[str, str]] = {}
  for name in names:
    for suffix in suffixes:
      if name.endswith(suffix):
        found.setdefault(name[: -len(suffix)], {})[suffix] = name
  out = {}
  for module, parts in found.items():
    missing = [module + s for s in suffixes if s not in parts]
    if missing:
      raise ValueError(f'LoRA adapter is incomplete: missing {missing}')
    out[module] = (parts[suffixes[0]], parts[suffixes[1]])
  return out


@dataclasses.dataclass(frozen=True)
class AdapterScales:
  """LoRA scale (alpha / rank) of each adapter spelling present, None when absent."""

  peft: Optional[float]
  loralib: Optional[float]


def lora_scale(adapter_config: Mapping[str, Any]) -> float:
  if adapter_config.get('use_rslora'):
    raise ValueError('adapter_config.json: use_rslora adapters are not supported')
  return float(adapter_config['lora_alpha']) / float(adapter_config['r'])


def adapter_scales(
    state_dict: Mapping[str, Any],
    hf_config: Mapping[str, Any],
    adapter_config: Optional[Mapping[str, Any]],
) -> AdapterScales:
  peft = loralib = None
  if adapter_modules(state_dict, PEFT_SUFFIXES):
    if adapter_config is None:
      raise ValueError('the state dict has LoRA adapters but no adapter_config.json was found')
    peft = lora_scale(adapter_config)
  if adapter_modules(state_dict, LORALIB_SUFFIXES):
    if not hf_config.get('lora_r') or hf_config.get('lora_alpha') is None:
      raise ValueError(
          'the state dict has loralib adapters (*_proj_lora_A/B) but config.json '
          f'has no lora_r / lora_alpha (lora_r={hf_config.get("lora_r")!r}, '
          f'lora_alpha={hf_config.get("lora_alpha")!r})'
      )
    loralib = float(hf_config['lora_alpha']) / float(hf_config['lora_r'])
  return AdapterScales(peft, loralib)


def merge_adapters(
    state_dict: LazyStateDict, scale: float, suffixes: Tuple[str, str] = PEFT_SUFFIXES, only=None
) -> LazyStateDict:
  """Every `<module>.weight` with an adapter becomes `W + scale · B·A` (computed when read).
  `only(module)` restricts which modules are merged."""
  entries = dict(state_dict.items())
  for module, (a_name, b_name) in adapter_modules(entries, suffixes).items():
    if only is not None and not only(module):
      continue
    w_name = f'{module}.weight'
    if w_name not in entries:
      raise ValueError(f'LoRA adapter {a_name} has no base weight {w_name}')
    w, a, b = entries[w_name], entries.pop(a_name), entries.pop(b_name)
    if tuple(b.shape) + tuple(a.shape) != (w.shape[0], a.shape[0], a.shape[0], w.shape[1]):
      raise ValueError(
          f'{module}: LoRA shapes A {tuple(a.shape)} B {tuple(b.shape)} do not '
          f'fit the weight {tuple(w.shape)}'
      )

    def load(w=w, a=a, b=b):
      return np.asarray(w, np.float32) + scale * (
          np.asarray(b, np.float32) @ np.asarray(a, np.float32)
      )

    entries[w_name] = LazyTensor(w.shape, 'float32', load)
  return LazyStateDict(entries, state_dict.files)


def _adapter_pair(r: TensorReader, module: str, n_in: int, n_out: int, rank: int):
  """(A.T `[in, rank]`, B.T `[rank, out]`), zeros when the module has no adapter."""
  if not r.has(f'{module}.lora_A.weight'):
    return np.zeros((n_in, rank), np.float32), np.zeros((rank, n_out), np.float32)
  a = r.pop(f'{module}.lora_A.weight', (rank, n_in))
  b = r.pop(f'{module}.lora_B.weight', (n_out, rank))
  return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)


def kept_adapters(r: TensorReader, cfg: DecoderConfig) -> Dict[str, Any]:
  """Our `lora_a` / `lora_b` leaves per layer (a tree to merge into the base params)."""
  d, h, kv = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads
  hd, f = cfg.resolved_head_dim, cfg.mlp_dim
  rank = cfg.lora.rank
  moe_layers = set(cfg.moe_layer_indices())
  tree: Dict[str, Any] = {}
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}'
    layer: Dict[str, Any] = {'attention': {}}
    shapes = {'query': (d, h * hd), 'key': (d, kv * hd), 'value': (d, kv * hd), 'out': (h * hd, d)}
    for module, ours in _ATTENTION.items():
      a, b = _adapter_pair(r, f'{p}.{module}', *shapes[ours], rank)
      if ours == 'out':
        a = a.reshape(h, hd, rank)
      else:
        b = b.reshape(rank, -1, hd)
      layer['attention'][ours] = {'lora_a': a, 'lora_b': b}
    mlp_shapes = {'wi_0': (d, f), 'wi_1': (d, f), 'wo': (f, d)}
    if i in moe_layers:
      layer['moe'] = {}
      for module, ours in _MLP.items():
        pairs = [
            _adapter_pair(r, f'{p}.mlp.experts.{e}.{module}', *mlp_shapes[ours], rank)
            for e in range(cfg.moe.num_experts)
        ]
        layer['moe'][ours] = {
            'lora_a': np.stack([a for a, _ in pairs]),
            'lora_b': np.stack([b for _, b in pairs]),
        }
    else:
      layer['mlp'] = {}
      for module, ours in _MLP.items():
        a, b = _adapter_pair(r, f'{p}.mlp.{module}', *mlp_shapes[ours], rank)
        layer['mlp'][ours] = {'lora_a': a, 'lora_b': b}
    tree[f'layers_{i}'] = layer
  return tree


def as_peft_names(entries: Dict[str, Any]) -> Dict[str, Any]:
  """loralib adapters renamed to the PEFT spelling (one adapter per module, checked)."""
  out = dict(entries)
  for module, (a, b) in adapter_modules(entries, LORALIB_SUFFIXES).items():
    if f'{module}.lora_A.weight' in entries:
      raise ValueError(f'{module} has both a PEFT and a loralib adapter')  # Folded before.
    out[f'{module}.lora_A.weight'] = out.pop(a)
    out[f'{module}.lora_B.weight'] = out.pop(b)
  return out
