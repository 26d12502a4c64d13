"""The official Uni-MoE manifest as a tf.data / seqio source of tokenised, masked examples + media.

A manifest is a JSON list (official), JSON lines, or one JSON object (pretty-printed or not),
in UTF-8 with or without a byte-order mark (`read_manifest`), of records

    {"id": ..., "conversations": [{"from": "human", "value": "<image>\\nWhat ..."},
                                  {"from": "gpt", "value": "..."}],
     "image": "coco/1.jpg",                      # optional, one file (a list is accepted too)
     "video": ["f0.jpg", ..., "f7.jpg"],          # optional: frame files (official) or one file
     "voice": ["a.wav", ...],                     # optional, official: "<audio>" in the text
     "speech": "s.wav" | [...], "audio": ...}     # ours: "<speech>" / "<audio>" in the text

Media paths are relative to `ManifestConfig.media_root` (default: the manifest's folder; absolute
paths stay as they are). `voice` items are speech (Whisper) or audio (BEATs) as
`voice_modality` says; as speech, the text's "<audio>" placeholders are read as "<speech>".

The k-th placeholder of a modality belongs to the k-th file of that modality; a record must
hold exactly as many placeholders as files (official Uni-MoE silently ignores extra files and
crashes on missing ones). A speech / audio file longer than one 30 s window becomes several
items whose soft tokens all stand, in order, at its one placeholder: by default as the official
loaders cut it (`media.audio.split_chunks`: speech every 480001-sample piece, audio at most 20
pieces of 480000), or at most `audio_max_chunks` pieces when that is set. An audio piece shorter
than 30 s is padded as `audio_padding` says (`media.audio.beats_chunk_features`).

Bad examples (missing or undecodable media, malformed conversation, placeholder/media count
mismatch, bad JSON, bytes that are not UTF-8) raise `BadExampleError` naming manifest, line
(JSONL) or record (JSON list, 1-based) and the reason, or with `on_bad_example='skip'` are
dropped, logged and counted in `BAD_EXAMPLES` by reason (each example once, however often it
is read). A manifest without records, or a pass with 'skip' in which every record was bad,
raises naming the manifest.
"""

import dataclasses
import json
import os
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf

from unimoe_jax.data import conversation as conversation_lib
from unimoe_jax.data import feature_settings as feature_settings_lib
from unimoe_jax.data.bad_examples import BAD_EXAMPLES, BadExampleCounter, BadExampleError
from unimoe_jax.data.manifest_files import UndecodableRecord
from unimoe_jax.data.manifest_files import first_bad_byte, read_manifest
from unimoe_jax.data import vocabulary as vocabulary_lib
from unimoe_jax.media import audio as audio_lib
from unimoe_jax.media import image as image_lib
from unimoe_jax.media import video as video_lib
from unimoe_jax.media.errors import MediaError
from unimoe_jax.modalities import MODALITIES, PLACEHOLDERS


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ManifestConfig(feature_settings_lib.FeatureSettings):
  """Where a manifest is and how its examples become features.

  Attributes:
    path: the manifest (JSON list or JSONL) of split 'train' when `splits` is not given.
    splits: split name -> manifest path (a dict is accepted and stored as sorted pairs).
    media_root: folder relative media paths start from; '' means the manifest's folder.
    vocab_path: LLaMA `tokenizer.model` for `vocabulary.get_vocabulary`.
    modalities: the `<m>_features` every example carries (items may be 0).
    voice_modality: 'speech' or 'audio': what the official `voice` files are.
    image_size / image_mode: CLIP input side and 'crop' (official default, CLIP processor) or
      'pad' (LLaVA expand-to-square, `image_aspect_ratio='pad'`); video frames use the same.
    video_frames: frames per video item (picked uniformly from the listed frames or the file).
    n_mels: Whisper mel bins (80; 128 for large-v3).
    speech_seconds: Whisper window per speech item, 30 as in Whisper and the official code
      (3000 log-mel frames); tiny CPU models may use a shorter window (100 frames per second,
      the encoder's max_source_positions = 50 * speech_seconds).
    audio_frames: BEATs filterbank frames per audio item (2998 = one 30 s chunk; fewer keeps
      the first frames), with `audio_feature_mask` True on real frames.
    audio_padding: how an audio piece shorter than 30 s is padded; must be the model's
      `UniMoEConfig.audio_padding`. 'official' (default, Uni_MoE_audio's data path): the
      waveform is padded to 480000 samples with its last sample and the mask marks the frames
      of the original samples (audio_frames <= 2998); 'masked': the fbank of the piece itself,
      zero-padded (`media.audio.beats_chunk_features`).
    audio_max_chunks: 0 (default) keeps the official number of 30 s pieces per file (speech:
      all, audio: 20); n > 0 keeps at most n per speech or audio file.
    image_soft_tokens ... audio_soft_tokens: placeholder ids per item (UniMoEConfig's
      num_soft_tokens: CLIP-336 patches 576; aligner / Q-Former queries 50).
    on_bad_example: 'raise' or 'skip'.
  """

  # The fields of FeatureSettings, then:
  path: str = ''
  splits: Optional[Any] = None
  media_root: str = ''
  vocab_path: str = ''
  voice_modality: str = 'speech'
  audio_padding: str = 'official'
  audio_max_chunks: int = 0

  def __post_init__(self):
    if isinstance(self.splits, Mapping):
      object.__setattr__(self, 'splits', tuple(sorted(self.splits.items())))
    if not self.path and not self.splits:
      raise ValueError('ManifestConfig.path or ManifestConfig.splits must name a manifest')
    feature_settings_lib.validate_feature_settings(self, 'ManifestConfig')
    if self.audio_max_chunks < 0:
      raise ValueError(
          f'ManifestConfig.audio_max_chunks must be 0 (the official limits) or '
          f'positive, got {self.audio_max_chunks}'
      )
    if self.audio_padding not in audio_lib.AUDIO_PADDING_MODES:
      raise ValueError(
          f'ManifestConfig.audio_padding must be one of '
          f'{audio_lib.AUDIO_PADDING_MODES}, got {self.audio_padding!r}'
      )
    if self.audio_padding == 'official' and self.audio_frames > audio_lib.BEATS_CHUNK_FRAMES:
      raise ValueError(
          f'ManifestConfig.audio_frames={self.audio_frames}: with audio_padding '
          f"'official' an item is one 480000-sample piece, "
          f'{audio_lib.BEATS_CHUNK_FRAMES} frames at most'
      )
    if self.voice_modality not in ('speech', 'audio'):
      raise ValueError(
          f"ManifestConfig.voice_modality must be 'speech' or 'audio', got "
          f'{self.voice_modality!r}'
      )

  def split_paths(self) -> Dict[str, str]:
    return dict(self.splits) if self.splits else {'train': self.path}


def _as_list(value) -> List:
  return list(value) if isinstance(value, (list, tuple)) else [value]


def _files_by_modality(record: Mapping[str, Any], config: ManifestConfig):
  """modality -> list of files (a video item is a list of frame files or one file)."""
  files = {m: [] for m in MODALITIES}
  if 'image' in record:
    files['image'] = _as_list(record['image'])
  if 'video' in record:
    files['video'] = [record['video']]
  for key in ('speech', 'audio'):
    if key in record:
      files[key] = _as_list(record[key])
  if 'voice' in record:
    target = config.voice_modality
    clash = ('speech', 'audio') if target == 'speech' else ('audio',)
    if any(key in record for key in clash):
      raise ValueError(
          f'"voice" (read as {target}) together with '
          f'{[k for k in clash if k in record]} makes "<audio>" ambiguous'
      )
    files[target] = _as_list(record['voice'])
  for m, items in files.items():
    for item in items:
      frames = item if m == 'video' and isinstance(item, list) else [item]
      if not frames or not all(isinstance(f, str) and f for f in frames):
        raise ValueError(
            f'{m} entry must be a non-empty path string'
            f'{" or list of frame paths" if m == "video" else ""}, got {item!r:.80}'
        )
  return files


# ----------------------------------------------------------------------------------------------
# Media.


def _audio_chunks(path: str, modality: str, config: ManifestConfig) -> List[np.ndarray]:
  wave = audio_lib.load_audio(path, audio_lib.SAMPLE_RATE)
  if modality == 'speech':
    step, official_max = config.speech_seconds * audio_lib.SAMPLE_RATE + 1, None
  else:
    step, official_max = audio_lib.BEATS_CHUNK_SAMPLES, audio_lib.AUDIO_MAX_CHUNKS
  return audio_lib.split_chunks(wave, step, config.audio_max_chunks or official_max)


def _speech_items(path: str, config: ManifestConfig) -> List[np.ndarray]:
  return [
      audio_lib.whisper_log_mel(chunk, config.n_mels, chunk_seconds=config.speech_seconds)
      for chunk in _audio_chunks(path, 'speech', config)
  ]


def _audio_items(path: str, config: ManifestConfig) -> List[Tuple[np.ndarray, np.ndarray]]:
  return [
      audio_lib.beats_chunk_features(chunk, config.audio_padding, config.audio_frames)
      for chunk in _audio_chunks(path, 'audio', config)
  ]


def _load_items(modality: str, item, resolve, config: ManifestConfig):
  """Feature arrays of one file (several for long audio) and, for audio, their frame masks."""
  if modality == 'image':
    return [
        image_lib.preprocess_image(
            image_lib.load_image(resolve(item)), config.image_size, config.image_mode
        )
    ], None
  if modality == 'video':
    if isinstance(item, list):
      frames = video_lib.load_frame_list([resolve(f) for f in item], config.video_frames)
    else:
      frames = video_lib.load_video_frames(resolve(item), config.video_frames)
    return [video_lib.preprocess_video(frames, config.image_size, config.image_mode)], None
  if modality == 'speech':
    return _speech_items(resolve(item), config), None
  pairs = _audio_items(resolve(item), config)
  return [p[0] for p in pairs], [p[1] for p in pairs]


# ----------------------------------------------------------------------------------------------
# One example.


def load_example(
    record: Any,
    line_no: int,
    config: ManifestConfig,
    vocabulary: Optional[vocabulary_lib.MultimodalVocabulary] = None,
    manifest_path: Optional[str] = None,
) -> Dict[str, np.ndarray]:
  """One manifest record -> the example features of /tmp/data_spec.md.

  Args:
    record: the parsed record, or a JSON line (str) to parse.
    line_no: its 1-based line (JSONL) or record number, for error messages.
    config: the manifest config.
    vocabulary: defaults to `get_vocabulary(config.vocab_path)`.
    manifest_path: for messages and the default media root; defaults to the config's path.

  Returns:
    {'targets': [n] int32, 'loss_weights': [n] float32, '<m>_features': [items, *item_shape]
    float32 for every m in config.modalities, 'audio_feature_mask': [items, audio_frames] bool
    when audio is one of them}.

  Raises:
    BadExampleError: naming the manifest, line and reason.
  """
  manifest_path = manifest_path or config.path
  location = f'{manifest_path} line {line_no}'
  return _load_example(
      record, location, manifest_path, config, vocabulary or _vocabulary(config.vocab_path)
  )


def _load_example(
    record, location: str, manifest_path: str, config: ManifestConfig, vocabulary
) -> Dict[str, np.ndarray]:
  def bad(reason, detail):
    return BadExampleError(location, reason, detail)

  if isinstance(record, UndecodableRecord):
    raise bad('bad_encoding', record.detail)
  if isinstance(record, bytes):
    try:
      record = record.decode('utf-8')
    except UnicodeDecodeError as e:
      raise bad('bad_encoding', f'not UTF-8: {e}') from None
  if isinstance(record, str):
    if first_bad_byte(record):
      raise bad(
          'bad_encoding', f'the line holds a byte that is not UTF-8 ' f'({first_bad_byte(record)})'
      )
    try:
      record = json.loads(record)
    except json.JSONDecodeError as e:
      raise bad('bad_json', str(e)) from None
  if not isinstance(record, Mapping) or 'conversations' not in record:
    raise bad('malformed_record', 'a record must be an object with "conversations"')
  try:
    files = _files_by_modality(record, config)
    conversations = [
        dict(turn) if isinstance(turn, Mapping) else turn
        for turn in _as_list(record['conversations'])
    ]
    if 'voice' in record and config.voice_modality == 'speech':
      for turn in conversations:
        if isinstance(turn, dict) and isinstance(turn.get('value'), str):
          turn['value'] = turn['value'].replace(PLACEHOLDERS['audio'], PLACEHOLDERS['speech'])
    conversation_lib.validate(conversations)
  except ValueError as e:
    raise bad('malformed_conversation', str(e)) from None

  for m in MODALITIES:
    count = sum(turn['value'].count(PLACEHOLDERS[m]) for turn in conversations if turn['value'])
    if count != len(files[m]):
      raise bad(
          'placeholder_mismatch',
          f'{count} {PLACEHOLDERS[m]} placeholders in the text but ' f'{len(files[m])} {m} files',
      )
    if count and m not in config.modalities:
      raise bad(
          'modality_not_enabled',
          f'record has {count} {m} items but the config ' f'has modalities {config.modalities}',
      )

  media_root = config.media_root or os.path.dirname(manifest_path)
  resolve = lambda p: os.path.join(media_root, p)  # noqa: E731 (absolute p wins)
  features, chunks_per_file = {}, {}
  audio_masks = []
  for m in config.modalities:
    items, chunks_per_file[m] = [], []
    for item in files[m]:
      try:
        arrays, masks = _load_items(m, item, resolve, config)
      except MediaError as e:
        reason = 'missing_file' if e.reason == 'no such file' else 'media_error'
        raise bad(reason, str(e)) from None
      except ValueError as e:  # e.g. frames of different sizes, too little audio
        raise bad('media_error', f'{m} {item!r:.200}: {e}') from None
      items += arrays
      chunks_per_file[m].append(len(arrays))
      if masks is not None:
        audio_masks += masks
    features[f'{m}_features'] = (
        np.stack(items).astype(np.float32)
        if items
        else np.zeros((0,) + config.item_shape(m), np.float32)
    )
  if 'audio' in config.modalities:
    features['audio_feature_mask'] = (
        np.stack(audio_masks) if audio_masks else np.zeros((0, config.audio_frames), bool)
    )

  num_soft_tokens = {
      PLACEHOLDERS[m]: [c * config.num_soft_tokens(m) for c in chunks_per_file[m]]
      for m in config.modalities
  }
  try:
    targets, loss_weights = conversation_lib.tokenize_conversation(
        conversations, vocabulary, num_soft_tokens
    )
  except ValueError as e:
    raise bad('malformed_conversation', str(e)) from None
  return {'targets': targets, 'loss_weights': loss_weights, **features}


_VOCAB_LOCK = threading.Lock()
_VOCABS: Dict[str, vocabulary_lib.MultimodalVocabulary] = {}


def _vocabulary(path: str) -> vocabulary_lib.MultimodalVocabulary:
  if not path:
    raise ValueError('ManifestConfig.vocab_path is empty and no vocabulary was given')
  with _VOCAB_LOCK:
    if path not in _VOCABS:
      _VOCABS[path] = vocabulary_lib.get_vocabulary(path)
    return _VOCABS[path]


# ----------------------------------------------------------------------------------------------
# tf.data.


def feature_specs(config: ManifestConfig) -> Dict[str, tf.TensorSpec]:
  """The static output signature of `manifest_dataset` for `config`."""
  specs = {
      'targets': tf.TensorSpec([None], tf.int32),
      'loss_weights': tf.TensorSpec([None], tf.float32),
  }
  for m in config.modalities:
    specs[f'{m}_features'] = tf.TensorSpec((None,) + config.item_shape(m), tf.float32)
  if 'audio' in config.modalities:
    specs['audio_feature_mask'] = tf.TensorSpec([None, config.audio_frames], tf.bool)
  return specs


def _empty_example(specs: Mapping[str, tf.TensorSpec]) -> Dict[str, np.ndarray]:
  return {
      k: np.zeros([0 if d is None else d for d in s.shape], s.dtype.as_numpy_dtype)
      for k, s in specs.items()
  }


def manifest_dataset(
    config: ManifestConfig,
    split_shard: Optional[seqio.ShardInfo] = None,
    manifest_path: Optional[str] = None,
    shuffle: bool = False,
    seed: Optional[int] = None,
    vocabulary: Optional[vocabulary_lib.MultimodalVocabulary] = None,
    task_name: str = '',
) -> tf.data.Dataset:
  """Examples of one manifest (default: `config.path`) as a tf.data.Dataset of `feature_specs`.

  Records enter as their indices (sharded by `split_shard`, shuffled when asked), and are
  loaded in parallel by `tf.numpy_function` in a deterministic map, so the order is the
  manifest order. Bad examples raise (the tf error carries the `BadExampleError` message) or,
  with on_bad_example='skip', are logged, counted in `BAD_EXAMPLES` (each example once, however
  often it is read) and filtered out.

  A manifest without records raises ValueError here; with 'skip', a pass over this shard whose
  every record was bad raises at its end (a repeated dataset would otherwise spin forever),
  naming the task (`task_name`), the manifest and the bad examples by reason.
  """
  manifest_path = manifest_path or config.path
  entries = read_manifest(manifest_path)
  of_task = f'task {task_name}: ' if task_name else ''
  if not entries:
    raise ValueError(
        f'{of_task}manifest {manifest_path} holds no records (an empty file, an '
        'empty JSON list or blank lines only)'
    )
  vocabulary = vocabulary or _vocabulary(config.vocab_path)
  specs = feature_specs(config)
  keys = list(specs)
  skip = config.on_bad_example == 'skip'

  def load(index):
    entry = entries[int(index)]
    try:
      example = _load_example(entry.raw, entry.location, manifest_path, config, vocabulary)
      valid = True
    except BadExampleError as e:
      if not skip:
        raise
      key = (manifest_path, entry.number)
      again = BAD_EXAMPLES.seen(key)  # Read again: another epoch, a look-ahead check.
      total = BAD_EXAMPLES.add(e.reason, key=key)
      if again:
        logging.debug('skipping %s again', e)
      else:
        logging.warning('skipping %s (%d bad examples so far)', e, total)
      example, valid = _empty_example(specs), False
    return [example[k] for k in keys] + [np.bool_(valid)]

  def load_tf(index):
    outputs = tf.numpy_function(
        load, [index], [specs[k].dtype for k in keys] + [tf.bool], stateful=False
    )
    for output, key in zip(outputs, keys):
      output.set_shape(specs[key].shape)
    outputs[-1].set_shape([])
    return dict(zip(keys, outputs[:-1])), outputs[-1]

  ds = tf.data.Dataset.range(len(entries))
  if split_shard is not None and split_shard.num_shards > 1:
    ds = ds.shard(split_shard.num_shards, split_shard.index)
  if shuffle:
    ds = ds.shuffle(max(len(entries), 1), seed=seed, reshuffle_each_iteration=True)
  ds = ds.map(load_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if skip:
    ds = _fail_when_all_bad(ds, specs, manifest_path, split_shard, of_task)
    ds = ds.filter(lambda example, valid: valid)
  return ds.map(lambda example, valid: example)


def _fail_when_all_bad(
    ds: tf.data.Dataset,
    specs,
    manifest_path: str,
    split_shard: Optional[seqio.ShardInfo],
    of_task: str,
) -> tf.data.Dataset:
  """(example, valid) pairs as they are; raises at the end of a pass that had no valid one.

  A sentinel after the last record ends the pass; a `scan` counts the pass's valid and bad
  records (its state restarts with each iterator: per epoch of a repeated dataset)."""
  sentinel = tf.data.Dataset.from_tensors(
      (
          {k: tf.constant(v) for k, v in _empty_example(specs).items()},
          tf.constant(False),
          tf.constant(True),
      )
  )
  ds = ds.map(lambda example, valid: (example, valid, tf.constant(False)))
  ds = ds.concatenate(sentinel)
  shard = (
      ''
      if split_shard is None or split_shard.num_shards <= 1
      else f' (shard {split_shard.index} of {split_shard.num_shards})'
  )

  def fail(bad):
    counts = BAD_EXAMPLES.counts(manifest_path)
    raise ValueError(
        f'{of_task}all {int(bad)} records of manifest {manifest_path}{shard} are '
        f"bad examples, skipped with on_bad_example='skip' (by reason: {counts}); "
        'no example is left to train or evaluate on. The log names each one '
        '("skipping bad example at ...").'
    )

  def step(state, element):
    example, valid, end = element
    kept, bad = state
    ok = tf.cond(
        tf.logical_and(end, tf.logical_and(tf.equal(kept, 0), bad > 0)),
        lambda: tf.reshape(tf.numpy_function(fail, [bad], tf.bool, stateful=True), []),
        lambda: tf.constant(True),
    )
    with tf.control_dependencies([ok]):
      kept += tf.cast(valid, tf.int64)
      bad += tf.cast(tf.logical_not(tf.logical_or(valid, end)), tf.int64)
    return (kept, bad), (example, tf.logical_and(valid, tf.logical_not(end)))

  return ds.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), step)


# How a sharded source reads one split: `read_split(split, shard_info, shuffle, seed)` -> the
# examples of that split's shard (`shard_info` None: all of them), in a `seed`-ed random order
# when `shuffle`.
ReadSplit = Callable[[str, Optional[seqio.ShardInfo], bool, Optional[int]], tf.data.Dataset]


class ManifestDataSource(seqio.FunctionDataSource):
  """A seqio source whose reader also takes the shard (seqio's FunctionDataSource refuses
  shards), so each host reads only its records. `read_split` (`ReadSplit`) is asked only for
  the `splits` given; any other split raises naming them."""

  def __init__(
      self,
      read_split: ReadSplit,
      splits: Sequence[str],
      num_input_examples: Optional[Mapping[str, int]] = None,
  ):
    def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
      # seqio's own calling convention, for anything that calls FunctionDataSource's reader.
      return self.get_dataset(split, shuffle=shuffle_files, seed=seed)

    super().__init__(dataset_fn, splits=splits, num_input_examples=num_input_examples)
    self._read_split = read_split

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def get_dataset(
      self,
      split: str = 'train',
      shuffle: bool = True,
      seed: Optional[int] = None,
      shard_info: Optional[seqio.ShardInfo] = None,
      *,
      sequence_length=None,
      use_cached: bool = False,
      num_epochs: Optional[int] = 1,
  ) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    if split not in self.splits:
      raise ValueError(f'unknown split {split!r}; this source has {sorted(self.splits)}')
    return self._read_split(split, shard_info, shuffle, seed)


def seqio_source(
    config: ManifestConfig,
    vocabulary: Optional[vocabulary_lib.MultimodalVocabulary] = None,
    task_name: str = '',
) -> ManifestDataSource:
  """A seqio data source with one split per `config.split_paths()` entry."""
  paths = config.split_paths()

  def read_split(split, shard_info, shuffle, seed) -> tf.data.Dataset:
    return manifest_dataset(
        config,
        shard_info,
        manifest_path=paths[split],
        shuffle=shuffle,
        seed=seed,
        vocabulary=vocabulary,
        task_name=task_name,
    )

  return ManifestDataSource(read_split, splits=tuple(paths))


__all__ = [
    'BAD_EXAMPLES',
    'BadExampleCounter',
    'BadExampleError',
    'ManifestConfig',
    'ManifestDataSource',
    'ReadSplit',
    'UndecodableRecord',
    'feature_specs',
    'load_example',
    'manifest_dataset',
    'read_manifest',
    'seqio_source',
]
