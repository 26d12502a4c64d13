"""Towers and aligners of official Uni-MoE v1 checkpoints -> our `UniMoE` encoder/connector params.

Official modules (`Uni_MoE/Uni_MoE_speech/model/` and `Uni_MoE/Uni_MoE_audio/model/`), their
tensor names, and what they become (each through the Hugging Face converter of that tower):

  Both variants (multimodal_encoder/clip_encoder.py `CLIPVisionTower`, holding a transformers
  `CLIPVisionModel` as `.vision_tower`):
    model.vision_tower.vision_tower.vision_model.*       -> vision_tower      (convert/clip.py)
    (`post_layernorm`, `embeddings.position_ids` and layers after `mm_vision_select_layer` are
    dropped, as clip.py does: the tower never runs them)
  Speech variant, Uni_MoE_speech (audio_encoder/whisper_encoder.py, audio_aligner/):
    model.audio_tower.audio_tower.*          Whisper encoder -> speech_encoder (convert/whisper.py)
    model.audio_tower.{encoder,decoder}.*    dropped: `WhisperAudioTower` subclasses
                                             `WhisperModel`, so it also owns a Whisper encoder and
                                             decoder of its own, which its forward never runs
    model.mm_audio_aligner.decoder.audio_decoder.*   Whisper decoder -> speech_aligner
    model.query_tokens `[1, query_tokens_size, d_model]`              -> speech_aligner.query_tokens
    model.mm_audio_aligner.projector.*       Linear / mlpNx_gelu    -> speech_projector
  Audio variant, Uni_MoE_audio (audio_encoder/BEATs_encoder.py, audio_aligner/Qformer.py):
    model.audio_tower.audio_tower.*          BEATs, official names -> audio_encoder (beats.py)
    model.mm_audio_aligner.qformer.qformer.* `Blip2QFormerModel`   -> audio_qformer (qformer.py)
    model.mm_audio_aligner.query_tokens `[1, query_tokens_size, 768]` -> audio_qformer.query_tokens
    model.mm_audio_aligner.projector.*                               -> audio_projector

Both variants keep their audio modules under the same names (`audio_tower`, `mm_audio_aligner`);
which one a checkpoint is follows from the tensor names (a Whisper decoder or a Q-Former).

Configurations. `config.json` only names the towers (`mm_vision_tower`, `mm_audio_tower`: a
directory or file); the official code reads their sizes from there (`CLIPVisionConfig` /
`WhisperConfig.from_pretrained`, `torch.load(path)['cfg']` for BEATs), and so do we: the tower
path is the `--vision_tower` / `--audio_tower` override (the official loader's
`vison_tower_path` / `audio_tower_path`), else the path as written, else found relative to the
checkpoint directories or, by its last component, beside them (the README's `checkpoint/` layout).
The rest comes from `config.json`: `mm_vision_select_layer`, `mm_vision_select_feature`,
`mm_projector_type`, `audio_projector_type`, `query_tokens_size`, `mm_audio_select_layer`. The
Q-Former has no config anywhere: the official code hard-codes `Blip2Config()` (hidden 768, 12
layers, 12 heads, 3072, cross-attention every 2nd layer, encoder width 768); we read its sizes from
the tensors and keep the hard-coded head count, frequency, LayerNorm epsilon and activation.
A BEATs model gets `audio_padding='official'` (how its loaders pad short clips and its Q-Former
ignores the padding mask), so config.gin reproduces it without flags.

Weights. A tower missing from the checkpoint (the released LoRA checkpoints hold none: towers are
frozen and the official loader reloads them from the tower paths) is read from its tower path,
which must then hold weights (a `save_pretrained` directory, or the BEATs `.pt`).
"""

import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from unimoe_jax.connectors.qformer import QFormerConfig
from unimoe_jax.convert import beats as convert_beats
from unimoe_jax.convert import clip as convert_clip
from unimoe_jax.convert import io as ckpt_io
from unimoe_jax.convert import qformer as convert_qformer
from unimoe_jax.convert import whisper as convert_whisper
from unimoe_jax.convert.common import TensorReader, convert_parts
from unimoe_jax.encoders.beats import config_from_official as beats_config_from_official
from unimoe_jax.network import UniMoEConfig

# The trained modules (connectors, query tokens) beside a released model's weights.
TRAINABLES_FILE = 'non_lora_trainables.bin'
CLIP_PREFIX = 'model.vision_tower.vision_tower.vision_model.'
VISION_PROJECTOR_PREFIX = 'model.mm_projector.'  # LLaVA's projector (read by official.py).
AUDIO_TOWER_PREFIX = 'model.audio_tower.audio_tower.'
WHISPER_UNUSED_PREFIXES = ('model.audio_tower.encoder.', 'model.audio_tower.decoder.')
WHISPER_ALIGNER_PREFIX = 'model.mm_audio_aligner.decoder.audio_decoder.'
SPEECH_QUERY_TOKENS = 'model.query_tokens'
QFORMER_PREFIX = 'model.mm_audio_aligner.qformer.qformer.'
AUDIO_QUERY_TOKENS = 'model.mm_audio_aligner.query_tokens'
AUDIO_PROJECTOR_PREFIX = 'model.mm_audio_aligner.projector.'
TOWER_PREFIXES = (
    'model.vision_tower.',
    'model.audio_tower.',
    'model.mm_audio_aligner.',
    SPEECH_QUERY_TOKENS,
)
# Names each built family claims; a tower tensor that no built family claims is unexpected.
_CLAIMS = {
    'vision': (CLIP_PREFIX,),
    'speech': (
        AUDIO_TOWER_PREFIX,
        *WHISPER_UNUSED_PREFIXES,
        WHISPER_ALIGNER_PREFIX,
        SPEECH_QUERY_TOKENS,
        AUDIO_PROJECTOR_PREFIX,
    ),
    'audio': (AUDIO_TOWER_PREFIX, QFORMER_PREFIX, AUDIO_QUERY_TOKENS, AUDIO_PROJECTOR_PREFIX),
}
# `Blip2Config()` defaults that Uni_MoE_audio/model/audio_aligner/Qformer.py hard-codes and that
# the tensors do not show.
_QFORMER_FIXED = dict(num_heads=12, cross_attention_frequency=2, layer_norm_eps=1e-12, act='gelu')
_CLIP_TOP_LEVEL = ('embeddings.', 'pre_layrnorm.', 'encoder.', 'post_layernorm.')


def is_tower_tensor(name: str) -> bool:
  return name.startswith(TOWER_PREFIXES)


def _audio_family(names: Sequence[str], path: Optional[str]) -> Optional[str]:
  """'speech' (Whisper, Uni_MoE_speech), 'audio' (BEATs, Uni_MoE_audio) or None."""
  speech = [
      n
      for n in names
      if n.startswith(
          (
              WHISPER_ALIGNER_PREFIX,
              SPEECH_QUERY_TOKENS,
              *WHISPER_UNUSED_PREFIXES,
              AUDIO_TOWER_PREFIX + 'conv1.',
          )
      )
  ]
  audio = [
      n
      for n in names
      if n.startswith((QFORMER_PREFIX, AUDIO_QUERY_TOKENS, AUDIO_TOWER_PREFIX + 'patch_embedding.'))
  ]
  if speech and audio:
    raise ValueError(
        f'the checkpoint mixes the Whisper speech modules ({speech[0]}) with the '
        f'BEATs / Q-Former audio ones ({audio[0]}); an official Uni-MoE v1 model '
        'has one or the other under model.audio_tower / model.mm_audio_aligner'
    )
  if speech or audio:
    return 'speech' if speech else 'audio'
  if path is not None:  # No audio tensor in the checkpoint: the tower path decides.
    return 'audio' if os.path.isfile(path) else 'speech'
  if any(n.startswith(TOWER_PREFIXES[1:]) for n in names):
    raise ValueError(
        'cannot tell whether the audio modules are the Whisper (speech) or the BEATs '
        f'(audio) variant from {sorted(n for n in names if is_tower_tensor(n))[:4]}; '
        'pass --audio_tower'
    )
  return None


def find_tower(
    hf_config: Mapping[str, Any],
    field: str,
    override: Optional[str],
    search_dirs: Sequence[Optional[str]] = (),
) -> Optional[str]:
  """The local path of the tower that `config.json[field]` names (see the module docstring)."""
  if override:
    if not os.path.exists(override):
      raise FileNotFoundError(f'tower path {override} (given for {field}) does not exist')
    return override
  name = hf_config.get(field)
  if not name:
    return None
  candidates = [name]
  for directory in filter(None, search_dirs):
    candidates += [
        os.path.join(directory, name),
        os.path.join(
            os.path.dirname(os.path.abspath(directory)), os.path.basename(os.path.normpath(name))
        ),
    ]
  return next((c for c in candidates if os.path.exists(c)), None)


def _require(
    path: Optional[str], field: str, flag: str, hf_config: Mapping[str, Any], what: str
) -> str:
  if path is None:
    raise ValueError(
        f'the checkpoint holds {what} tensors, but config.json {field}='
        f'{hf_config.get(field)!r} names no local tower to read its configuration '
        f'from (the official code reads it there too); pass {flag} PATH'
    )
  return path


def _json(path: str, what: str) -> Dict[str, Any]:
  config = ckpt_io.read_json_if_present(os.path.join(path, ckpt_io.CONFIG_FILE))
  if config is None:
    raise ValueError(f'{what} {path} has no {ckpt_io.CONFIG_FILE}')
  return config


def _load_beats(path: str) -> Tuple[Dict[str, Any], Dict[str, ckpt_io.LazyTensor]]:
  """(cfg, official state dict) of an official BEATs `.pt` (torch imported here only)."""
  import torch  # pylint: disable=g-import-not-at-top

  try:
    checkpoint = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
  except RuntimeError:  # Old (non-zip) serialisation cannot be memory-mapped.
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(checkpoint, dict) or 'cfg' not in checkpoint or 'model' not in checkpoint:
    raise ValueError(f'{path}: expected an official BEATs checkpoint {{"cfg", "model"}}')
  entries = {
      name: ckpt_io.LazyTensor(tuple(t.shape), str(t.dtype), lambda t=t: t.detach().float().numpy())
      for name, t in checkpoint['model'].items()
  }
  return dict(checkpoint['cfg']), entries


def _tower_weights(kind: str, path: str) -> Dict[str, ckpt_io.LazyTensor]:
  """A CLIP or Whisper tower's tensors from its `save_pretrained` directory, under the official
  checkpoint names."""
  out = {}
  for name, value in ckpt_io.open_state_dict(path).items():
    if kind == 'vision':  # CLIPModel / CLIPVisionModel (transformers 5 drops `vision_model.`).
      rest = (
          name[len('vision_model.') :]
          if name.startswith('vision_model.')
          else name
          if name.startswith(_CLIP_TOP_LEVEL)
          else None
      )
      if rest is not None:  # The text half of a CLIPModel is not the tower.
        out[CLIP_PREFIX + rest] = value
    else:  # Whisper: only the encoder is the tower (the aligner is trained, in the checkpoint).
      for prefix in ('model.encoder.', 'encoder.'):
        if name.startswith(prefix):
          out[AUDIO_TOWER_PREFIX + name[len(prefix) :]] = value
  return out


def _shape(state_dict: Mapping[str, Any], name: str) -> Tuple[int, ...]:
  if name not in state_dict:
    raise ValueError(
        f'state dict does not match the model: missing [{name!r}] (needed to ' 'size the Q-Former)'
    )
  return tuple(state_dict[name].shape)


def _qformer_config(state_dict: Mapping[str, Any], num_query: int) -> QFormerConfig:
  """Sizes from the tensors; the rest is what the official `Blip2Config()` hard-codes."""
  p = QFORMER_PREFIX
  layer = re.compile(re.escape(p) + r'encoder\.layer\.(\d+)\.')
  indices = {int(m.group(1)) for m in map(layer.match, state_dict) if m}
  return QFormerConfig(
      hidden_size=_shape(state_dict, f'{p}layernorm.weight')[0],
      num_layers=max(indices) + 1 if indices else 0,
      intermediate_size=_shape(state_dict, f'{p}encoder.layer.0.intermediate_query.dense.weight')[
          0
      ],
      encoder_hidden_size=_shape(
          state_dict, f'{p}encoder.layer.0.crossattention.attention.key.weight'
      )[1],
      num_query_tokens=num_query,
      **_QFORMER_FIXED,
  )


def tower_configs(
    hf_config: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    vision_tower: Optional[str] = None,
    audio_tower: Optional[str] = None,
    search_dirs: Sequence[Optional[str]] = (),
) -> Tuple[Dict[str, Any], Dict[str, ckpt_io.LazyTensor]]:
  """(the tower fields of a `UniMoEConfig`, tower tensors read from the tower paths).

  A tower is built when the checkpoint holds its tensors or its tower path is found; `{}` means
  a language model only. The tensors come back under official names, to merge into the state
  dict (only for towers that the checkpoint lacks entirely).
  """
  names = [n for n in state_dict if is_tower_tensor(n)]
  fields: Dict[str, Any] = {}
  extra: Dict[str, ckpt_io.LazyTensor] = {}
  vision_path = find_tower(hf_config, 'mm_vision_tower', vision_tower, search_dirs)
  if vision_path or any(n.startswith('model.vision_tower.') for n in names):
    path = _require(
        vision_path, 'mm_vision_tower', '--vision_tower', hf_config, 'model.vision_tower.*'
    )
    fields['vision'] = convert_clip.config_from_hf(
        _json(path, 'vision tower'),
        select_layer=int(hf_config.get('mm_vision_select_layer', -1)),
        select_feature=hf_config.get('mm_vision_select_feature', 'patch'),
    )
    fields['vision_projector'] = hf_config.get('mm_projector_type', 'linear')
    if not any(n.startswith('model.vision_tower.') for n in names):
      extra.update(_tower_weights('vision', path))
  audio_path = find_tower(hf_config, 'mm_audio_tower', audio_tower, search_dirs)
  family = _audio_family(names, audio_path)
  if family is None:
    return fields, extra
  path = _require(
      audio_path,
      'mm_audio_tower',
      '--audio_tower',
      hf_config,
      'model.audio_tower.* / model.mm_audio_aligner.*',
  )
  if hf_config.get('mm_audio_select_layer', 0) != 0:
    # Index 0 of the tower's output tuple is its last hidden state (Whisper: after the final
    # LayerNorm; BEATs: the encoder output), the only one our encoders return.
    raise ValueError(
        f"config.json mm_audio_select_layer={hf_config['mm_audio_select_layer']}: "
        'only 0 (the last hidden state) is supported'
    )
  num_query = int(hf_config.get('query_tokens_size', 50))
  projector = hf_config.get('audio_projector_type', 'linear')
  has_tower = any(n.startswith(AUDIO_TOWER_PREFIX) for n in names)
  if family == 'speech':
    if os.path.isfile(path):
      raise ValueError(
          f'the checkpoint holds the Whisper speech modules, but the audio tower '
          f'{path} is a file, not a Whisper directory'
      )
    whisper = _json(path, 'audio tower')
    fields.update(
        speech_encoder=convert_whisper.encoder_config_from_hf(whisper),
        speech_aligner=convert_whisper.aligner_config_from_hf(whisper, num_query_tokens=num_query),
        speech_projector=projector,
    )
    if not has_tower:
      extra.update(_tower_weights('speech', path))
  else:
    if not os.path.isfile(path):
      raise ValueError(
          f'the checkpoint holds the BEATs audio modules, but the audio tower {path} '
          'is not an official BEATs .pt file'
      )
    cfg, weights = _load_beats(path)
    # audio_padding 'official': edge-padded waves, BEATs padding mask, unmasked Q-Former, as
    # Uni_MoE_audio's loaders and aligner do (network.UniMoEConfig.audio_padding).
    fields.update(
        audio_encoder=beats_config_from_official(cfg),
        audio_qformer=_qformer_config(state_dict, num_query),
        audio_projector=projector,
        audio_padding='official',
    )
    if not has_tower:
      extra.update({AUDIO_TOWER_PREFIX + k: v for k, v in weights.items()})
  return fields, extra


def _official_names(message: str, prefix: str) -> str:
  """BEATs converter messages name tensors without the checkpoint prefix: put it back."""
  message = re.sub(r"'([^']+)'", lambda m: f"'{prefix}{m.group(1)}'", message)
  return re.sub(r'^([\w.]+\.(?:weight|bias|weight_g|weight_v|grep_a))\b', prefix + r'\1', message)


def tower_params(state_dict: Mapping[str, Any], config: UniMoEConfig) -> Dict[str, Any]:
  """The encoder and connector params of `UniMoE(config)` from the official tower tensors
  (`is_tower_tensor` names; others are ignored). Raises one ValueError naming every missing,
  unexpected or wrong-shaped tensor by its official name."""
  sd = {k: v for k, v in state_dict.items() if is_tower_tensor(k)}
  built = [
      m
      for m, on in (
          ('vision', config.vision is not None),
          ('speech', config.speech_encoder is not None),
          ('audio', config.audio_encoder is not None),
      )
      if on
  ]
  claimed = tuple(p for m in built for p in _CLAIMS[m])
  unexpected = sorted(k for k in sd if not k.startswith(claimed))
  errors: List[str] = []
  if unexpected:
    errors.append(f'unexpected {unexpected}')
  steps = []
  if config.vision is not None:
    steps.append(
        ('vision_tower', lambda: convert_clip.params_from_hf(sd, config.vision, prefix=CLIP_PREFIX))
    )
  if config.speech_encoder is not None:
    steps += [
        (
            'speech_encoder',
            lambda: convert_whisper.encoder_params_from_hf(
                sd, config.speech_encoder, prefix=AUDIO_TOWER_PREFIX
            ),
        ),
        ('speech_aligner', lambda: _speech_aligner(sd, config)),
        (
            'speech_projector',
            lambda: convert_clip.projector_params_from_hf(
                sd, config.speech_projector, prefix=AUDIO_PROJECTOR_PREFIX
            ),
        ),
    ]
  if config.audio_encoder is not None:
    steps += [
        ('audio_encoder', lambda: _beats(sd, config)),
        (
            'audio_qformer',
            lambda: convert_qformer.params_from_hf(
                sd, config.audio_qformer, prefix=QFORMER_PREFIX, query_tokens=AUDIO_QUERY_TOKENS
            ),
        ),
        (
            'audio_projector',
            lambda: convert_clip.projector_params_from_hf(
                sd, config.audio_projector, prefix=AUDIO_PROJECTOR_PREFIX
            ),
        ),
    ]
  return convert_parts(steps, 'official tower/aligner tensors do not match the model', errors)


def _speech_aligner(sd: Mapping[str, Any], config: UniMoEConfig) -> Dict[str, Any]:
  cfg = config.speech_aligner
  r = TensorReader({k: v for k, v in sd.items() if k == SPEECH_QUERY_TOKENS})
  queries = r.pop(SPEECH_QUERY_TOKENS, (1, cfg.num_query_tokens, cfg.d_model))
  r.finish()  # Names model.query_tokens when it is missing.
  return convert_whisper.aligner_params_from_hf(
      sd, cfg, prefix=WHISPER_ALIGNER_PREFIX, query_tokens=queries
  )


def _beats(sd: Mapping[str, Any], config: UniMoEConfig) -> Dict[str, Any]:
  stripped = {
      k[len(AUDIO_TOWER_PREFIX) :]: v for k, v in sd.items() if k.startswith(AUDIO_TOWER_PREFIX)
  }
  head = sorted(k for k in stripped if k in convert_beats.TRAINING_ONLY_TENSORS)
  if head:
    # A fine-tuned BEATs: with its AudioSet classifier the official tower returns class
    # probabilities instead of tokens (BEATs.extract_features), which we do not reproduce.
    raise ValueError(
        f'{[AUDIO_TOWER_PREFIX + k for k in head]}: a fine-tuned BEATs with its '
        'AudioSet classifier; Uni-MoE uses the pre-trained encoder (no predictor)'
    )
  try:
    return convert_beats.params_from_official(stripped, config.audio_encoder)
  except ValueError as e:
    raise ValueError(_official_names(str(e), AUDIO_TOWER_PREFIX)) from None
