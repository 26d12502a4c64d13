"""Our decoder parameters -> a Hugging Face `save_pretrained` directory (LLaMA or Mixtral).

The inverse of `convert/hf.py`, read from the same table (`hf.tensor_table`): every tensor is
the exact transpose / reshape of one of our leaves (float32 in, float32 out, so HF -> ours -> HF
gives the same bytes). A dense decoder becomes `LlamaForCausalLM`, one with an MoE FFN on every
layer `MixtralForCausalLM` (experts in the Hub's per-expert layout
`block_sparse_moe.experts.{e}.w1/w2/w3`, which transformers 4 and 5 and vLLM read; transformers
5 fuses them on load). What Mixtral cannot express is refused naming the config field (MoE on
only some layers, DeepSpeed second-expert sampling); options that only change training, or
that change inference in a way transformers does not reproduce, are returned as notes.

LoRA adapters (`lora_a` / `lora_b`) are merged into the weights by default (`layers/lora.py`
`merge_lora`). Kept instead (`keep_lora=True`), they are written as a PEFT adapter
(`adapter_model.safetensors` + `adapter_config.json`, `lora_A.weight [rank, in]`,
`lora_B.weight [out, rank]`, `lora_alpha / r` = `LoRAConfig.scale`) beside an unmerged base;
adapters on expert weights cannot be kept that way (transformers 5 Mixtral stores the experts
as fused parameters, not Linear modules PEFT's LoRA targets), and are refused.

The towers and connectors of a multimodal model (given its `UniMoEConfig`) are written beside
the decoder in the official Uni-MoE layout (`convert/export_official.py`): tower directories
that transformers loads (`CLIPVisionModel`, `WhisperModel`), the official BEATs file, the trained
connectors in `non_lora_trainables.bin`, and the official config.json fields naming them.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from unimoe_jax import layer_stacking
from unimoe_jax.config import DecoderConfig
from unimoe_jax.convert import hf
from unimoe_jax.convert.common import fields_to_hf

ADAPTER_DIR = 'lora_adapter'
PEFT_PREFIX = 'base_model.model.'
DEFAULT_SHARD_BYTES = 5 * 2**30  # save_pretrained's default max_shard_size.
# Our LoRAConfig.targets -> the PEFT target module names they adapt.
_PEFT_TARGETS = {
    'query': ('q_proj',),
    'key': ('k_proj',),
    'value': ('v_proj',),
    'out': ('o_proj',),
    'mlp': ('gate_proj', 'up_proj', 'down_proj'),
}


def check_exportable(cfg: DecoderConfig) -> List[str]:
  """Raises ValueError naming the field when `cfg`'s forward pass has no LLaMA / Mixtral
  equivalent; returns notes on what the export drops or changes."""
  notes = []
  moe = cfg.moe
  if moe is not None:
    layers = list(cfg.moe_layer_indices())
    if layers != list(range(cfg.num_layers)):
      raise ValueError(
          f'MoEConfig.layers={moe.layers!r} puts the MoE FFN on layers {layers} of '
          f'{cfg.num_layers} only; MixtralForCausalLM has it on every layer and '
          f'LlamaForCausalLM on none, so this decoder has no Hugging Face equivalent'
      )
    if moe.second_expert_sampling:
      raise ValueError(
          'MoEConfig.second_expert_sampling=True (DeepSpeed top-2 gating that '
          'samples the second expert, also at inference) has no Mixtral '
          'equivalent: Mixtral takes the top-2 experts'
      )
    if moe.router_dtype != 'float32':
      notes.append(
          f'MoEConfig.router_dtype={moe.router_dtype!r}: transformers computes the '
          'router in the model dtype (float32 with this export; load with '
          f'dtype={moe.router_dtype} for the same rounding)'
      )
    if moe.dispatch == 'capacity':
      notes.append(
          "MoEConfig.dispatch='capacity' drops tokens over an expert's capacity; "
          'Mixtral is dropless, so logits differ where ours dropped'
      )
    if moe.load_balance_loss_form != 'topk':
      notes.append(
          f'MoEConfig.load_balance_loss_form={moe.load_balance_loss_form!r} is '
          "training-only; Mixtral's router_aux_loss_coef uses its own top-k form"
      )
    if moe.router_z_loss_coef:
      notes.append('MoEConfig.router_z_loss_coef is training-only and has no Mixtral field')
    if moe.router_jitter:
      notes.append(
          f'MoEConfig.router_jitter={moe.router_jitter} written as '
          "router_jitter_noise (training only; Mixtral scales the experts' input "
          "too, ours only the router's)"
      )
  if cfg.dtype != 'float32':
    notes.append(
        f'DecoderConfig.dtype={cfg.dtype!r}: the weights are written in float32 '
        f'(config.json dtype float32); load with dtype={cfg.dtype} to compute as '
        'ours does'
    )
  return notes


def hf_config(
    cfg: DecoderConfig,
    max_position_embeddings: int = 4096,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> Dict[str, Any]:
  """The `config.json` of the exported LlamaForCausalLM / MixtralForCausalLM."""
  out = {
      'architectures': ['MixtralForCausalLM' if cfg.moe else 'LlamaForCausalLM'],
      'model_type': 'mixtral' if cfg.moe else 'llama',
      **fields_to_hf(cfg, hf.DECODER_FIELDS),
      'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.resolved_head_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': max_position_embeddings,
      'rope_theta': cfg.rope_theta,
      'rope_parameters': {'rope_theta': cfg.rope_theta, 'rope_type': 'default'},
      'attention_dropout': 0.0,
      'tie_word_embeddings': False,
      'use_cache': True,
      'bos_token_id': bos_token_id,
      'eos_token_id': eos_token_id,
      'dtype': 'float32',
      'torch_dtype': 'float32',
      'initializer_range': 0.02,
  }
  if cfg.moe:
    out.update(
        num_local_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.num_experts_per_tok,
        router_jitter_noise=cfg.moe.router_jitter,
        router_aux_loss_coef=cfg.moe.load_balance_loss_coef,
        output_router_logits=False,
        sliding_window=None,
    )
  else:
    out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  return out


def decoder_tree(params: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
  """(the looped decoder tree, names of the other top-level subtrees: towers / connectors)."""
  if 'decoder' in params:
    decoder, others = params['decoder'], sorted(k for k in params if k != 'decoder')
  else:
    decoder, others = params, []
  return layer_stacking.to_looped(decoder), others


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _has_lora(tree) -> bool:
  if not isinstance(tree, dict):
    return False
  return 'lora_a' in tree or any(_has_lora(v) for v in tree.values())


def merged(decoder: Dict[str, Any], cfg: DecoderConfig) -> Dict[str, Any]:
  """`decoder` with every adapter folded in (`merge_lora`), as numpy arrays."""
  if not _has_lora(decoder):
    return decoder
  if cfg.lora is None:
    raise ValueError(
        'the params hold LoRA adapters (lora_a / lora_b) but config.gin binds no '
        'DecoderConfig.lora: their scale is unknown'
    )
  from unimoe_jax.layers import lora as lora_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  return jax.tree_util.tree_map(np.asarray, lora_lib.merge_lora(decoder, cfg.lora.scale))


def state_dict(
    decoder: Dict[str, Any], cfg: DecoderConfig, table: Optional[Sequence[hf.Entry]] = None
) -> Iterable[Tuple[str, np.ndarray]]:
  """(HF name, float32 array) of every tensor, one at a time (`decoder` looped, no adapters
  read: pass `merged(...)` to fold them in)."""
  for entry in table if table is not None else hf.tensor_table(cfg):
    value = entry.to_hf(np.asarray(_get(decoder, entry.ours), np.float32))
    if tuple(value.shape) != tuple(entry.hf_shape):
      raise ValueError(
          f'{"/".join(entry.ours)}: gives {entry.hf} of shape {value.shape}, '
          f'expected {entry.hf_shape}'
      )
    yield entry.hf, value


def peft_adapters(
    decoder: Dict[str, Any], cfg: DecoderConfig
) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """(PEFT `adapter_model.safetensors` tensors, `adapter_config.json`) of the kept adapters."""
  if cfg.lora is None or not _has_lora(decoder):
    raise ValueError(
        '--keep_lora: the checkpoint holds no LoRA adapters (DecoderConfig.lora '
        'is None or there are no lora_a / lora_b leaves)'
    )
  tensors: Dict[str, np.ndarray] = {}
  modules = set()
  for entry in hf.tensor_table(cfg):
    if not entry.linear or entry.ours[-1] != 'kernel':
      continue
    node = _get(decoder, entry.ours[:-1])
    if 'lora_a' not in node:
      continue
    if entry.expert is not None:
      raise ValueError(
          "LoRA adapters on expert weights (LoRAConfig.targets 'experts') cannot be kept as "
          'a PEFT adapter: transformers 5 Mixtral stores the experts as fused parameters, '
          'not the Linear modules PEFT LoRA adapts; export them merged (without --keep_lora)'
      )
    out_size, in_size = entry.hf_shape
    a = np.asarray(node['lora_a'], np.float32)
    b = np.asarray(node['lora_b'], np.float32)
    rank = a.shape[-1]
    module = PEFT_PREFIX + entry.hf[: -len('.weight')]
    tensors[f'{module}.lora_A.weight'] = np.ascontiguousarray(a.reshape(in_size, rank).T)
    tensors[f'{module}.lora_B.weight'] = np.ascontiguousarray(b.reshape(rank, out_size).T)
    modules.add(entry.hf.split('.')[-2])
  config = {
      'peft_type': 'LORA',
      'task_type': 'CAUSAL_LM',
      'r': cfg.lora.rank,
      'lora_alpha': cfg.lora.alpha,
      'lora_dropout': cfg.lora.dropout,
      'target_modules': sorted(modules),
      'bias': 'none',
      'fan_in_fan_out': False,
      'use_rslora': False,
      'inference_mode': True,
      'modules_to_save': None,
      'base_model_name_or_path': None,
  }
  return tensors, config


def _save_safetensors(path: str, tensors: Dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  save_file(tensors, path, metadata={'format': 'pt'})


def write_weights(
    directory: str,
    decoder: Dict[str, Any],
    cfg: DecoderConfig,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> List[str]:
  """Writes `model.safetensors` (or `model-0000i-of-0000n.safetensors` + index, as
  save_pretrained names them) holding at most one shard in memory; returns the files."""
  table = hf.tensor_table(cfg)
  shards: List[List[hf.Entry]] = [[]]
  size = 0
  for entry in table:
    nbytes = 4 * int(np.prod(entry.hf_shape))
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  n = len(shards)
  names = (
      ['model.safetensors']
      if n == 1
      else [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
  )
  weight_map = {}
  for name, shard in zip(names, shards):
    _save_safetensors(os.path.join(directory, name), dict(state_dict(decoder, cfg, shard)))
    weight_map.update({e.hf: name for e in shard})
  if n > 1:
    total = sum(4 * int(np.prod(e.hf_shape)) for e in table)
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return names


def export(
    params: Dict[str, Any],
    cfg: DecoderConfig,
    output: str,
    keep_lora: bool = False,
    extra_files: Optional[Dict[str, str]] = None,
    max_position_embeddings: int = 4096,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    model_config=None,
) -> Dict[str, Any]:
  """Writes `output` (new; staged and renamed into place, so a failure leaves nothing) and
  returns a summary: files, notes, what was not exported.

  `model_config`: the `UniMoEConfig` of `params` when they hold towers / connectors, which are
  then written in the official layout; without it they are listed as not exported.
  """
  from unimoe_jax.convert import export_official  # pylint: disable=g-import-not-at-top

  output = os.path.abspath(output)
  if os.path.exists(output):
    raise FileExistsError(f'--output {output} already exists')
  notes = check_exportable(cfg)
  decoder, others = decoder_tree(params)
  towers = others if model_config is not None else []
  unknown = sorted(set(others) - set(export_official.TOP_LEVEL)) if towers else others
  if unknown:
    notes.append(
        f'not exported: {unknown} (only the decoder, the towers and the connectors '
        'have an export)'
    )
  adapters = None
  if keep_lora:
    adapters, adapter_config = peft_adapters(decoder, cfg)
    adapter_config['base_model_name_or_path'] = output
  else:
    decoder = merged(decoder, cfg)
    if cfg.lora is not None:
      notes.append(f'LoRA adapters merged (scale {cfg.lora.scale})')
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.partial-', dir=parent)
  try:
    files = write_weights(staging, decoder, cfg, max_shard_bytes)
    config = hf_config(cfg, max_position_embeddings)
    if towers:
      tower_files, fields, tower_notes = export_official.write(staging, params, model_config)
      files += tower_files
      config.update(fields)
      notes += tower_notes
    with open(os.path.join(staging, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2)
    for name, source in (extra_files or {}).items():
      shutil.copyfile(source, os.path.join(staging, name))
      files.append(name)
    if adapters is not None:
      os.makedirs(os.path.join(staging, ADAPTER_DIR))
      _save_safetensors(os.path.join(staging, ADAPTER_DIR, 'adapter_model.safetensors'), adapters)
      with open(os.path.join(staging, ADAPTER_DIR, 'adapter_config.json'), 'w') as f:
        json.dump(adapter_config, f, indent=2)
      files.append(ADAPTER_DIR)
    os.rename(staging, output)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return {
      'output': output,
      'architecture': hf_config(cfg)['architectures'][0],
      'files': files,
      'lora': (
          'kept as PEFT adapter in ' + ADAPTER_DIR
          if keep_lora
          else 'merged'
          if cfg.lora is not None
          else None
      ),
      'not_exported': unknown,
      'notes': notes,
  }


def config_from_gin(gin_text: str):
  """The UniMoEConfig of a checkpoint's or a training run's config.gin (`MODEL_CONFIG`, else
  `DECODER_CONFIG`); configurables of modules not imported here (the trainer's) are skipped."""
  import gin  # pylint: disable=g-import-not-at-top
  from unimoe_jax import checkpoints  # pylint: disable=g-import-not-at-top

  try:
    return checkpoints.model_config_from_gin(gin_text)
  except Exception:  # pylint: disable=broad-except
    pass  # A run's operative config names the trainer's configurables: skip those below.
  gin.clear_config()
  try:
    gin.parse_config(gin_text, skip_unknown=True)
    try:
      gin.query_parameter('%MODEL_CONFIG')
      bound = True
    except ValueError:
      bound = False
    if bound:
      gin.parse_config('unimoe_score_model_config.model = %MODEL_CONFIG')
      return checkpoints._model_config()  # pylint: disable=protected-access,no-value-for-parameter
    gin.parse_config('unimoe_score_decoder_config.decoder = %DECODER_CONFIG')
    from unimoe_jax.network import UniMoEConfig  # pylint: disable=g-import-not-at-top

    return UniMoEConfig(decoder=checkpoints._decoder_config())  # pylint: disable=protected-access,no-value-for-parameter
  finally:
    gin.clear_config()
