"""Official Uni-MoE v1 checkpoints (Uni_MoE/*/model, PEFT LoRA) -> our `UniMoE` parameters.

Tensor names of the official code (read in Uni_MoE/Uni_MoE_speech and Uni_MoE/Uni_MoE_audio):

    model.embed_tokens.weight, model.norm.weight, lm_head.weight           LLaMA base
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    model.layers.{i}.{input,post_attention}_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight                        dense FFN
    model.layers.{i}.mlp.gate.weight                                       MoeLayer router
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight            MoeLayer experts
    model.mm_projector.{0,2}.{weight,bias} (mlpNx_gelu) or .{weight,bias}  -> vision_projector
    model.vision_tower.*, model.audio_tower.*, model.mm_audio_aligner.*, model.query_tokens
        the CLIP tower, the Whisper speech encoder + Whisper-decoder aligner + its projector
        (Uni_MoE_speech) or the BEATs audio encoder + Q-Former + its projector (Uni_MoE_audio):
        mapped by official_towers.py (see there), configured by `official_towers.tower_configs`.

PEFT wraps the model as `base_model.model.` and adds `<module>.lora_A.weight` `[rank, in]` and
`<module>.lora_B.weight` `[out, rank]` (newer PEFT also moves the base weight to
`<module>.base_layer.weight`); LoRA targets every LLM Linear except `mlp.gate` and `lm_head`
(train.py `find_all_llm_linear_names`). Merging gives `W + (alpha / rank) · B·A`, PEFT's
`merge_and_unload`. The official router takes top-k of the logits then a softmax over them,
which equals Mixtral's softmax-then-renormalise that our MoE layer implements.
"""

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from unimoe_jax.config import DecoderConfig, LoRAConfig, MoEConfig
from unimoe_jax.convert import clip as clip_convert
from unimoe_jax.convert import hf
from unimoe_jax.convert import official_towers
from unimoe_jax.convert.common import TensorReader
from unimoe_jax.convert.io import LazyStateDict, LazyTensor
from unimoe_jax.model import UniMoEConfig

PROJECTOR_PREFIX = 'model.mm_projector.'
_EXPERT_TO_MIXTRAL = {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}
_LORA_SUFFIXES = ('.lora_A.weight', '.lora_B.weight')
# torch module suffix -> (our LoRA target group, path inside a layer, our projection name).
_ATTENTION = {'self_attn.q_proj': 'query', 'self_attn.k_proj': 'key',
              'self_attn.v_proj': 'value', 'self_attn.o_proj': 'out'}
_MLP = {'gate_proj': 'wi_0', 'up_proj': 'wi_1', 'down_proj': 'wo'}


def normalize_name(name: str) -> str:
  """PEFT / DeepSpeed spellings -> the plain `LlavaLlamaForCausalLM` names."""
  if name.startswith('base_model.model.'):
    name = name[len('base_model.model.'):]
  name = name.replace('.base_layer.', '.')
  return re.sub(r'\.(lora_[AB])\.default\.', r'.\1.', name)


def config_from_official(hf_config: Mapping[str, Any], adapter_config: Optional[Mapping[str, Any]],
                         keep_lora: bool, **overrides) -> DecoderConfig:
  """Our DecoderConfig from the official `config.json` (LLaMA fields plus `moe`,
  `num_experts`, `num_experts_per_tok`) and PEFT's `adapter_config.json` when LoRA is kept."""
  moe = None
  if hf_config.get('moe') is not None or hf_config.get('num_experts'):
    moe = MoEConfig(num_experts=int(hf_config['num_experts']),
                    num_experts_per_tok=int(hf_config['num_experts_per_tok']),
                    load_balance_loss_coef=0.0)
  lora = None
  if keep_lora and adapter_config is not None:
    lora = LoRAConfig(rank=int(adapter_config['r']), alpha=float(adapter_config['lora_alpha']),
                      dropout=float(adapter_config.get('lora_dropout', 0.0) or 0.0),
                      targets=('query', 'key', 'value', 'out', 'mlp', 'experts'))
  base = {k: v for k, v in hf_config.items() if k != 'num_local_experts'}
  return hf.config_from_hf(base, moe=moe, lora=lora, **overrides)


def lora_scale(adapter_config: Mapping[str, Any]) -> float:
  if adapter_config.get('use_rslora'):
    raise ValueError('adapter_config.json: use_rslora adapters are not supported')
  return float(adapter_config['lora_alpha']) / float(adapter_config['r'])


def _lora_modules(state_dict: Mapping[str, Any]) -> Dict[str, Tuple[str, str]]:
  """module name -> (lora_A name, lora_B name); a lone A or B is an error naming it."""
  modules: Dict[str, Dict[str, str]] = {}
  for name in state_dict:
    for suffix in _LORA_SUFFIXES:
      if name.endswith(suffix):
        modules.setdefault(name[:-len(suffix)], {})[suffix] = name
  out = {}
  for module, parts in modules.items():
    missing = [module + s for s in _LORA_SUFFIXES if s not in parts]
    if missing:
      raise ValueError(f'LoRA adapter is incomplete: missing {missing}')
    out[module] = (parts[_LORA_SUFFIXES[0]], parts[_LORA_SUFFIXES[1]])
  return out


def merge_adapters(state_dict: LazyStateDict, scale: float) -> LazyStateDict:
  """Every `<module>.weight` with an adapter becomes `W + scale · B·A` (computed when read)."""
  entries = dict(state_dict.items())
  for module, (a_name, b_name) in _lora_modules(entries).items():
    w_name = f'{module}.weight'
    if w_name not in entries:
      raise ValueError(f'LoRA adapter {a_name} has no base weight {w_name}')
    w, a, b = entries[w_name], entries.pop(a_name), entries.pop(b_name)
    if tuple(b.shape) + tuple(a.shape) != (w.shape[0], a.shape[0], a.shape[0], w.shape[1]):
      raise ValueError(f'{module}: LoRA shapes A {tuple(a.shape)} B {tuple(b.shape)} do not '
                       f'fit the weight {tuple(w.shape)}')

    def load(w=w, a=a, b=b):
      return (np.asarray(w, np.float32) +
              scale * (np.asarray(b, np.float32) @ np.asarray(a, np.float32)))

    entries[w_name] = LazyTensor(w.shape, 'float32', load)
  return LazyStateDict(entries, state_dict.files)


def _adapter_pair(r: TensorReader, module: str, n_in: int, n_out: int, rank: int):
  """(A.T `[in, rank]`, B.T `[rank, out]`), zeros when the module has no adapter."""
  if not r.has(f'{module}.lora_A.weight'):
    return np.zeros((n_in, rank), np.float32), np.zeros((rank, n_out), np.float32)
  a = r.pop(f'{module}.lora_A.weight', (rank, n_in))
  b = r.pop(f'{module}.lora_B.weight', (n_out, rank))
  return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)


def _kept_adapters(r: TensorReader, cfg: DecoderConfig) -> Dict[str, Any]:
  """Our `lora_a` / `lora_b` leaves per layer (a tree to merge into the base params)."""
  d, h, kv, hd, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  rank = cfg.lora.rank
  moe_layers = set(cfg.moe_layer_indices())
  tree: Dict[str, Any] = {}
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}'
    layer: Dict[str, Any] = {'attention': {}}
    shapes = {'query': (d, h * hd), 'key': (d, kv * hd), 'value': (d, kv * hd),
              'out': (h * hd, d)}
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
        pairs = [_adapter_pair(r, f'{p}.mlp.experts.{e}.{module}', *mlp_shapes[ours], rank)
                 for e in range(cfg.moe.num_experts)]
        layer['moe'][ours] = {'lora_a': np.stack([a for a, _ in pairs]),
                              'lora_b': np.stack([b for _, b in pairs])}
    else:
      layer['mlp'] = {}
      for module, ours in _MLP.items():
        a, b = _adapter_pair(r, f'{p}.mlp.{module}', *mlp_shapes[ours], rank)
        layer['mlp'][ours] = {'lora_a': a, 'lora_b': b}
    tree[f'layers_{i}'] = layer
  return tree


def _deep_update(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
  for k, v in extra.items():
    if isinstance(v, Mapping):
      _deep_update(base.setdefault(k, {}), v)
    else:
      base[k] = v
  return base


def _to_mixtral_name(name: str) -> str:
  return re.sub(r'\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.',
                lambda m: f'.experts.{m.group(1)}.{_EXPERT_TO_MIXTRAL[m.group(2)]}.', name)


def _to_official_names(message: str) -> str:
  back = {v: k for k, v in _EXPERT_TO_MIXTRAL.items()}
  return re.sub(r'\.experts\.(\d+)\.(w1|w2|w3)\.',
                lambda m: f'.experts.{m.group(1)}.{back[m.group(2)]}.', message)


def params_from_official(state_dict: LazyStateDict, cfg: DecoderConfig,
                         hf_config: Mapping[str, Any],
                         adapter_config: Optional[Mapping[str, Any]] = None,
                         merge_lora: bool = True,
                         model_cfg: Optional[UniMoEConfig] = None) -> Dict[str, Any]:
  """The `UniMoE` params tree: 'decoder', 'vision_projector' when present, and with `model_cfg`
  the towers and connectors it builds (official_towers.py).

  Args:
    state_dict: names already passed through `normalize_name`.
    cfg: from `config_from_official` (its `lora` must be set iff adapters are kept).
    hf_config: the official config.json (for `mm_projector_type` without `model_cfg`).
    adapter_config: PEFT's adapter_config.json, needed when the state dict has adapters.
    merge_lora: fold adapters into the weights (True) or keep them as `lora_a`/`lora_b`.
    model_cfg: the whole model (`UniMoEConfig(decoder=cfg, **tower_configs(...)[0])`); needed
      when the state dict holds tower or aligner tensors. None converts a language model (plus
      the projector, if any).
  Raises:
    ValueError naming missing, unexpected or wrong-shaped tensors (by their official names).
  """
  towers = {k: v for k, v in state_dict.items() if official_towers.is_tower_tensor(k)}
  if towers and model_cfg is None:
    names = sorted(towers)
    more = ' ...' if len(names) > 8 else ''
    raise ValueError(f'tower/aligner tensors need the model configuration (model_cfg, from '
                     f'official_towers.tower_configs): {names[:8]}{more}')
  has_lora = bool(_lora_modules(state_dict))
  if has_lora and adapter_config is None:
    raise ValueError('the state dict has LoRA adapters but no adapter_config.json was found')
  entries: Mapping[str, Any] = state_dict
  if has_lora and merge_lora:
    entries = merge_adapters(state_dict, lora_scale(adapter_config))
  projector_names = {k: v for k, v in entries.items() if k.startswith(PROJECTOR_PREFIX)}
  decoder_sd = {_to_mixtral_name(k): v for k, v in entries.items()
                if not k.startswith(PROJECTOR_PREFIX) and k not in towers}
  params: Dict[str, Any] = {}
  try:
    adapters = None
    if has_lora and not merge_lora:
      if cfg.lora is None:
        raise ValueError('adapters are kept but the DecoderConfig has no lora')
      if not np.isclose(cfg.lora.scale, lora_scale(adapter_config)):
        raise ValueError(f'LoRAConfig.scale {cfg.lora.scale} differs from the adapter '
                         f'config {lora_scale(adapter_config)}')
      lora_names = {k: decoder_sd.pop(k) for k in list(decoder_sd) if k.endswith(_LORA_SUFFIXES)}
      official_lora = {_to_official_names(k): v for k, v in lora_names.items()}
      r = TensorReader(official_lora)
      adapters = _kept_adapters(r, cfg)
      r.finish()  # Adapters on modules we cannot adapt (lm_head, mlp.gate) are unexpected.
    params['decoder'] = hf.decoder_params_from_hf(decoder_sd, cfg)
    if adapters is not None:
      _deep_update(params['decoder'], adapters)
  except ValueError as e:
    raise ValueError(_to_official_names(str(e))) from None
  if model_cfg is not None:
    if projector_names and model_cfg.vision is None:
      raise ValueError(f'the checkpoint holds the vision projector {sorted(projector_names)[:2]}'
                       ' but no CLIP tower was found: pass the vision tower (--vision_tower)')
    params.update(official_towers.tower_params(towers, model_cfg))
  if projector_names or (model_cfg is not None and model_cfg.vision is not None):
    kind = (model_cfg.vision_projector if model_cfg is not None
            else hf_config.get('mm_projector_type', 'linear'))
    params['vision_projector'] = clip_convert.projector_params_from_hf(
        projector_names, kind, prefix=PROJECTOR_PREFIX)
  return params
