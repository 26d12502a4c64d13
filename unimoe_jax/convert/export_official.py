"""Our towers and connectors -> the official Uni-MoE v1 layout (the inverse of official_towers.py).

What `tools/convert_checkpoint.py --to hf` writes beside the decoder's LLaMA / Mixtral files for
a multimodal model, laid out as the official code reads a released model (a config.json that
names each tower's path, the towers as their own checkpoints, the trained modules in one file):

  vision_tower/                  CLIPVisionModel `save_pretrained`: config.json, model.safetensors
                                 (`vision_model.*`), preprocessor_config.json (CLIPImageProcessor)
  speech_tower/                  WhisperModel directory holding the encoder (`model.encoder.*`),
                                 config.json, preprocessor_config.json (WhisperFeatureExtractor)
  BEATs.pt                       the official BEATs file, `{'cfg': ..., 'model': state dict}`
  non_lora_trainables.bin        the trained modules under their official names (torch pickle,
                                 read by the official loader and by `--source official`):
      model.mm_projector.*                                  vision_projector
      model.mm_audio_aligner.decoder.audio_decoder.*        speech_aligner (Whisper decoder)
      model.query_tokens `[1, n, d]`                        speech_aligner.query_tokens
      model.mm_audio_aligner.qformer.qformer.*              audio_qformer
      model.mm_audio_aligner.query_tokens `[1, n, d]`       audio_qformer.query_tokens
      model.mm_audio_aligner.projector.*                    speech_projector / audio_projector
  config.json fields             mm_vision_tower, mm_vision_select_layer, mm_vision_select_feature,
                                 mm_projector_type, mm_hidden_size, mm_audio_tower,
                                 mm_audio_select_layer, query_tokens_size, audio_projector_type,
                                 mm_audio_hidden_size (added to the decoder's config.json)

Every tensor is an exact transpose / reshape of one of our leaves (float32, C-contiguous: the
converters write through convert/common.TensorWriter), except BEATs'
positional convolution, which we hold folded: it is written as `weight_v` = the kernel and
`weight_g` = its per-tap norm (convert/beats.py). Tensors our towers never compute are not
written (CLIP's post_layernorm and layers after `mm_vision_select_layer`, the Whisper decoder's
token embedding): transformers initialises them when it loads the directory, and they do not
reach any output Uni-MoE reads. The official code has one audio slot: a model with both a
speech and an audio tower has no official layout and is refused.

Torch writes the two pickles (imported here only, as every `.bin` converter does).
"""

import json
import os
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from unimoe_jax.convert import beats as convert_beats
from unimoe_jax.convert import clip as convert_clip
from unimoe_jax.convert import official_towers as towers
from unimoe_jax.convert import qformer as convert_qformer
from unimoe_jax.convert import whisper as convert_whisper
from unimoe_jax.encoders.beats import config_to_official as beats_config_to_official
from unimoe_jax.media import audio as audio_media
from unimoe_jax.media import image as image_media
from unimoe_jax.network import UniMoEConfig

VISION_TOWER_DIR = 'vision_tower'
SPEECH_TOWER_DIR = 'speech_tower'
BEATS_FILE = 'BEATs.pt'
TRAINABLES_FILE = towers.TRAINABLES_FILE
TOP_LEVEL = (
    'vision_tower',
    'vision_projector',
    'speech_encoder',
    'speech_aligner',
    'speech_projector',
    'audio_encoder',
    'audio_qformer',
    'audio_projector',
)


def check_exportable(config: UniMoEConfig) -> List[str]:
  """Raises ValueError naming the field when the towers have no official layout; returns notes
  on what the official code does differently."""
  if config.speech_encoder is not None and config.audio_encoder is not None:
    raise ValueError(
        'UniMoEConfig has both speech_encoder (Whisper) and audio_encoder (BEATs); '
        'the official model has one audio tower (model.audio_tower, '
        'model.mm_audio_aligner), so these towers have no official layout'
    )
  notes = []
  if config.audio_encoder is not None and config.audio_padding != 'official':
    notes.append(
        f'UniMoEConfig.audio_padding={config.audio_padding!r}: the official '
        "Uni_MoE_audio code pads clips its own way (audio_padding='official'), so "
        'its audio features differ from ours for clips shorter than 30 s'
    )
  return notes


def trainables(params: Mapping[str, Any], config: UniMoEConfig) -> Dict[str, np.ndarray]:
  """The connectors under their official names (`non_lora_trainables.bin`)."""
  out: Dict[str, np.ndarray] = {}
  if config.vision is not None:
    out.update(
        convert_clip.projector_params_to_hf(
            params['vision_projector'],
            config.vision_projector,
            prefix=towers.VISION_PROJECTOR_PREFIX,
        )
    )
  # The one official audio slot: (encoder, connector, its projector, converter, prefix, queries).
  audio_slots = (
      (
          'speech_encoder',
          'speech_aligner',
          'speech_projector',
          convert_whisper.aligner_params_to_hf,
          towers.WHISPER_ALIGNER_PREFIX,
          towers.SPEECH_QUERY_TOKENS,
      ),
      (
          'audio_encoder',
          'audio_qformer',
          'audio_projector',
          convert_qformer.params_to_hf,
          towers.QFORMER_PREFIX,
          towers.AUDIO_QUERY_TOKENS,
      ),
  )
  for encoder, connector, projector, to_official, prefix, query_name in audio_slots:
    if getattr(config, encoder) is None:
      continue
    tensors, queries = to_official(params[connector], getattr(config, connector), prefix=prefix)
    out.update(tensors)
    out[query_name] = queries
    out.update(
        convert_clip.projector_params_to_hf(
            params[projector], getattr(config, projector), prefix=towers.AUDIO_PROJECTOR_PREFIX
        )
    )
  return out


def _clip_preprocessor(size: int) -> Dict[str, Any]:
  """CLIPImageProcessor settings (what the official CLIPVisionTower loads beside the tower)."""
  return {
      'image_processor_type': 'CLIPImageProcessor',
      'do_resize': True,
      'size': {'shortest_edge': size},
      'resample': 3,
      'do_center_crop': True,
      'crop_size': {'height': size, 'width': size},
      'do_rescale': True,
      'rescale_factor': 1 / 255,
      'do_normalize': True,
      'image_mean': list(image_media.CLIP_MEAN),
      'image_std': list(image_media.CLIP_STD),
      'do_convert_rgb': True,
  }


def _whisper_preprocessor(num_mel_bins: int) -> Dict[str, Any]:
  """WhisperFeatureExtractor settings of our log-mel features (media/audio.py)."""
  samples = audio_media.WHISPER_SECONDS * audio_media.SAMPLE_RATE
  return {
      'feature_extractor_type': 'WhisperFeatureExtractor',
      'feature_size': num_mel_bins,
      'sampling_rate': audio_media.SAMPLE_RATE,
      'n_fft': audio_media.WHISPER_N_FFT,
      'hop_length': audio_media.WHISPER_HOP_LENGTH,
      'chunk_length': audio_media.WHISPER_SECONDS,
      'n_samples': samples,
      'nb_max_frames': samples // audio_media.WHISPER_HOP_LENGTH,
      'padding_side': 'right',
      'padding_value': 0.0,
      'return_attention_mask': False,
  }


def _audio_slot_fields(
    tower: str, num_query_tokens: int, projector: str, hidden_size: int
) -> Dict[str, Any]:
  """The config.json fields of the official code's one audio slot (the Whisper tower with its
  aligner, or BEATs with its Q-Former; `check_exportable` refuses a model with both)."""
  return dict(
      mm_audio_tower=tower,
      query_tokens_size=num_query_tokens,
      audio_projector_type=projector,
      mm_audio_hidden_size=hidden_size,
      mm_audio_select_layer=0,  # The last hidden state, the only one we read.
  )


def config_fields(config: UniMoEConfig) -> Dict[str, Any]:
  """The official config.json fields that name the towers and their connectors."""
  out: Dict[str, Any] = {}
  if config.vision is not None:
    out.update(
        mm_vision_tower=VISION_TOWER_DIR,
        mm_vision_select_layer=config.vision.select_layer,
        mm_vision_select_feature=config.vision.select_feature,
        mm_projector_type=config.vision_projector,
        mm_hidden_size=config.vision.width,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
  if config.speech_encoder is not None:
    aligner = config.speech_aligner
    out.update(
        _audio_slot_fields(
            SPEECH_TOWER_DIR, aligner.num_query_tokens, config.speech_projector, aligner.d_model
        )
    )
  if config.audio_encoder is not None:
    qformer = config.audio_qformer
    out.update(
        _audio_slot_fields(
            BEATS_FILE, qformer.num_query_tokens, config.audio_projector, qformer.hidden_size
        )
    )
  return out


def _write_json(path: str, value: Dict[str, Any]) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)


def _write_tower_dir(
    path: str,
    tensors: Mapping[str, np.ndarray],
    config: Dict[str, Any],
    preprocessor: Dict[str, Any],
) -> None:
  """A transformers `save_pretrained`-style directory: model.safetensors, config.json and
  preprocessor_config.json."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  os.makedirs(path)
  save_file(dict(tensors), os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
  _write_json(os.path.join(path, 'config.json'), config)
  _write_json(os.path.join(path, 'preprocessor_config.json'), preprocessor)


def write(
    directory: str, params: Mapping[str, Any], config: UniMoEConfig
) -> Tuple[List[str], Dict[str, Any], List[str]]:
  """Writes the towers and connectors of `params` into `directory` (the staged export).

  Returns (files written, config.json fields to add, notes). `params` holds the top-level
  subtrees of `UniMoE(config)` (`TOP_LEVEL`); the decoder is not read.
  """
  import torch  # pylint: disable=g-import-not-at-top

  notes = check_exportable(config)
  files: List[str] = []
  if config.vision is not None:
    _write_tower_dir(
        os.path.join(directory, VISION_TOWER_DIR),
        convert_clip.params_to_hf(params['vision_tower'], config.vision, prefix='vision_model.'),
        dict(convert_clip.config_to_hf(config.vision), architectures=['CLIPVisionModel']),
        _clip_preprocessor(config.vision.image_size),
    )
    files.append(VISION_TOWER_DIR)
    if config.vision.num_used_layers < config.vision.num_layers:
      notes.append(
          f'{VISION_TOWER_DIR}: post_layernorm and encoder layers '
          f'{config.vision.num_used_layers}..{config.vision.num_layers - 1} are not '
          'written (mm_vision_select_layer reads the hidden state before them); '
          'transformers initialises them on load'
      )
  if config.speech_encoder is not None:
    _write_tower_dir(
        os.path.join(directory, SPEECH_TOWER_DIR),
        convert_whisper.encoder_params_to_hf(
            params['speech_encoder'], config.speech_encoder, prefix='model.encoder.'
        ),
        dict(
            convert_whisper.config_to_hf(config.speech_encoder, config.speech_aligner),
            architectures=['WhisperModel'],
        ),
        _whisper_preprocessor(config.speech_encoder.num_mel_bins),
    )
    files.append(SPEECH_TOWER_DIR)
    notes.append(
        f'{SPEECH_TOWER_DIR}: only the Whisper encoder is written (the aligner, a '
        f'Whisper decoder, is in {TRAINABLES_FILE}); transformers initialises the '
        'decoder on load'
    )
  if config.audio_encoder is not None:
    state = convert_beats.params_to_official(params['audio_encoder'], config.audio_encoder)
    torch.save(
        {
            'cfg': beats_config_to_official(config.audio_encoder),
            'model': {k: torch.from_numpy(v) for k, v in state.items()},
        },
        os.path.join(directory, BEATS_FILE),
    )
    files.append(BEATS_FILE)
  connectors = trainables(params, config)
  if connectors:
    torch.save(
        {k: torch.from_numpy(v) for k, v in connectors.items()},
        os.path.join(directory, TRAINABLES_FILE),
    )
    files.append(TRAINABLES_FILE)
  return files, config_fields(config), notes
