"""TFDS data sets as seqio sources + preprocessors: LibriSpeech (speech recognition) and COCO
captions (Karpathy splits), so a user with a TFDS data dir trains on them unchanged.

Each TFDS example becomes a one-turn conversation and one media item, tokenised by the same
Python code as a manifest record (`conversation.tokenize_conversation` in a `tf.numpy_function`),
so the features equal what `manifest.load_example` gives for the same text and media file:

  librispeech    {human: "<speech>\\n" + prompt, gpt: the transcript lower-cased (UTF-8) and
                 stripped}, speech = Whisper log-mel of the first 30 s of `speech` (int16 at
                 16 kHz, scaled by 1/32768 as soundfile reads 16-bit PCM), `[1, 3000, n_mels]`
                 (a ManifestConfig's audio_max_chunks is not used: always one item).
  coco_captions  {human: "<image>\\n" + prompt, gpt: caption.strip()}, image = `preprocess_image`
                 of `image` (uint8), `[1, S, S, 3]`; caption = the first one, or with
                 caption='all' one example per caption (the image repeated).

Output features (one example; `manifest.feature_specs(settings)` plus 'references'):

  targets             int32   [length]   BOS + tokens, the placeholder expanded to
                                         num_soft_tokens(m) copies of its id
  loss_weights        float32 [length]   1 on the answer and its </s>
  <m>_features        float32 [items, *item_shape] for every m in settings.modalities: one item
                                         of the example's modality, zero items of the others
  audio_feature_mask  bool    [0, audio_frames]   when 'audio' is declared
  references          string  [n]        evaluation references: LibriSpeech [1] the lower-cased
                                         transcript; COCO [n] every caption as stored (raw)

`references` is for the tasks' postprocessors (seqio calls `postprocess_fn(target,
example=ex, is_target=True)` with the task example); the feature converter
(`MultimodalDecoderFeatureConverter._select_features`) keeps only the keys it uses, and a seqio
Mixture keeps only output_features + passthrough_features, so the key is ignored in training.

Settings: any object with the `ManifestConfig` attributes used here (modalities, item_shape(m),
num_soft_tokens(m), image_size, image_mode, n_mels, speech_seconds, audio_frames,
on_bad_example) -- a `ManifestConfig` works as is, or the smaller `TfdsSettings` below.
Passing the ManifestConfig of the manifest tasks keeps the TFDS tasks' specs equal to theirs,
which a Mixture needs.

Bad examples (empty transcript or caption, undecodable media, an answer holding a placeholder
string) raise `manifest.BadExampleError` naming the TFDS data set and example id, or with
on_bad_example='skip' are logged, counted in `manifest.BAD_EXAMPLES` and dropped.
"""

import dataclasses
import functools
from typing import Any, Dict, List, Mapping, Optional

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf

from unimoe_jax.data import conversation as conversation_lib
from unimoe_jax.data import feature_converter as feature_converter_lib
from unimoe_jax.data import feature_settings as feature_settings_lib
from unimoe_jax.data import manifest as manifest_lib
from unimoe_jax.data import metrics as metrics_lib
from unimoe_jax.data import preprocessors as preprocessors_lib
from unimoe_jax.media import audio as audio_lib
from unimoe_jax.media import image as image_lib
from unimoe_jax.media.errors import MediaError
from unimoe_jax.modalities import PLACEHOLDERS

ASR_PROMPT = 'Transcribe the speech.'
CAPTION_PROMPT = 'Describe the image briefly.'

# Config-qualified names: unambiguous, and seqio's LazyTfdsLoader.files (sharding across hosts)
# refuses a bare name whenever the builder it gets has configs (a data dir read through TFDS's
# read-only builder has none, so there 'librispeech:2.1.1' also works).
LIBRISPEECH_TFDS_NAME = 'librispeech/default:2.1.1'
COCO_CAPTIONS_TFDS_NAME = 'coco_captions/2014:1.1.0'

_LIBRISPEECH_RAW_SPLITS = (
    'dev_clean',
    'dev_other',
    'test_clean',
    'test_other',
    'train_clean100',
    'train_clean360',
    'train_other500',
)
# Canonical split -> TFDS split (instruction); every TFDS split is also reachable by its name.
LIBRISPEECH_SPLITS = {
    'train': 'train_clean100+train_clean360+train_other500',  # the 960 h
    'validation': 'dev_clean',
    'test': 'test_clean',
    **{name: name for name in _LIBRISPEECH_RAW_SPLITS},
}
# Karpathy & Li: train + restval (113k images) to train, 5k val, 5k test.
COCO_CAPTIONS_SPLITS = {
    'train': 'train+restval',
    'validation': 'val',
    'test': 'test',
    'restval': 'restval',
    'val': 'val',
}

INT16_SCALE = 1.0 / 32768.0  # soundfile's float32 reading of 16-bit PCM
CAPTION_CHOICES = ('first', 'all')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TfdsSettings(feature_settings_lib.FeatureSettings):
  """How TFDS examples become features, for tasks that are not given a ManifestConfig: the
  fields of `feature_settings.FeatureSettings` (what they mean: `manifest.ManifestConfig`), with no
  manifest paths."""

  def __post_init__(self):
    feature_settings_lib.validate_feature_settings(self, 'TfdsSettings')


# ----------------------------------------------------------------------------------------------
# Sources.


@gin.configurable
def librispeech_source(
    tfds_name: str = LIBRISPEECH_TFDS_NAME,
    data_dir: Optional[str] = None,
    splits: Optional[Mapping[str, str]] = None,
) -> seqio.TfdsDataSource:
  """LibriSpeech from TFDS: features 'speech' int16 [samples] at 16 kHz, 'text' (upper-case
  transcript), 'id', 'speaker_id', 'chapter_id'.

  Args:
    tfds_name: name/config:version; 2.1.1 is the 'default' config (decoded int16 audio). The
      'lazy_decode' config (2.1.2) keeps FLAC bytes, which the preprocessor refuses as bad
      media.
    data_dir: the TFDS data dir (None: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets).
    splits: canonical split -> TFDS split instruction; default `LIBRISPEECH_SPLITS` ('train' =
      all 960 h, 'validation' = dev_clean, 'test' = test_clean, and each TFDS split by name).
  """
  return seqio.TfdsDataSource(
      tfds_name=tfds_name,
      tfds_data_dir=data_dir,
      splits=dict(LIBRISPEECH_SPLITS if splits is None else splits),
  )


@gin.configurable
def coco_captions_source(
    tfds_name: str = COCO_CAPTIONS_TFDS_NAME,
    data_dir: Optional[str] = None,
    splits: Optional[Mapping[str, str]] = None,
) -> seqio.TfdsDataSource:
  """COCO 2014 captions, Karpathy splits, from TFDS: features 'image' uint8 [h, w, 3],
  'image/filename', 'image/id', 'captions' {'text': string [n], 'id': int64 [n]}, 'objects'.

  Args:
    tfds_name: name/config:version.
    data_dir: the TFDS data dir (None: TFDS's default).
    splits: canonical split -> TFDS split instruction; default `COCO_CAPTIONS_SPLITS` ('train' =
      train+restval, 'validation' = val, 'test' = test).
  """
  return seqio.TfdsDataSource(
      tfds_name=tfds_name,
      tfds_data_dir=data_dir,
      splits=dict(COCO_CAPTIONS_SPLITS if splits is None else splits),
  )


# ----------------------------------------------------------------------------------------------
# One example (Python, inside tf.numpy_function).


def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _speech_item(wave: np.ndarray, settings) -> np.ndarray:
  """int16 (or float) samples at 16 kHz -> `[1, 100 * speech_seconds, n_mels]` float32 (the
  first window: 30 s, 3000 frames by default)."""
  wave = np.asarray(wave)
  if wave.ndim != 1 or wave.size == 0:
    raise ValueError(f'speech must be non-empty 1-D samples, got shape {wave.shape}')
  if np.issubdtype(wave.dtype, np.integer):
    if wave.dtype != np.int16:
      raise ValueError(f'integer speech must be int16 PCM, got {wave.dtype}')
    wave = wave.astype(np.float32) * np.float32(INT16_SCALE)
  seconds = settings.speech_seconds
  return audio_lib.whisper_log_mel(
      wave[: seconds * audio_lib.SAMPLE_RATE], settings.n_mels, chunk_seconds=seconds
  )[None]


def _image_item(image: np.ndarray, settings) -> np.ndarray:
  """uint8 `[h, w, 3]` -> `[1, S, S, 3]` float32 (CLIP preprocessing)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'image must be uint8 [height, width, 3], got {image.dtype} {image.shape}')
  return image_lib.preprocess_image(image, settings.image_size, settings.image_mode)[None]


_MEDIA_ITEM = {'speech': _speech_item, 'image': _image_item}


def conversation_for(modality: str, prompt: str, answer: str) -> List[Dict[str, str]]:
  """The one-turn conversation of a TFDS example (what its manifest record would hold)."""
  return [
      {'from': 'human', 'value': PLACEHOLDERS[modality] + '\n' + prompt},
      {'from': 'gpt', 'value': answer},
  ]


def example_arrays(
    modality: str, media: np.ndarray, answer: str, prompt: str, settings, vocabulary, location: str
) -> Dict[str, np.ndarray]:
  """targets, loss_weights and the one `<modality>_features` item of one TFDS example.

  Raises:
    manifest.BadExampleError: empty answer, an answer holding a placeholder, bad media.
  """

  def bad(reason, detail):
    return manifest_lib.BadExampleError(location, reason, detail)

  if not answer:
    raise bad('empty_answer', 'the transcript / caption is empty')
  held = [p for p in vocabulary.placeholder_ids if p in answer]
  if held:
    raise bad('malformed_conversation', f'the answer holds placeholder(s) {held}')
  try:
    features = _MEDIA_ITEM[modality](media, settings)
  except (MediaError, ValueError) as e:
    raise bad('bad_media', str(e)) from None
  try:
    targets, loss_weights = conversation_lib.tokenize_conversation(
        conversation_for(modality, prompt, answer),
        vocabulary,
        {PLACEHOLDERS[modality]: settings.num_soft_tokens(modality)},
    )
  except ValueError as e:
    raise bad('malformed_conversation', str(e)) from None
  return {'targets': targets, 'loss_weights': loss_weights, f'{modality}_features': features}


# ----------------------------------------------------------------------------------------------
# tf.data.


def _check_prompt(prompt: str, vocabulary, name: str) -> None:
  if not isinstance(prompt, str) or not prompt.strip():
    raise ValueError(f'{name}.prompt must be a non-empty string, got {prompt!r}')
  held = [p for p in vocabulary.placeholder_ids if p in prompt]
  if held:
    raise ValueError(
        f'{name}.prompt must not hold placeholders (the preprocessor puts the one '
        f'media placeholder itself), got {held} in {prompt!r}'
    )


def _check_modality(settings, modality: str, name: str) -> None:
  if modality not in settings.modalities:
    raise ValueError(
        f'{name} needs {modality!r} in settings.modalities, got ' f'{tuple(settings.modalities)}'
    )


def _relaxed(tensor: tf.Tensor, shape) -> tf.Tensor:
  """`tensor` with static shape `shape` (e.g. [None, ...] for a known 0 items), so the element
  spec equals `manifest.feature_specs` and datasets of several tasks can be mixed."""
  return tf.compat.v1.placeholder_with_default(tensor, shape)


def _to_features(
    dataset: tf.data.Dataset, modality: str, settings, vocabulary, prompt: str, dataset_name: str
) -> tf.data.Dataset:
  """Datasets of {'media', 'answer' (string, Python-side transform applied), 'example_id',
  'references'} -> the output features of the module docstring."""
  specs = manifest_lib.feature_specs(settings)
  feature_key = f'{modality}_features'
  skip = getattr(settings, 'on_bad_example', 'raise') == 'skip'
  empty = {
      key: np.zeros(
          [0 if d is None else d for d in specs[key].shape], specs[key].dtype.as_numpy_dtype
      )
      for key in ('targets', 'loss_weights', feature_key)
  }

  def load(media, answer, example_id):
    location = f'{dataset_name} example {_text(example_id)}'
    try:
      arrays = example_arrays(
          modality, media, _text(answer), prompt, settings, vocabulary, location
      )
      valid = True
    except manifest_lib.BadExampleError as e:
      if not skip:
        raise
      # Keyed like a manifest's (source, record): counted and logged once however often
      # the example is read (epochs, look-ahead checks), as manifest_lib counts its lines.
      key = (dataset_name, _text(example_id))
      again = manifest_lib.BAD_EXAMPLES.seen(key)
      total = manifest_lib.BAD_EXAMPLES.add(e.reason, key=key)
      if not again:
        logging.warning('skipping %s (%d bad examples so far)', e, total)
      arrays, valid = empty, False
    return arrays['targets'], arrays['loss_weights'], arrays[feature_key], np.bool_(valid)

  def convert(ex):
    targets, loss_weights, features, valid = tf.numpy_function(
        load,
        [ex['media'], ex['answer'], ex['example_id']],
        [tf.int32, tf.float32, tf.float32, tf.bool],
        stateful=False,
    )
    targets.set_shape(specs['targets'].shape)
    loss_weights.set_shape(specs['loss_weights'].shape)
    features.set_shape(specs[feature_key].shape)
    valid.set_shape([])
    out = {'targets': targets, 'loss_weights': loss_weights}
    for key, spec in specs.items():
      if key not in out:
        out[key] = (
            features
            if key == feature_key
            else _relaxed(tf.zeros([0] + spec.shape.as_list()[1:], spec.dtype), spec.shape)
        )
    out['references'] = _relaxed(ex['references'], [None])
    return out, valid

  ds = dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if skip:
    ds = ds.filter(lambda ex, valid: valid)
  return ds.map(lambda ex, valid: ex)


def _example_id(ex: Mapping[str, tf.Tensor], key: str) -> tf.Tensor:
  """The example's `key` as a string, for error messages ('?' when the example has none)."""
  if key not in ex:
    return tf.constant('?')
  return ex[key] if ex[key].dtype == tf.string else tf.strings.as_string(ex[key])


def _lower_strip(text: tf.Tensor) -> tf.Tensor:
  # Python's str.lower (Unicode) would need numpy_function; tf's utf-8 lower matches it on
  # LibriSpeech's A-Z and apostrophes, and on any letters with simple case mappings.
  return tf.strings.strip(tf.strings.lower(text, encoding='utf-8'))


@gin.configurable
def librispeech_preprocessor(
    dataset: tf.data.Dataset,
    settings,
    vocabulary,
    prompt: str = ASR_PROMPT,
    dataset_name: str = 'librispeech',
) -> tf.data.Dataset:
  """LibriSpeech TFDS examples -> features (module docstring): {human: "<speech>\\n" + prompt,
  gpt: the lower-cased transcript}, one speech item, references [1] = that transcript.

  Args:
    dataset: TFDS examples with 'speech' int16 [samples] at 16 kHz, 'text' and 'id'.
    settings: a `TfdsSettings` or `manifest.ManifestConfig` ('speech' in its modalities).
    vocabulary: a `MultimodalVocabulary`.
    prompt: the user's instruction after the placeholder line (gin-configurable).
    dataset_name: for error messages.
  """
  _check_modality(settings, 'speech', 'librispeech_preprocessor')
  _check_prompt(prompt, vocabulary, 'librispeech_preprocessor')

  def inputs(ex):
    answer = _lower_strip(ex['text'])
    return {
        'media': ex['speech'],
        'answer': answer,
        'example_id': _example_id(ex, 'id'),
        'references': answer[None],
    }

  dataset = dataset.map(inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _to_features(dataset, 'speech', settings, vocabulary, prompt, dataset_name)


@gin.configurable
def coco_captions_preprocessor(
    dataset: tf.data.Dataset,
    settings,
    vocabulary,
    prompt: str = CAPTION_PROMPT,
    caption: str = 'first',
    dataset_name: str = 'coco_captions',
) -> tf.data.Dataset:
  """COCO captions TFDS examples -> features (module docstring): {human: "<image>\\n" + prompt,
  gpt: a caption, whitespace-stripped}, one image item, references [n] = all captions (raw).

  Args:
    dataset: TFDS examples with 'image' uint8 [h, w, 3], 'captions' {'text': [n]} and
      'image/filename'.
    settings: a `TfdsSettings` or `manifest.ManifestConfig` ('image' in its modalities).
    vocabulary: a `MultimodalVocabulary`.
    prompt: the user's instruction after the placeholder line (gin-configurable).
    caption: 'first' (one example per image, its first caption) or 'all' (one example per
      caption, in stored order; for training on all five).
    dataset_name: for error messages.
  """
  _check_modality(settings, 'image', 'coco_captions_preprocessor')
  _check_prompt(prompt, vocabulary, 'coco_captions_preprocessor')
  if caption not in CAPTION_CHOICES:
    raise ValueError(
        f'coco_captions_preprocessor.caption must be one of {CAPTION_CHOICES}, ' f'got {caption!r}'
    )

  def first(ex):
    captions = ex['captions']['text']
    # No caption -> '' -> reported as an empty answer.
    answer = tf.strings.strip(tf.concat([captions, tf.constant([''])], 0)[0])
    return {
        'media': ex['image'],
        'answer': answer,
        'example_id': _example_id(ex, 'image/filename'),
        'references': captions,
    }

  def every(ex):
    captions = ex['captions']['text']
    example_id = _example_id(ex, 'image/filename')
    return tf.data.Dataset.from_tensor_slices(tf.strings.strip(captions)).map(
        lambda answer: {
            'media': ex['image'],
            'answer': answer,
            'example_id': example_id,
            'references': captions,
        }
    )

  if caption == 'first':
    dataset = dataset.map(first, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    dataset = dataset.flat_map(every)
  return _to_features(dataset, 'image', settings, vocabulary, prompt, dataset_name)


# ----------------------------------------------------------------------------------------------
# Tasks.


def _references(example: Optional[Mapping[str, Any]]) -> Optional[List[str]]:
  if example is None or 'references' not in example:
    return None
  return [_text(r) for r in np.asarray(example['references']).reshape(-1)]


def asr_postprocessor(
    output: Any,
    example: Optional[Mapping[str, Any]] = None,
    is_target: bool = False,
    **unused_kwargs,
) -> str:
  """Targets: the example's reference transcript; predictions: the decoded text, stripped."""
  references = _references(example) if is_target else None
  return references[0] if references else _text(output).strip()


def caption_postprocessor(
    output: Any,
    example: Optional[Mapping[str, Any]] = None,
    is_target: bool = False,
    **unused_kwargs,
):
  """Targets: the example's list of reference captions; predictions: the text, stripped."""
  references = _references(example) if is_target else None
  return references if references else _text(output).strip()


def output_features(vocabulary, settings) -> Dict[str, seqio.Feature]:
  """The converter's task features for `settings.modalities` (targets, loss weights, media)."""
  return feature_converter_lib.output_features(vocabulary, settings.modalities)


def register_tfds_tasks(
    vocabulary,
    settings,
    data_dir: Optional[str] = None,
    prefix: str = 'unimoe',
    shuffle_buffer_size: Optional[int] = 256,
) -> List[str]:
  """Registers `<prefix>_librispeech_asr` (metric: word_error_rate) and `<prefix>_coco_captions`
  (metrics: bleu, cider); returns their names. Idempotent: a name already registered is kept
  (a warning is logged when its output features, settings or vocabulary differ from the ones
  asked for).

  Preprocessors: the TFDS-to-features one, then `preprocessors.drop_too_long` (seqio passes
  `sequence_length`), so an example that cannot fit is dropped and counted, never trimmed.
  Sources, prompts and the caption choice read gin bindings of `librispeech_source`,
  `coco_captions_source`, `librispeech_preprocessor`, `coco_captions_preprocessor`.

  Args:
    vocabulary: the `MultimodalVocabulary` of 'targets'.
    settings: `TfdsSettings` or `manifest.ManifestConfig` (both modalities 'speech', 'image').
    data_dir: the TFDS data dir (None: TFDS's default).
    prefix: task name prefix.
    shuffle_buffer_size: seqio's post-preprocessing shuffle buffer, in examples. Each holds
      its media (~1 MB for a 30 s log-mel or a 336 px image), hence smaller than seqio's 1000.
  """
  features = output_features(vocabulary, settings)
  tasks = {
      f'{prefix}_librispeech_asr': dict(
          source=librispeech_source(data_dir=data_dir),
          preprocess=functools.partial(
              librispeech_preprocessor, settings=settings, vocabulary=vocabulary
          ),
          postprocess_fn=asr_postprocessor,
          metric_fns=[metrics_lib.word_error_rate],
      ),
      f'{prefix}_coco_captions': dict(
          source=coco_captions_source(data_dir=data_dir),
          preprocess=functools.partial(
              coco_captions_preprocessor, settings=settings, vocabulary=vocabulary
          ),
          postprocess_fn=caption_postprocessor,
          metric_fns=[metrics_lib.bleu, metrics_lib.cider],
      ),
  }
  for name, spec in tasks.items():
    if name in seqio.TaskRegistry.names():
      existing = seqio.TaskRegistry.get(name)
      first = existing.preprocessors[0] if existing.preprocessors else None
      registered_with = getattr(first, 'keywords', {})  # the functools.partial below
      if (
          dict(existing.output_features) != features
          or registered_with.get('settings') != settings
          or registered_with.get('vocabulary') != vocabulary
      ):
        logging.warning(
            'register_tfds_tasks: %s is already registered with other output '
            'features, settings or vocabulary; keeping the registered one',
            name,
        )
      continue
    seqio.TaskRegistry.add(
        name,
        source=spec['source'],
        output_features=features,
        preprocessors=[
            spec['preprocess'],
            functools.partial(preprocessors_lib.drop_too_long, task_name=name),
            preprocessors_lib.add_pretokenized,
        ],
        postprocess_fn=spec['postprocess_fn'],
        metric_fns=spec['metric_fns'],
        shuffle_buffer_size=shuffle_buffer_size,
    )
  return list(tasks)


__all__ = [
    'ASR_PROMPT',
    'CAPTION_PROMPT',
    'COCO_CAPTIONS_SPLITS',
    'COCO_CAPTIONS_TFDS_NAME',
    'LIBRISPEECH_SPLITS',
    'LIBRISPEECH_TFDS_NAME',
    'TfdsSettings',
    'asr_postprocessor',
    'caption_postprocessor',
    'coco_captions_preprocessor',
    'coco_captions_source',
    'conversation_for',
    'example_arrays',
    'librispeech_preprocessor',
    'librispeech_source',
    'output_features',
    'register_tfds_tasks',
]
