r"""Converts a Hugging Face or official Uni-MoE checkpoint directory into a unimoe_jax checkpoint.

    python tools/convert_checkpoint.py --source hf --input /ckpt/vicuna-7b --output /out/vicuna
    python tools/convert_checkpoint.py --source unimoe --input /ckpt/uni-moe-lora \
        --base /ckpt/llava-base --merge_lora --output /out/unimoe

--source hf: LlamaForCausalLM / Vicuna / MixtralForCausalLM (`save_pretrained` layout:
config.json + safetensors or .bin, sharded or not), or LlavaForConditionalGeneration
(model_type 'llava': CLIP tower + projector + LLaMA; config.gin then binds MODEL_CONFIG too).
--source unimoe: the official Uni-MoE v1 layout (`LlavaLlamaForCausalLM`: LLaMA base + MoE
experts + PEFT LoRA, `mm_projector`, and the towers and aligners): the weights of --input (and of
--base, read first, when the adapters were saved apart from the base model, as the official LoRA
runs do) plus any of non_lora_trainables.bin, adapter_model.{safetensors,bin}, mm_projector.bin,
mm_audio_aligner.bin, mlp_gates.bin in --input. Every released variant: the 4-expert models with
MoE on every layer (Uni_MoE_speech) or on the even layers (Uni_MoE_audio, Uni_MoE_speech_dp: read
from the layers that hold a router), and the 8-expert DeepSpeed model (Uni_MoE_8e: MoE layers
from config.json moe_type / moe_stride, expert weights from --input's {n}_mlp_experts.bin and
the expert set --expert_dir, as the official loader combines them; loralib adapters inside the
experts). LoRA adapters (PEFT and loralib) are folded into the weights with --merge_lora and kept
as adapters (DecoderConfig.lora from adapter_config.json, or config.json lora_r / lora_alpha)
otherwise. Everything is read from config.json (unimoe_jax/convert/official.py); a field that
changes the forward pass and that we do not implement is an error naming it, and what is
ignored or cannot be reproduced is printed and listed under "notes" in the summary.
Mapped (unimoe_jax/convert/official.py, official_towers.py): the LLM -> decoder,
model.mm_projector -> vision_projector, the CLIP tower model.vision_tower -> vision_tower; the
speech variant's Whisper encoder model.audio_tower, Whisper-decoder aligner
model.mm_audio_aligner.decoder + model.query_tokens and model.mm_audio_aligner.projector ->
speech_encoder / speech_aligner / speech_projector; or the audio variant's BEATs model.audio_tower,
Q-Former model.mm_audio_aligner.qformer + .query_tokens and .projector -> audio_encoder /
audio_qformer / audio_projector. Tower sizes come from the towers that config.json names
(mm_vision_tower, mm_audio_tower: a CLIP / Whisper directory's config.json, a BEATs .pt's cfg),
found locally or given with --vision_tower / --audio_tower; a tower whose tensors the checkpoint
lacks (the released LoRA checkpoints hold none) is read from there too. With any tower the
written config.gin binds MODEL_CONFIG (the whole UniMoEConfig) as well as DECODER_CONFIG.

The decoder layers are written looped (`layers_{i}`), or stacked for scanned layers with
--scan_layers (config.gin then sets DecoderConfig.scan_layers); every loader converts between
the two (unimoe_jax/layer_stacking.py), so either loads into a model of either layout.

--to hf exports the other way (unimoe_jax/convert/export_hf.py): --input is one of our
checkpoints (a converted / exported directory, a training MODEL_DIR (its latest step) or one of
its step directories, as INITIAL_CHECKPOINT_PATH accepts), --output a Hugging Face
`save_pretrained` directory: LlamaForCausalLM for a dense decoder, MixtralForCausalLM for MoE on
every layer, float32 safetensors (sharded above --max_shard_gb) + config.json + the tokenizer
files found beside --input. LoRA adapters are merged by default; --keep_lora writes them as a
PEFT adapter in OUTPUT/lora_adapter/ instead (not possible for adapters on experts). A
multimodal model's towers and connectors are written beside it in the official Uni-MoE layout
(unimoe_jax/convert/export_official.py): vision_tower/ (CLIPVisionModel), speech_tower/
(WhisperModel encoder) or BEATs.pt, the connectors in non_lora_trainables.bin under their
official names, and config.json's mm_* fields naming them.

    python tools/convert_checkpoint.py --to hf --input /runs/unimoe --output /out/unimoe-hf

The output (see unimoe_jax/checkpoints.py) is written only after the whole conversion succeeded;
a mismatch raises a ValueError naming the tensor and leaves no output directory. A JSON summary
(tensor and parameter counts, peak RSS) is printed at the end.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import jax

import flax.linen as nn
from unimoe_jax import checkpoints
from unimoe_jax import layer_stacking
from unimoe_jax.config import DecoderConfig
from unimoe_jax.convert import hf
from unimoe_jax.convert import io as ckpt_io
from unimoe_jax.convert import llava
from unimoe_jax.convert import official
from unimoe_jax.convert import official_lora
from unimoe_jax.convert import official_towers
from unimoe_jax.decoder import Decoder
from unimoe_jax.network import UniMoE, UniMoEConfig

# Files the official training scripts write beside (or instead of) the model weights.
OFFICIAL_EXTRA_FILES = official.OFFICIAL_EXTRA_FILES


def _gin_value(value: Any) -> str:
  if isinstance(value, tuple):
    return '(' + ', '.join(_gin_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return repr(value)


def _gin_block(name: str, cfg: Any, nested: Dict[str, str]) -> List[str]:
  lines = [f'{name}:']
  for field in dataclasses.fields(cfg):
    if field.name in nested:
      lines.append(f'  {field.name} = {nested[field.name]}')
    else:
      lines.append(f'  {field.name} = {_gin_value(getattr(cfg, field.name))}')
  return lines


def gin_config_text(cfg: DecoderConfig, source: str, extra_lines: Sequence[str] = ()) -> str:
  """A gin file binding `DECODER_CONFIG` to `cfg` (and its MoE / LoRA configs)."""
  lines = [
      f'# Converted by tools/convert_checkpoint.py --source {source}.',
      'from unimoe_jax import config',
      '',
      'DECODER_CONFIG = @config.DecoderConfig()',
      '',
  ]
  nested = {
      'moe': '@config.MoEConfig()' if cfg.moe else 'None',
      'lora': '@config.LoRAConfig()' if cfg.lora else 'None',
  }
  lines += _gin_block('config.DecoderConfig', cfg, nested)
  if cfg.moe:
    lines += [''] + _gin_block('config.MoEConfig', cfg.moe, {})
  if cfg.lora:
    lines += [''] + _gin_block('config.LoRAConfig', cfg.lora, {})
  lines += list(extra_lines)
  return '\n'.join(lines) + '\n'


def _check_shapes(params: Dict[str, Any], abstract_params, what: str) -> None:
  """Raises ValueError naming every leaf of `params` whose path or shape differs."""
  flat_expected = {
      jax.tree_util.keystr(k): tuple(v.shape)
      for k, v in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params))[0]
  }
  flat_got = {
      jax.tree_util.keystr(k): tuple(v.shape)
      for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  missing = sorted(set(flat_expected) - set(flat_got))
  extra = sorted(set(flat_got) - set(flat_expected))
  shapes = sorted(
      f'{k}: {flat_got[k]} != {flat_expected[k]}'
      for k in set(flat_got) & set(flat_expected)
      if flat_got[k] != flat_expected[k]
  )
  if missing or extra or shapes:
    raise ValueError(
        f'{what} do not match the model: missing {missing}, '
        f'unexpected {extra}, wrong shapes {shapes}'
    )


def check_against_model(params: Dict[str, Any], cfg: DecoderConfig):
  """Raises ValueError naming every leaf whose path or shape differs from `Decoder(cfg).init`."""

  def init():
    tokens = jax.numpy.zeros((1, 1), jax.numpy.int32)
    return Decoder(cfg).init(jax.random.PRNGKey(0), tokens)

  _check_shapes(params, jax.eval_shape(init)['params'], 'converted decoder params')


def check_model_against_model(params: Dict[str, Any], model_cfg: UniMoEConfig):
  """Like `check_against_model`, for the whole `UniMoE(model_cfg)` tree."""
  items = {}
  if model_cfg.vision is not None:
    items['image'] = (model_cfg.vision.image_size, model_cfg.vision.image_size, 3)
  if model_cfg.speech_encoder is not None:
    enc = model_cfg.speech_encoder
    items['speech'] = (2 * enc.max_source_positions, enc.num_mel_bins)
  if model_cfg.audio_encoder is not None:
    enc = model_cfg.audio_encoder
    items['audio'] = (2 * enc.input_patch_size, enc.num_mel_bins)

  def init():
    batch = {'decoder_input_tokens': jax.numpy.zeros((1, 1), jax.numpy.int32)}
    for m, shape in items.items():
      batch[f'{m}_features'] = jax.numpy.zeros((1, 1) + shape)
      batch[f'{m}_mask'] = jax.numpy.ones((1, 1), bool)
    return UniMoE(model_cfg).init(jax.random.PRNGKey(0), batch)

  _check_shapes(params, jax.eval_shape(init)['params'], 'converted params')


def convert_llava(input_dir: str, dtype: str = 'bfloat16', param_dtype: str = 'float32'):
  """(params tree, UniMoEConfig, number of source tensors, source parameter count) of a HF
  LlavaForConditionalGeneration directory."""
  hf_config = ckpt_io.read_config(input_dir)
  state_dict = ckpt_io.open_state_dict(input_dir)
  model_cfg = llava.config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
  params = llava.params_from_hf(state_dict, model_cfg)
  check_model_against_model(params, model_cfg)
  count, size = ckpt_io.total_bytes(state_dict)
  return params, model_cfg, count, size


def convert_official(
    input_dir: str,
    merge_lora: bool = False,
    base_dir: Optional[str] = None,
    dtype: str = 'bfloat16',
    param_dtype: str = 'float32',
    vision_tower: Optional[str] = None,
    audio_tower: Optional[str] = None,
    expert_dir: Optional[str] = None,
    expert_files: Optional[Sequence[str]] = None,
    notes: Optional[list] = None,
):
  """(params tree, UniMoEConfig or None for a language model, DecoderConfig, number of source
  tensors, source parameter count) of an official Uni-MoE directory (--source unimoe). What is
  ignored or cannot be reproduced is appended to `notes`."""
  hf_config = ckpt_io.read_config(input_dir)
  adapter_config = ckpt_io.read_json_if_present(os.path.join(input_dir, 'adapter_config.json'))
  files = official.open_official(input_dir, base_dir, expert_dir, expert_files)
  layers = official.moe_layers(hf_config, list(files.state_dict))
  state_dict, found = official.prune(files, hf_config, layers)
  scales = official_lora.adapter_scales(state_dict, hf_config, adapter_config)
  cfg, config_notes = official.config_from_official(
      hf_config,
      adapter_config,
      layers,
      files.deepspeed,
      scales,
      keep_lora=not merge_lora,
      dtype=dtype,
      param_dtype=param_dtype,
  )
  fields, tower_tensors = official_towers.tower_configs(
      hf_config, state_dict, vision_tower, audio_tower, search_dirs=(input_dir, base_dir)
  )
  model_cfg = UniMoEConfig(decoder=cfg, **fields) if fields else None
  if tower_tensors:  # Towers the checkpoint lacks, from their own files.
    state_dict = ckpt_io.LazyStateDict(tower_tensors).merge(state_dict)
  params = official.params_from_official(
      state_dict, cfg, hf_config, scales, merge_lora=merge_lora, model_cfg=model_cfg
  )
  check_against_model(params['decoder'], cfg)
  if model_cfg is not None:
    check_model_against_model(params, model_cfg)
  count, size = ckpt_io.total_bytes(state_dict)
  if notes is not None:
    notes.extend(config_notes + found)
  return params, model_cfg, cfg, count, size


def convert(
    source: str,
    input_dir: str,
    merge_lora: bool = False,
    base_dir: Optional[str] = None,
    dtype: str = 'bfloat16',
    param_dtype: str = 'float32',
):
  """(params tree, DecoderConfig, number of source tensors, source parameter count).

  Language models, and the decoder config of an official checkpoint (`convert_official` also
  returns its UniMoEConfig); `convert_llava` converts LLaVA (`main` picks it by model_type).
  """
  if source == 'unimoe':
    params, _, cfg, count, size = convert_official(
        input_dir, merge_lora, base_dir, dtype, param_dtype
    )
    return params, cfg, count, size
  if source != 'hf':
    raise ValueError(f"--source must be 'hf' or 'unimoe', got {source!r}")
  hf_config = ckpt_io.read_config(input_dir)
  if hf_config.get('model_type') not in (None, 'llama', 'mistral', 'mixtral'):
    raise ValueError(
        f'--source hf converts LLaMA / Vicuna / Mixtral language models; '
        f'{input_dir} has model_type {hf_config.get("model_type")!r}'
    )
  state_dict = ckpt_io.open_state_dict(input_dir)
  cfg = hf.config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
  params = {'decoder': hf.decoder_params_from_hf(state_dict, cfg)}
  check_against_model(params['decoder'], cfg)
  count, size = ckpt_io.total_bytes(state_dict)
  return params, cfg, count, size


def _tokenizer_from_json(directory: str, files: Dict[str, str], notes: List[str]) -> bool:
  """A directory with `tokenizer.json` but no `tokenizer.model`: the SentencePiece model the
  tokenizer.json wraps (data/vocabulary.py), written as the checkpoint's tokenizer.model; a
  note says why not when it wraps none. True when one was written."""
  from unimoe_jax.data import vocabulary  # pylint: disable=g-import-not-at-top

  path = os.path.join(directory, vocabulary.TOKENIZER_JSON_FILE)
  if not os.path.exists(path):
    return False
  try:
    model = vocabulary.sentencepiece_from_tokenizer_json_file(path)
  except ValueError as e:
    notes.append(f'no tokenizer.model written: {e}; our vocabulary is a SentencePiece model')
    print(f'convert_checkpoint: {notes[-1]}', file=sys.stderr)
    return False
  with tempfile.NamedTemporaryFile(suffix='.model', delete=False) as f:
    f.write(model)
  files[checkpoints.TOKENIZER_FILE] = f.name
  config = os.path.join(directory, vocabulary.TOKENIZER_CONFIG_FILE)
  if os.path.exists(config):
    files[vocabulary.TOKENIZER_CONFIG_FILE] = config
  notes.append(f'tokenizer.model rebuilt from {path} (the SentencePiece BPE model it wraps)')
  return True


def export_hf(args) -> int:
  """--to hf: one of our checkpoints (or a training run) -> a Hugging Face directory."""
  from unimoe_jax.convert import export_hf as export_lib  # pylint: disable=g-import-not-at-top
  from unimoe_jax.data.vocabulary import TOKENIZER_CONFIG_FILE  # pylint: disable=g-import-not-at-top

  directory, step = checkpoints.locate(args.input, '--input')
  params, gin_text = checkpoints.read_params(args.input, '--input')
  if gin_text is None:
    raise ValueError(
        f'--input {args.input}: no config.gin found beside the parameters (a '
        'training run keeps it in MODEL_DIR/config.gin)'
    )
  model_config = export_lib.config_from_gin(gin_text)
  cfg = model_config.decoder
  files = {}
  # The tokenizer beside a converted checkpoint, or in the run's MODEL_DIR.
  for where in (directory, os.path.join(directory, '..', '..')):
    if os.path.exists(os.path.join(where, checkpoints.TOKENIZER_FILE)) and not files:
      for name in (
          checkpoints.TOKENIZER_FILE,
          TOKENIZER_CONFIG_FILE,
          'tokenizer.json',
          'special_tokens_map.json',
      ):
        if os.path.exists(os.path.join(where, name)):
          files[name] = os.path.join(where, name)
  summary = export_lib.export(
      params,
      cfg,
      args.output,
      keep_lora=args.keep_lora,
      extra_files=files,
      max_position_embeddings=args.max_position_embeddings,
      max_shard_bytes=int(args.max_shard_gb * 2**30),
      model_config=model_config,
  )
  if not files:
    summary['notes'].append(
        f'no {checkpoints.TOKENIZER_FILE} beside --input: copy the '
        'tokenizer into the output yourself'
    )
  summary.update(
      input=directory,
      step=step,
      moe=cfg.moe is not None,
      peak_rss_mib=round(ckpt_io.peak_rss_bytes() / 2**20, 1),
  )
  for note in summary['notes']:
    print(f'convert_checkpoint --to hf: {note}', file=sys.stderr)
  print(json.dumps(summary))
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
      '--source',
      choices=('hf', 'unimoe'),
      default=None,
      help='the format of --input (required unless --to hf)',
  )
  parser.add_argument(
      '--to',
      choices=('hf',),
      default=None,
      help='hf: export our checkpoint (or training run) --input as a Hugging '
      'Face LLaMA / Mixtral directory',
  )
  parser.add_argument(
      '--keep_lora',
      action='store_true',
      help='--to hf: write the LoRA adapters as a PEFT adapter instead of ' 'merging them',
  )
  parser.add_argument(
      '--max_position_embeddings',
      type=int,
      default=4096,
      help='--to hf: config.json max_position_embeddings (we have no limit)',
  )
  parser.add_argument(
      '--max_shard_gb', type=float, default=5.0, help='--to hf: largest safetensors shard, GiB'
  )
  parser.add_argument('--input', required=True, help='checkpoint directory to read')
  parser.add_argument('--output', required=True, help='new directory to write')
  parser.add_argument(
      '--base', default=None, help='unimoe: base model directory the LoRA run started from'
  )
  parser.add_argument(
      '--vision_tower',
      default=None,
      help='unimoe: CLIP tower directory (overrides config.json mm_vision_tower)',
  )
  parser.add_argument(
      '--audio_tower',
      default=None,
      help='unimoe: Whisper directory or BEATs .pt (overrides mm_audio_tower)',
  )
  parser.add_argument(
      '--expert_dir',
      default=None,
      help='unimoe 8e: the expert set directory (8e-Experts, the official '
      '--mlp_dir) whose FFN files the experts of --input update',
  )
  parser.add_argument(
      '--expert_files',
      default=None,
      help='unimoe 8e: comma-separated expert set file of each expert, in expert '
      'order (default: the official ' + ','.join(official.OFFICIAL_EXPERT_SET) + ')',
  )
  parser.add_argument(
      '--merge_lora',
      action='store_true',
      help='fold LoRA adapters into the weights instead of keeping them',
  )
  parser.add_argument(
      '--scan_layers',
      action='store_true',
      help='store the decoder layers stacked for DecoderConfig.scan_layers '
      '(either layout loads into a model of either layout)',
  )
  parser.add_argument('--dtype', default='bfloat16', help='DecoderConfig.dtype to write')
  parser.add_argument('--param_dtype', default='float32', help='DecoderConfig.param_dtype')
  args = parser.parse_args(argv)
  if args.to is not None:
    if args.source is not None:
      parser.error('--to hf reads one of our checkpoints: --source does not apply')
    return export_hf(args)
  if args.source is None:
    parser.error('--source is required (or --to hf to export)')
  if os.path.exists(args.output):
    raise FileExistsError(f'--output {args.output} already exists')
  model_cfg = None
  notes = []
  if args.source == 'hf' and ckpt_io.read_config(args.input).get('model_type') == 'llava':
    params, model_cfg, count, size = convert_llava(args.input, args.dtype, args.param_dtype)
    cfg = model_cfg.decoder
  elif args.source == 'unimoe':
    params, model_cfg, cfg, count, size = convert_official(
        args.input,
        args.merge_lora,
        args.base,
        args.dtype,
        args.param_dtype,
        args.vision_tower,
        args.audio_tower,
        args.expert_dir,
        args.expert_files.split(',') if args.expert_files else None,
        notes,
    )
    official.warn(notes)
  else:
    params, cfg, count, size = convert(
        args.source, args.input, args.merge_lora, args.base, args.dtype, args.param_dtype
    )
  if args.scan_layers:
    cfg = dataclasses.replace(cfg, scan_layers=True)
    if model_cfg is not None:
      model_cfg = dataclasses.replace(model_cfg, decoder=cfg)
    params = layer_stacking.to_config_layout(params, cfg)
  extra_lines = []
  if 'vision_projector' in params and model_cfg is None:
    kind = ckpt_io.read_config(args.input).get('mm_projector_type', 'linear')
    extra_lines = [
        '',
        '# The checkpoint also holds the vision projector of this kind:',
        '# network.UniMoEConfig.vision_projector = ' + repr(kind),
    ]
  files = {}
  # The tokenizer, with the tokenizer_config.json beside it when there is one: its `legacy`
  # flag changes how text after </s> is encoded (data/vocabulary.py).
  from unimoe_jax.data.vocabulary import TOKENIZER_CONFIG_FILE  # pylint: disable=g-import-not-at-top

  for directory in (args.input, args.base):
    tokenizer = directory and os.path.join(directory, checkpoints.TOKENIZER_FILE)
    if tokenizer and os.path.exists(tokenizer) and not files:
      files[checkpoints.TOKENIZER_FILE] = tokenizer
      tokenizer_config = os.path.join(directory, TOKENIZER_CONFIG_FILE)
      if os.path.exists(tokenizer_config):
        files[TOKENIZER_CONFIG_FILE] = tokenizer_config
  tokenizer_from_json = False
  if not files:
    tokenizer_from_json = _tokenizer_from_json(args.input, files, notes)
  gin_text = (
      llava.model_gin_text(model_cfg, args.source)
      if model_cfg is not None
      else gin_config_text(cfg, args.source, extra_lines)
  )
  try:
    checkpoints.save(args.output, params, gin_text, files)
  finally:
    if tokenizer_from_json:
      os.remove(files[checkpoints.TOKENIZER_FILE])
  summary = {
      'output': os.path.abspath(args.output),
      'source': args.source,
      'source_tensors': count,
      'source_parameters': size,
      'converted_parameters': int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
      'moe': cfg.moe is not None,
      'lora_kept': cfg.lora is not None,
      'moe_layers': list(cfg.moe_layer_indices()),
      'notes': notes,
      'modalities': list(model_cfg.modalities) if model_cfg else [],
      'tokenizer_copied': bool(files),
      'tokenizer_from_json': tokenizer_from_json,
      'peak_rss_mib': round(ckpt_io.peak_rss_bytes() / 2**20, 1),
  }
  print(json.dumps(summary))
  return 0


if __name__ == '__main__':
  sys.exit(main())
