"""Official Uni-MoE v1 checkpoints (Uni_MoE/*/model, PEFT LoRA, DeepSpeed MoE) -> `UniMoE` params.

Released checkpoints and the code that builds them (read in HITsz-TMG/UMOE-Scaling-Unified-
Multimodal-LLMs, directory Uni_MoE/):

  4 experts, `Uni_MoE_speech` (speech-e2): every decoder layer is a `MoeLayer`.
  4 experts, `Uni_MoE_audio` (audio-e2) and `Uni_MoE_speech_dp` (speech_dp): `MoeLayer` on layers
      0, 2, 4, ... only (`LlamaDecoderLayer(..., Layer_num)`: `Layer_num % 2 == 0`), a dense
      `LlamaMLP` on the odd ones. Nothing in config.json tells these variants apart from
      `Uni_MoE_speech`: the layers that hold a router (`mlp.gate.weight`) do.
  8 experts, `Uni_MoE_8e` (8e-e2, with the expert set 8e-Experts): DeepSpeed `MoE` on the layers
      `moe_type` / `moe_stride` of config.json select (`modeling_llama_dp.py`: 'sparse' -> every
      layer with `layer_num % moe_stride == 0`, 'dense' -> all), each expert and each dense FFN an
      `LlamaMLPLoRA` (loralib adapters `*_proj_lora_A/B` inside, rank `lora_r`, scale
      `lora_alpha / lora_r` of config.json).

Tensor names, after `normalize_name` (which maps the DeepSpeed / loralib spellings onto the
MoeLayer ones, so one reader serves every variant):

    model.embed_tokens.weight, model.norm.weight, lm_head.weight           LLaMA base
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    model.layers.{i}.{input,post_attention}_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight                        dense FFN
    model.layers.{i}.mlp.gate.weight                                       router
        (DeepSpeed: mlp.deepspeed_moe.gate.wg.weight, float32)
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight            experts
        (DeepSpeed: mlp.deepspeed_moe.experts.deepspeed_experts.{e}.*)
    <module>.loralib_{A,B}.weight     loralib adapters of `LlamaMLPLoRA` (`<proj>_lora_{A,B}`)
    model.mm_projector.{0,2}.{weight,bias} (mlpNx_gelu) or .{weight,bias}  -> vision_projector
    model.vision_tower.*, model.audio_tower.*, model.mm_audio_aligner.*, model.query_tokens
        towers and aligners: official_towers.py.

PEFT wraps the model as `base_model.model.` and adds `<module>.lora_A.weight` `[rank, in]` and
`<module>.lora_B.weight` `[out, rank]` (newer PEFT also moves the base weight to
`<module>.base_layer.weight`); LoRA targets every LLM Linear except the router and `lm_head`
(train.py `find_all_llm_linear_names`; the 8e one also skips the DeepSpeed experts but not the
loralib Linears of the dense FFNs, so PEFT may adapt an adapter: `mlp.gate_proj_lora_A.lora_A`).
Merging gives `W + (alpha / rank) · B·A` (PEFT's `merge_and_unload`, loralib's merge);
official_lora.py merges the adapters or keeps them as ours.

The 8e expert weights are saved per rank (train.py: `{rank}_mlp_experts.bin`, keys
`model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{local}.{module}.weight`) and the
FFNs the experts started from in the expert set (`--mlp_dir`: `mlp_audiocap.bin`, ...). The
official loader (all_builder.py `load_all_pretrained_model_dp`) reads file `{n}_mlp_experts.bin`
as expert n, updated with `OFFICIAL_EXPERT_SET[n]` of the expert set (the expert set wins for a
name in both), and renames each key by `key.split('.')[2]` (layer) and `key.split('.')[-2]`
(module): `expert_file_entries` does the same. Entries for layers that are not MoE are ignored,
as its `load_state_dict(strict=False)` does.

Routers. The 4-expert `MoeLayer` takes top-k of the logits of a model-dtype Linear and a softmax
over them (= Mixtral's rule; `MoEConfig.router_dtype` = the model dtype). DeepSpeed's
`top2gating` (fp32 gate, `drop_tokens=False`) takes softmax over all experts, the argmax, and
the argmax of the logits plus Gumbel noise without the first (`MoEConfig.second_expert_sampling`),
weights `p_i / (p_1 + p_2)`; its `l_aux` counts first choices only (`load_balance_loss_form`
'top1', weighted by `aux_balance_loss_coef` when `aux_balance_loss`).
"""

import dataclasses
import os
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from unimoe_jax.config import DecoderConfig, LoRAConfig, MoEConfig
from unimoe_jax.convert import clip as clip_convert
from unimoe_jax.convert import experts as experts_lib
from unimoe_jax.convert import hf
from unimoe_jax.convert import io as ckpt_io
from unimoe_jax.convert import official_lora
from unimoe_jax.convert import official_towers
from unimoe_jax.convert.common import TensorReader
from unimoe_jax.convert.io import LazyStateDict, LazyTensor
from unimoe_jax.network import UniMoEConfig

PROJECTOR_PREFIX = official_towers.VISION_PROJECTOR_PREFIX
# Files the official training scripts write beside (or instead of) the model weights, in the
# order the official loader applies them (later ones override earlier ones).
OFFICIAL_EXTRA_FILES = (
    official_towers.TRAINABLES_FILE,
    'adapter_model.safetensors',
    'adapter_model.bin',
    'mm_projector.bin',
    'mm_audio_aligner.bin',
    'mlp_gates.bin',
)
# The 8e expert weights, one file per expert (train.py `{rank}_mlp_experts.bin`).
RANK_EXPERT_FILE = re.compile(r'^(\d+)_mlp_experts\.bin$')
# all_builder.py / train.py `ori_expert_list`: the expert set file of each 8e expert, in order.
OFFICIAL_EXPERT_SET = experts_lib.OFFICIAL_EXPERT_SET
# The official LLaMA rotary embedding (`LlamaRotaryEmbedding(head_dim, max_position_embeddings)`)
# never passes a base: it is 10000 whatever config.json says.
OFFICIAL_ROPE_THETA = 10000.0

_EXPERT_TO_MIXTRAL = {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}
_PROJ = ('gate_proj', 'up_proj', 'down_proj')
_EXPERT_MODULES = _PROJ + tuple(f'{p}_lora_{x}' for p in _PROJ for x in 'AB')
_DS_EXPERTS = re.compile(r'\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.')
_LORALIB_NAME = re.compile(r'\.(gate_proj|up_proj|down_proj)_lora_([AB])\.')
_LAYER = re.compile(r'^model\.layers\.(\d+)\.')
# Training-only fields of the official 8e config.json (losses we do not reproduce).
_TRAINING_ONLY = ('aux_multimodal_loss', 'aux_kl_loss')


def normalize_name(name: str) -> str:
  """PEFT / DeepSpeed / loralib spellings -> the plain `LlavaLlamaForCausalLM` (MoeLayer) names."""
  if name.startswith('base_model.model.'):
    name = name[len('base_model.model.') :]
  name = name.replace('.base_layer.', '.')
  name = re.sub(r'\.(lora_[AB])\.default\.', r'.\1.', name)
  name = name.replace('.mlp.deepspeed_moe.gate.wg.', '.mlp.gate.')
  name = _DS_EXPERTS.sub(r'.mlp.experts.\1.', name)
  return _LORALIB_NAME.sub(r'.\1.loralib_\2.', name)


def _layer_of(name: str) -> Optional[int]:
  m = _LAYER.match(name)
  return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# Reading the files.


def expert_file_entries(path: str, expert: int) -> Dict[str, LazyTensor]:
  """The tensors of one 8e expert file (`{n}_mlp_experts.bin` or an expert-set FFN file) as
  expert `expert` of each layer, renamed by the official loader's rule (`key.split('.')[2]` is
  the layer, `key.split('.')[-2]` the module). A rank file holding more than one expert is an
  error: the official loader would fold them onto one expert."""
  entries = ckpt_io.file_entries(path)
  local = sorted({int(m.group(1)) for key in entries for m in [_DS_EXPERTS.search(key)] if m})
  if len(local) > 1:
    raise ValueError(
        f'{path} holds the experts {local} of one rank; the official loader '
        '(all_builder.py) reads one expert per {n}_mlp_experts.bin file (training '
        'with ep_size = num_experts)'
    )
  out: Dict[str, LazyTensor] = {}
  for key, value in entries.items():
    parts = key.split('.')
    if (
        len(parts) < 5
        or parts[:2] != ['model', 'layers']
        or not parts[2].isdigit()
        or (parts[-1] != 'weight' or parts[-2] not in _EXPERT_MODULES)
    ):
      raise ValueError(
          f'{path}: {key!r} is not an expert FFN tensor '
          f'(model.layers.<i>...<{"|".join(_EXPERT_MODULES)}>.weight)'
      )
    name = (
        f'model.layers.{parts[2]}.mlp.deepspeed_moe.experts.deepspeed_experts.{expert}.'
        f'{parts[-2]}.weight'
    )
    if name in out:
      raise ValueError(f'{path}: two tensors are layer {parts[2]} {parts[-2]} ({key!r})')
    out[name] = value
  return out


@dataclasses.dataclass
class OfficialFiles:
  """What `open_official` read: the normalised state dict and what it learned on the way."""

  state_dict: LazyStateDict
  deepspeed: bool  # DeepSpeed MoE tensors (the 8e model)
  expert_tensors: Tuple[str, ...] = ()  # names that came from expert files
  notes: List[str] = dataclasses.field(default_factory=list)


def open_official(
    input_dir: str,
    base_dir: Optional[str] = None,
    expert_dir: Optional[str] = None,
    expert_files: Optional[Sequence[str]] = None,
) -> OfficialFiles:
  """The weights of an official checkpoint, in the official loader's order: --base (read
  first), --input's own weights, its `OFFICIAL_EXTRA_FILES`, then the 8e expert files
  (`{n}_mlp_experts.bin` of --input, updated with the expert set of `expert_dir`:
  `expert_files[n]` + '.bin', default `OFFICIAL_EXPERT_SET`). Later files override earlier ones
  for a name they share."""
  parts = []
  if base_dir:
    parts.append(ckpt_io.open_state_dict(base_dir))
  try:
    parts.append(ckpt_io.open_state_dict(input_dir))
  except FileNotFoundError:
    if not base_dir:
      raise
  for name in OFFICIAL_EXTRA_FILES:
    path = os.path.join(input_dir, name)
    if os.path.exists(path):
      parts.append(ckpt_io.open_files([path]))
  notes = []
  if os.path.exists(os.path.join(input_dir, 'fm_adapter.bin')):
    notes.append('fm_adapter.bin not read: only a use_fm_block model runs it')
  raw_names = {n for part in parts for n in part}
  experts: Dict[str, LazyTensor] = {}
  files = []
  rank_files = sorted(
      (int(m.group(1)), f) for f in os.listdir(input_dir) for m in [RANK_EXPERT_FILE.match(f)] if m
  )
  for n, f in rank_files:
    experts.update(expert_file_entries(os.path.join(input_dir, f), n))
    files.append(os.path.join(input_dir, f))
  if expert_dir:
    names = list(expert_files or OFFICIAL_EXPERT_SET)
    for n, stem in enumerate(names):
      path = os.path.join(
          expert_dir, stem if stem.endswith(('.bin', '.pt', '.safetensors')) else stem + '.bin'
      )
      if not os.path.exists(path):
        raise FileNotFoundError(f'expert set file {path} (expert {n}) does not exist')
      experts.update(expert_file_entries(path, n))  # The expert set wins, as in all_builder.py.
      files.append(path)
  elif expert_files:
    raise ValueError('expert_files needs expert_dir')
  if experts:
    parts.append(LazyStateDict(experts, files))
  merged = LazyStateDict()
  for part in parts:
    merged = merged.merge(part.renamed(normalize_name))
  deepspeed = bool(experts) or any('.deepspeed_moe.' in n for n in raw_names)
  return OfficialFiles(merged, deepspeed, tuple(normalize_name(n) for n in experts), notes)


# ---------------------------------------------------------------------------------------------
# The layout: which layers are MoE, which router rule, which adapters.


def _has_moe(hf_config: Mapping[str, Any]) -> bool:
  return hf_config.get('moe') is not None or bool(hf_config.get('num_experts'))


def moe_layers(hf_config: Mapping[str, Any], names: Sequence[str]) -> Tuple[int, ...]:
  """The MoE layers: `moe_type` / `moe_stride` when config.json has them (the 8e code), else
  the layers that hold a router (the 4-expert variants hard-code their rule: every layer in
  Uni_MoE_speech, the even ones in Uni_MoE_audio and Uni_MoE_speech_dp)."""
  if not _has_moe(hf_config):
    return ()
  n = int(hf_config['num_hidden_layers'])
  routers = sorted({_layer_of(k) for k in names if k.endswith('.mlp.gate.weight')} - {None})
  if hf_config.get('moe_type') is not None:
    kind = hf_config['moe_type']
    if kind == 'dense':
      layers = tuple(range(n))
    elif kind == 'sparse':
      stride = int(hf_config.get('moe_stride') or 0)
      if stride <= 0:
        raise ValueError(
            f"config.json moe_type 'sparse' needs a positive moe_stride, got "
            f'{hf_config.get("moe_stride")!r}'
        )
      layers = tuple(i for i in range(n) if i % stride == 0)
    else:
      raise ValueError(
          f"config.json moe_type must be 'sparse' or 'dense' (modeling_llama_dp.py), "
          f'got {kind!r}'
      )
    stray = sorted(set(routers) - set(layers))
    if stray:
      raise ValueError(
          f'routers (mlp.gate / deepspeed_moe.gate) on layers {stray}, which '
          f'config.json moe_type={kind!r} moe_stride={hf_config.get("moe_stride")!r} '
          f'makes dense'
      )
    return layers
  if not routers:
    routers = sorted({_layer_of(k) for k in names if '.mlp.experts.' in k} - {None})
  if not routers:
    raise ValueError(
        'config.json enables MoE (moe / num_experts) but no layer holds a router '
        '(model.layers.<i>.mlp.gate.weight) or experts; is mlp_gates.bin or the '
        'base model (--base) missing?'
    )
  return tuple(routers)


def layers_pattern(layers: Sequence[int], num_layers: int):
  """`MoEConfig.layers` for a set of layer indices: 'all', 'even', 'odd' or the indices."""
  layers = tuple(sorted(layers))
  if layers == tuple(range(num_layers)):
    return 'all'
  if layers == tuple(range(0, num_layers, 2)):
    return 'even'
  if layers == tuple(range(1, num_layers, 2)):
    return 'odd'
  return layers


def prune(
    files: OfficialFiles, hf_config: Mapping[str, Any], layers: Sequence[int]
) -> Tuple[LazyStateDict, List[str]]:
  """Drops what the official model never loads, naming it in the returned notes:
  - a base model's dense FFN (`mlp.{gate,up,down}_proj.weight`) on an MoE layer (the 8e base is
    the dense speech base; `from_pretrained` skips these unexpected keys);
  - expert-file tensors of layers that are not MoE (`load_state_dict(strict=False)` skips them);
  - PEFT adapters of a dense FFN's loralib Linears whose weights no file holds: the official
    loader initialises those Linears at random (`_init_weights`, not saved anywhere), so that
    part of the 8e dense FFNs cannot be reproduced; converted as absent (zero).
  """
  entries = dict(files.state_dict.items())
  notes = list(files.notes)
  moe = set(layers)
  dense_ffn = [
      k
      for k in entries
      if _layer_of(k) in moe and re.search(r'\.mlp\.(gate_proj|up_proj|down_proj)\.weight$', k)
  ]
  for k in dense_ffn:
    del entries[k]
  if dense_ffn:
    notes.append(
        f'{len(dense_ffn)} dense FFN tensors of MoE layers not loaded (the official '
        f'model has no dense FFN there), e.g. {dense_ffn[0]}'
    )
  from_experts = [k for k in files.expert_tensors if k in entries and _layer_of(k) not in moe]
  for k in from_experts:
    del entries[k]
  if from_experts:
    notes.append(
        f'{len(from_experts)} expert-file tensors of dense layers ignored (as the '
        f'official loader does), e.g. {from_experts[0]}'
    )
  orphans = [
      (a, b)
      for module, (a, b) in official_lora.adapter_modules(
          entries, official_lora.PEFT_SUFFIXES
      ).items()
      if module.endswith(('.loralib_A', '.loralib_B')) and f'{module}.weight' not in entries
  ]
  for a, b in orphans:
    del entries[a], entries[b]
  if orphans:
    layers_hit = sorted({_layer_of(a) for a, _ in orphans})
    notes.append(
        f'not reproducible: PEFT adapters of {len(orphans)} loralib Linears of dense '
        f'FFNs (layers {layers_hit}, e.g. {orphans[0][0]}) whose weights no file holds; '
        'the official loader initialises those Linears at random; converted as zero'
    )
  if hf_config.get('lora_r') and files.deepspeed:
    dense = [
        i
        for i in range(int(hf_config['num_hidden_layers']))
        if i not in moe and f'model.layers.{i}.mlp.gate_proj.loralib_A.weight' not in entries
    ]
    if dense:
      notes.append(
          f'not reproducible: config.json lora_r={hf_config["lora_r"]} gives the dense '
          f'FFNs of layers {dense} loralib adapters (LlamaMLPLoRA) that no file holds; '
          'the official loader initialises them at random; converted as zero'
      )
  return LazyStateDict(entries, files.state_dict.files), notes


def _check_supported(hf_config: Mapping[str, Any], deepspeed: bool) -> List[str]:
  """Raises naming a config.json field whose forward pass we do not implement; returns notes on
  fields that have no effect here."""
  bad = []
  if hf_config.get('use_fm_block'):
    bad.append('use_fm_block=True (per-modality Conv1d blocks before the router, LlamaFmModel)')
  if hf_config.get('rope_scaling'):
    bad.append(f'rope_scaling={hf_config["rope_scaling"]!r}')
  if hf_config.get('hidden_act', 'silu') != 'silu':
    bad.append(f'hidden_act={hf_config["hidden_act"]!r}')
  if deepspeed and _has_moe(hf_config) and int(hf_config.get('num_experts_per_tok', 2)) != 2:
    bad.append(
        f'num_experts_per_tok={hf_config["num_experts_per_tok"]} with DeepSpeed MoE '
        '(top1gating weights the expert by its probability, not 1)'
    )
  if bad:
    raise ValueError('config.json fields this converter cannot honour: ' + '; '.join(bad))
  notes = []
  theta = hf_config.get('rope_theta')
  if theta is not None and float(theta) != OFFICIAL_ROPE_THETA:
    notes.append(
        f'config.json rope_theta={theta} ignored: the official LlamaRotaryEmbedding '
        f'always uses {OFFICIAL_ROPE_THETA:g}'
    )
  for field in _TRAINING_ONLY:
    if hf_config.get(field):
      notes.append(
          f'config.json {field}={hf_config[field]!r}: a training loss of the official '
          '8e code, not reproduced (no effect on the forward pass)'
      )
  return notes


def config_from_official(
    hf_config: Mapping[str, Any],
    adapter_config: Optional[Mapping[str, Any]],
    layers: Sequence[int],
    deepspeed: bool,
    scales: official_lora.AdapterScales,
    keep_lora: bool,
    **overrides,
) -> Tuple[DecoderConfig, List[str]]:
  """(our DecoderConfig, notes) from the official `config.json`.

  Read: the LLaMA sizes and `rms_norm_eps`; `moe` / `num_experts` / `num_experts_per_tok`; the
  MoE layers (`moe_layers`); with DeepSpeed, `aux_balance_loss` / `aux_balance_loss_coef`; with
  adapters kept, PEFT's adapter_config.json (`r`, `lora_alpha`, `lora_dropout`) and the loralib
  `lora_r` / `lora_alpha` / `lora_dropout`. `rope_theta` is 10000 (the official rotary embedding
  ignores the field). Raises naming a field we cannot honour.
  """
  notes = _check_supported(hf_config, deepspeed)
  dtype = overrides.get('dtype', DecoderConfig.dtype)
  n = int(hf_config['num_hidden_layers'])
  moe = None
  if _has_moe(hf_config):
    options = dict(
        num_experts=int(hf_config['num_experts']),
        num_experts_per_tok=int(hf_config['num_experts_per_tok']),
        layers=layers_pattern(layers, n),
    )
    if deepspeed:  # DeepSpeed top2gating: fp32 gate, sampled 2nd expert, first-choice l_aux.
      coef = (
          float(hf_config.get('aux_balance_loss_coef') or 0.0)
          if hf_config.get('aux_balance_loss')
          else 0.0
      )
      options.update(
          router_dtype='float32',
          second_expert_sampling=True,
          load_balance_loss_form='top1',
          load_balance_loss_coef=coef,
      )
    else:  # MoeLayer: the gate is a Linear in the model dtype; no auxiliary loss.
      options.update(router_dtype=dtype, load_balance_loss_coef=0.0)
    moe = MoEConfig(**options)
  lora = None
  if keep_lora and (scales.peft is not None or scales.loralib is not None):
    if scales.peft is not None:
      rank, alpha = int(adapter_config['r']), float(adapter_config['lora_alpha'])
      dropout = float(adapter_config.get('lora_dropout', 0.0) or 0.0)
    else:
      rank, alpha = int(hf_config['lora_r']), float(hf_config['lora_alpha'])
      dropout = float(hf_config.get('lora_dropout', 0.0) or 0.0)
    if (
        scales.peft is not None
        and scales.loralib is not None
        and (int(hf_config['lora_r']) != rank or not np.isclose(scales.loralib, scales.peft))
    ):
      raise ValueError(
          f'the loralib adapters (config.json lora_r={hf_config["lora_r"]}, lora_alpha='
          f'{hf_config["lora_alpha"]}) and the PEFT ones (adapter_config.json r={rank}, '
          f'lora_alpha={alpha:g}) differ in rank or scale; one LoRAConfig cannot keep both: '
          'pass --merge_lora'
      )
    lora = LoRAConfig(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        targets=('query', 'key', 'value', 'out', 'mlp', 'experts'),
    )
  base = {k: v for k, v in hf_config.items() if k != 'num_local_experts'}
  base['rope_theta'] = OFFICIAL_ROPE_THETA
  base.pop('rope_parameters', None)
  return hf.config_from_hf(base, moe=moe, lora=lora, **overrides), notes


# ---------------------------------------------------------------------------------------------
# Parameters.


def _deep_update(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
  for k, v in extra.items():
    if isinstance(v, Mapping):
      _deep_update(base.setdefault(k, {}), v)
    else:
      base[k] = v
  return base


def _to_mixtral_name(name: str) -> str:
  return re.sub(
      r'\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.',
      lambda m: f'.experts.{m.group(1)}.{_EXPERT_TO_MIXTRAL[m.group(2)]}.',
      name,
  )


def _to_official_names(message: str) -> str:
  back = {v: k for k, v in _EXPERT_TO_MIXTRAL.items()}
  return re.sub(
      r'\.experts\.(\d+)\.(w1|w2|w3)\.',
      lambda m: f'.experts.{m.group(1)}.{back[m.group(2)]}.',
      message,
  )


def params_from_official(
    state_dict: LazyStateDict,
    cfg: DecoderConfig,
    hf_config: Mapping[str, Any],
    scales: official_lora.AdapterScales = official_lora.AdapterScales(None, None),
    merge_lora: bool = True,
    model_cfg: Optional[UniMoEConfig] = None,
) -> Dict[str, Any]:
  """The `UniMoE` params tree: 'decoder', 'vision_projector' when present, and with `model_cfg`
  the towers and connectors it builds (official_towers.py).

  Args:
    state_dict: names already passed through `normalize_name` (and `prune`).
    cfg: from `config_from_official` (its `lora` must be set iff adapters are kept).
    hf_config: the official config.json (for `mm_projector_type` without `model_cfg`).
    scales: from `adapter_scales`.
    merge_lora: fold adapters into the weights (True) or keep them as `lora_a`/`lora_b`.
      PEFT adapters of loralib Linears are folded into those either way.
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
    raise ValueError(
        f'tower/aligner tensors need the model configuration (model_cfg, from '
        f'official_towers.tower_configs): {names[:8]}{more}'
    )
  entries: LazyStateDict = state_dict
  if scales.peft is not None:  # PEFT adapters of loralib Linears: always into those Linears.
    entries = official_lora.merge_adapters(
        entries, scales.peft, only=lambda m: m.endswith(('.loralib_A', '.loralib_B'))
    )
  if merge_lora:
    if scales.peft is not None:
      entries = official_lora.merge_adapters(entries, scales.peft)
    if scales.loralib is not None:
      entries = official_lora.merge_adapters(
          entries, scales.loralib, official_lora.LORALIB_SUFFIXES
      )
  elif scales.peft is not None and scales.loralib is not None:
    # A projection with both (an 8e dense FFN): keep the PEFT adapter, which the official run
    # trains, and fold the loralib one, which it freezes (train.py trains loralib adapters only
    # under mlp.deepspeed_moe.); the forward pass is the same.
    peft = set(official_lora.adapter_modules(entries, official_lora.PEFT_SUFFIXES))
    entries = official_lora.merge_adapters(
        entries, scales.loralib, official_lora.LORALIB_SUFFIXES, only=lambda m: m in peft
    )
  projector_names = {k: v for k, v in entries.items() if k.startswith(PROJECTOR_PREFIX)}
  decoder_sd = {
      _to_mixtral_name(k): v
      for k, v in entries.items()
      if not k.startswith(PROJECTOR_PREFIX) and k not in towers
  }
  params: Dict[str, Any] = {}
  try:
    adapters = None
    if not merge_lora and (scales.peft is not None or scales.loralib is not None):
      if cfg.lora is None:
        raise ValueError('adapters are kept but the DecoderConfig has no lora')
      for scale in (scales.peft, scales.loralib):
        if scale is not None and not np.isclose(cfg.lora.scale, scale):
          raise ValueError(f"LoRAConfig.scale {cfg.lora.scale} differs from the adapters' {scale}")
      decoder_sd = official_lora.as_peft_names(decoder_sd)
      lora_names = {
          k: decoder_sd.pop(k) for k in list(decoder_sd) if k.endswith(official_lora.PEFT_SUFFIXES)
      }
      r = TensorReader({_to_official_names(k): v for k, v in lora_names.items()})
      adapters = official_lora.kept_adapters(r, cfg)
      r.finish()  # Adapters on modules we cannot adapt (lm_head, mlp.gate) are unexpected.
    params['decoder'] = hf.decoder_params_from_hf(decoder_sd, cfg)
    if adapters is not None:
      _deep_update(params['decoder'], adapters)
  except ValueError as e:
    raise ValueError(_to_official_names(str(e))) from None
  if model_cfg is not None:
    if projector_names and model_cfg.vision is None:
      raise ValueError(
          f'the checkpoint holds the vision projector {sorted(projector_names)[:2]}'
          ' but no CLIP tower was found: pass the vision tower (--vision_tower)'
      )
    params.update(official_towers.tower_params(towers, model_cfg))
  if projector_names or (model_cfg is not None and model_cfg.vision is not None):
    kind = (
        model_cfg.vision_projector
        if model_cfg is not None
        else hf_config.get('mm_projector_type', 'linear')
    )
    params['vision_projector'] = clip_convert.projector_params_from_hf(
        projector_names, kind, prefix=PROJECTOR_PREFIX
    )
  return params


def warn(notes: Sequence[str]) -> None:
  for note in notes:
    print(f'convert_checkpoint: {note}', file=sys.stderr)
