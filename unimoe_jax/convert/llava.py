"""Hugging Face `LlavaForConditionalGeneration` -> `UniMoE` params + config (numpy, no torch).

Tensor names of transformers 5 in memory; files written by `save_pretrained` (either version)
use the older `language_model.model.*` / `vision_tower[.vision_model].*` layout, renamed first by
`normalize_name`):

    model.vision_tower.{embeddings,pre_layrnorm,encoder.layers.{i},post_layernorm}.*
                                                 -> vision_tower   (convert/clip.py)
    model.multi_modal_projector.linear_{1,2}.*   -> vision_projector linear_0 / linear_2
                                                    (mlp2x_gelu: Linear, exact GELU, Linear)
    model.language_model.*, lm_head.weight       -> decoder        (convert/hf.py)

LLaVA's image features are `hidden_states[vision_feature_layer]` of the CLIP tower, without the
class token for `vision_feature_select_strategy='default'` (our select_feature 'patch') and
with it for 'full' ('cls_patch'). HF LLaVA marks image positions with a vocabulary id
(`image_token_id`, e.g. 32000); ours is `UniMoEConfig.image_token_id` (-200): map input ids
with `map_image_tokens`. `model_gin_text` writes the config.gin that binds MODEL_CONFIG (and
DECODER_CONFIG) for any `UniMoEConfig`.
"""

import dataclasses
from typing import Any, Dict, List, Mapping

import numpy as np

from unimoe_jax.convert import clip as convert_clip
from unimoe_jax.convert import hf as convert_hf
from unimoe_jax.convert.common import TensorReader, convert_parts
from unimoe_jax.network import UniMoEConfig

VISION_PREFIX = 'model.vision_tower.'
PROJECTOR_PREFIX = 'model.multi_modal_projector.'
LANGUAGE_PREFIX = 'model.language_model.'
_LEGACY_PREFIXES = (  # transformers 4 layout -> transformers 5 layout, longest first.
    ('model.vision_tower.vision_model.', VISION_PREFIX),
    ('vision_tower.vision_model.', VISION_PREFIX),
    ('vision_tower.', VISION_PREFIX),  # What transformers 5's save_pretrained writes.
    ('multi_modal_projector.', PROJECTOR_PREFIX),
    ('language_model.model.', LANGUAGE_PREFIX),
    ('language_model.lm_head.', 'lm_head.'),
)
_STRATEGIES = {'default': 'patch', 'full': 'cls_patch'}


def normalize_name(name: str) -> str:
  """A LLaVA tensor name in the transformers >= 5 layout."""
  for old, new in _LEGACY_PREFIXES:
    if name.startswith(old):
      return new + name[len(old) :]
  return name


def hf_image_token_id(hf: Mapping[str, Any]) -> int:
  """The vocabulary id HF LLaVA puts at image positions."""
  token = hf.get('image_token_id', hf.get('image_token_index'))
  if token is None:
    raise ValueError('LLaVA config has no image_token_id / image_token_index')
  return int(token)


def config_from_hf(hf: Mapping[str, Any], **decoder_overrides) -> UniMoEConfig:
  """A `UniMoEConfig` (CLIP tower + mlp2x_gelu projector + LLaMA decoder) from a HF
  `LlavaConfig.to_dict()`; `decoder_overrides` go to the DecoderConfig (dtype, ...)."""
  if hf.get('model_type') != 'llava':
    raise ValueError(f"config_from_hf: model_type must be 'llava', got {hf.get('model_type')!r}")
  layer = hf.get('vision_feature_layer', -2)
  if not isinstance(layer, int):
    raise ValueError(
        f'config_from_hf: vision_feature_layer={layer!r}: only one layer (an int) '
        'is supported, not a list of layers'
    )
  strategy = hf.get('vision_feature_select_strategy', 'default')
  if strategy not in _STRATEGIES:
    raise ValueError(
        f'config_from_hf: vision_feature_select_strategy={strategy!r}; expected '
        f'one of {sorted(_STRATEGIES)}'
    )
  if hf.get('projector_hidden_act', 'gelu') != 'gelu':
    raise ValueError(
        f"config_from_hf: projector_hidden_act={hf['projector_hidden_act']!r}; "
        "only 'gelu' (mlp2x_gelu) is supported"
    )
  if not hf.get('multimodal_projector_bias', True):
    raise ValueError('config_from_hf: multimodal_projector_bias=False is not supported')
  text = dict(hf['text_config'])
  if text.get('model_type', 'llama') not in ('llama', 'mistral', 'mixtral'):
    raise ValueError(
        f"config_from_hf: text_config model_type {text.get('model_type')!r} is "
        'not a LLaMA / Mistral / Mixtral language model'
    )
  text.setdefault('tie_word_embeddings', hf.get('tie_word_embeddings', False))
  vision = hf['vision_config']
  if vision.get('model_type', 'clip_vision_model') != 'clip_vision_model':
    raise ValueError(f"config_from_hf: vision tower {vision.get('model_type')!r} is not CLIP")
  return UniMoEConfig(
      decoder=convert_hf.config_from_hf(text, **decoder_overrides),
      vision=convert_clip.config_from_hf(
          vision, select_layer=layer, select_feature=_STRATEGIES[strategy]
      ),
      vision_projector='mlp2x_gelu',
  )


def params_from_hf(state_dict: Mapping[str, Any], config: UniMoEConfig) -> Dict[str, Any]:
  """Converts a LLaVA state dict into `UniMoE(config)` params
  (`{'decoder', 'vision_tower', 'vision_projector'}`).

  Raises ValueError naming every missing, unexpected or wrong-shaped tensor.
  """
  sd = {normalize_name(k): v for k, v in state_dict.items()}
  parts = {'vision': {}, 'projector': {}, 'language': {}}
  unexpected: List[str] = []
  for name, value in sd.items():
    if name.startswith(VISION_PREFIX):
      parts['vision'][name] = value
    elif name.startswith(PROJECTOR_PREFIX):
      rest = name[len(PROJECTOR_PREFIX) :]
      # LLaVA's `linear_1` / `linear_2` are positions 0 and 2 of the original nn.Sequential.
      rest = {'linear_1.': '0.', 'linear_2.': '2.'}.get(rest[:9], rest[:9]) + rest[9:]
      parts['projector'][PROJECTOR_PREFIX + rest] = value
    elif name.startswith(LANGUAGE_PREFIX):
      parts['language']['model.' + name[len(LANGUAGE_PREFIX) :]] = value
    elif name == 'lm_head.weight':
      parts['language'][name] = value
    else:
      unexpected.append(name)
  if unexpected:
    TensorReader({n: None for n in unexpected}).finish()
  params = convert_parts(
      (
          (
              'vision_tower',
              lambda: convert_clip.params_from_hf(
                  parts['vision'], config.vision, prefix=VISION_PREFIX
              ),
          ),
          (
              'vision_projector',
              lambda: convert_clip.projector_params_from_hf(
                  parts['projector'], config.vision_projector, prefix=PROJECTOR_PREFIX
              ),
          ),
          ('decoder', lambda: convert_hf.decoder_params_from_hf(parts['language'], config.decoder)),
      ),
      'LLaVA state dict does not match the model',
  )
  width = params['vision_projector']['linear_0']['kernel'].shape[0]
  if width != config.vision.width:
    raise ValueError(
        f'{PROJECTOR_PREFIX}linear_1.weight takes {width} inputs, but the vision '
        f'tower is {config.vision.width} wide'
    )
  return params


def map_image_tokens(
    input_ids: np.ndarray, hf: Mapping[str, Any], config: UniMoEConfig
) -> np.ndarray:
  """HF LLaVA input ids -> ours: every `image_token_id` becomes `config.image_token_id`."""
  ids = np.asarray(input_ids)
  return np.where(ids == hf_image_token_id(hf), config.image_token_id, ids).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# config.gin for a whole UniMoEConfig.


def _gin_value(value: Any) -> str:
  if isinstance(value, tuple):
    return '(' + ', '.join(_gin_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return repr(value)


def _gin_ref(cfg: Any) -> str:
  return f'@{type(cfg).__module__.rsplit(".", 1)[-1]}.{type(cfg).__name__}()'


def _gin_blocks(
    cfg: Any,
    blocks: Dict[str, List[str]],
    imports: Dict[str, None],
    overrides: Mapping[str, str] = (),
) -> None:
  """Adds `cfg`'s block (and those of the dataclass configs it holds) to `blocks`."""
  module = type(cfg).__module__
  package, short = module.rsplit('.', 1)
  imports[f'from {package} import {short}'] = None
  name = f'{short}.{type(cfg).__name__}'
  lines = [f'{name}:']
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if field.name in overrides:
      lines.append(f'  {field.name} = {overrides[field.name]}')
    elif dataclasses.is_dataclass(value):
      _gin_blocks(value, blocks, imports)
      lines.append(f'  {field.name} = {_gin_ref(value)}')
    elif value is None:
      lines.append(f'  {field.name} = None')
    else:
      lines.append(f'  {field.name} = {_gin_value(value)}')
  if name in blocks and blocks[name] != lines:
    raise ValueError(f'model_gin_text: two different {name} values in one config')
  blocks[name] = lines


def model_gin_text(config: UniMoEConfig, source: str) -> str:
  """A config.gin binding `DECODER_CONFIG` (the decoder) and `MODEL_CONFIG` (the whole model,
  its `decoder` = %DECODER_CONFIG) to `config`, readable by `checkpoints.model_config_from_gin`."""
  blocks: Dict[str, List[str]] = {}
  imports: Dict[str, None] = {}
  _gin_blocks(config.decoder, blocks, imports)
  _gin_blocks(config, blocks, imports, overrides={'decoder': '%DECODER_CONFIG'})
  lines = [
      f'# Converted by tools/convert_checkpoint.py --source {source}.',
      *imports,
      '',
      f'DECODER_CONFIG = {_gin_ref(config.decoder)}',
      f'MODEL_CONFIG = {_gin_ref(config)}',
  ]
  for block in blocks.values():
    lines += [''] + block
  return '\n'.join(lines) + '\n'
