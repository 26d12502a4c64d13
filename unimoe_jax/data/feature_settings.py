"""How examples become features: the settings every source of examples shares.

`FeatureSettings` holds the fields a manifest (`manifest.ManifestConfig`) and a TFDS source
(`tfds_sources.TfdsSettings`) share: which modalities every example carries, the media sizes,
the soft tokens per item and the bad-example policy. What each field means is in
`ManifestConfig`'s docstring. No TensorFlow here: the sources build on it, and it only checks
and describes.
"""

import dataclasses
from typing import Tuple

from unimoe_jax.media import audio as audio_lib
from unimoe_jax.media import image as image_lib
from unimoe_jax.modalities import MODALITIES

# 'raise': a bad example stops the run, naming it; 'skip': it is dropped, logged and counted.
BAD_EXAMPLE_POLICIES = ('raise', 'skip')


def validate_feature_settings(settings, name: str, extra_positive=()) -> None:
  """Checks the fields every feature-settings config shares (ManifestConfig, TfdsSettings):
  modalities, image_mode, on_bad_example and the positive sizes; errors name `name.field`.
  Normalises `modalities` to a tuple."""
  unknown = [m for m in settings.modalities if m not in MODALITIES]
  if unknown or len(set(settings.modalities)) != len(settings.modalities):
    raise ValueError(
        f'{name}.modalities must be distinct entries of {MODALITIES}, ' f'got {settings.modalities}'
    )
  object.__setattr__(settings, 'modalities', tuple(settings.modalities))
  if settings.image_mode not in image_lib.PREPROCESS_MODES:
    raise ValueError(
        f'{name}.image_mode must be one of {image_lib.PREPROCESS_MODES}, '
        f'got {settings.image_mode!r}'
    )
  if settings.on_bad_example not in BAD_EXAMPLE_POLICIES:
    raise ValueError(
        f'{name}.on_bad_example must be one of {BAD_EXAMPLE_POLICIES}, got '
        f'{settings.on_bad_example!r}'
    )
  for field in (
      'image_size',
      'video_frames',
      'n_mels',
      'speech_seconds',
      'audio_frames',
      *extra_positive,
      'image_soft_tokens',
      'video_soft_tokens',
      'speech_soft_tokens',
      'audio_soft_tokens',
  ):
    if getattr(settings, field) < 1:
      raise ValueError(f'{name}.{field} must be positive, got {getattr(settings, field)}')


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
  """How examples become features: the fields a manifest (`ManifestConfig`) and a TFDS source
  (`tfds_sources.TfdsSettings`) share; what each means is in `ManifestConfig`'s docstring.
  Subclasses call `validate_feature_settings` in their `__post_init__`."""

  modalities: Tuple[str, ...] = MODALITIES
  image_size: int = 336
  image_mode: str = 'crop'
  video_frames: int = 8
  n_mels: int = 80
  speech_seconds: int = audio_lib.WHISPER_SECONDS
  audio_frames: int = audio_lib.BEATS_CHUNK_FRAMES
  image_soft_tokens: int = 576
  video_soft_tokens: int = 576
  speech_soft_tokens: int = 50
  audio_soft_tokens: int = 50
  on_bad_example: str = 'raise'

  def num_soft_tokens(self, modality: str) -> int:
    return getattr(self, f'{modality}_soft_tokens')

  def item_shape(self, modality: str) -> Tuple[int, ...]:
    size = self.image_size
    return {
        'image': (size, size, 3),
        'video': (self.video_frames, size, size, 3),
        'speech': (audio_lib.WHISPER_FRAMES_PER_SECOND * self.speech_seconds, self.n_mels),
        'audio': (self.audio_frames, audio_lib.BEATS_MEL_BINS),
    }[modality]
