"""Precomputed example features: TFRecord shards written by tools/precompute_features.py.

Decoding images, video and audio in tf.data through `tf.numpy_function` holds the GIL and runs
the media code of one process; for training at speed, `tools/precompute_features.py` runs
`manifest.load_example` over a whole manifest once with a Pool of processes and writes the
results here, and `precomputed_dataset` reads them back with nothing but TensorFlow ops.

A directory holds

  features.tfrecord-00000-of-0000N ... features.tfrecord-0000{N-1}-of-0000N
      `tf.train.Example`s, one per written example, each feature (`targets`, `loss_weights`,
      `<m>_features`, `audio_feature_mask`) one bytes value holding `tf.io.serialize_tensor` of
      the array: a TensorProto carries its own dtype and shape, so the variable item count
      needs no second shape feature that could disagree with the bytes, and `parse_tensor`
      refuses a wrong dtype. Its overhead is a few bytes per array.
  features.json
      format_version, the ManifestConfig fields used, the feature specs, the number of manifest
      records and of examples written, the bad examples skipped by reason, and every shard's
      file name, example count and byte size (checked on reading, so a truncated or swapped
      shard is caught before training starts).

The k-th written example (0-based, counting only examples that were written) is in shard
k % N. Reading the shards round-robin (`interleave` with cycle_length N, block_length 1) thus
gives back the manifest order exactly, and a host taking every k-th file (k divides N) gets
exactly the examples `ShardInfo(index, k)` gives over records.
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import seqio
import tensorflow as tf

from unimoe_jax.data import manifest as manifest_lib

FORMAT_VERSION = 1
METADATA_FILE = 'features.json'
SHARD_PREFIX = 'features.tfrecord'
SERIALIZATION = 'tf.io.serialize_tensor'
SHARD_ASSIGNMENT = 'round_robin'  # written example k -> shard k % num_shards
# ManifestConfig fields that change the features; the others (where the files were, the bad
# example policy) do not, so `expect_config` ignores them.
FEATURE_FIELDS = (
    'modalities',
    'voice_modality',
    'image_size',
    'image_mode',
    'video_frames',
    'n_mels',
    'speech_seconds',
    'audio_frames',
    'audio_max_chunks',
    'image_soft_tokens',
    'video_soft_tokens',
    'speech_soft_tokens',
    'audio_soft_tokens',
)
DEFAULT_PARALLEL_READS = 16
DEFAULT_SHUFFLE_BUFFER = 128  # examples of up to a few MB each (video, speech)


def shard_name(index: int, num_shards: int) -> str:
  return f'{SHARD_PREFIX}-{index:05d}-of-{num_shards:05d}'


# ----------------------------------------------------------------------------------------------
# Encoding (the writer's half of the format).


def specs_to_json(specs: Mapping[str, tf.TensorSpec]) -> Dict[str, Dict[str, Any]]:
  return {
      key: {'shape': spec.shape.as_list(), 'dtype': spec.dtype.name} for key, spec in specs.items()
  }


def encode_example(example: Mapping[str, np.ndarray], specs: Mapping[str, tf.TensorSpec]) -> bytes:
  """One `load_example` result -> a serialized `tf.train.Example` (features as TensorProtos).

  Raises:
    ValueError: naming the feature when the keys, a dtype or a shape disagree with `specs`.
  """
  if set(example) != set(specs):
    raise ValueError(f'example features {sorted(example)} != feature specs {sorted(specs)}')
  features = {}
  for key, spec in specs.items():
    value = np.asarray(example[key])
    if value.dtype != spec.dtype.as_numpy_dtype or not spec.shape.is_compatible_with(value.shape):
      raise ValueError(
          f'feature {key!r} is {value.dtype}{list(value.shape)}, the spec says '
          f'{spec.dtype.name}{spec.shape.as_list()}'
      )
    data = tf.io.serialize_tensor(value).numpy()
    features[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


# ----------------------------------------------------------------------------------------------
# Metadata.


@dataclasses.dataclass(frozen=True)
class PrecomputedInfo:
  """A checked features.json.

  Attributes:
    directory: where it is.
    config: the ManifestConfig the features were computed with.
    specs: `manifest.feature_specs(config)` (equal to the stored specs, checked).
    files: the shard paths in shard order.
    shard_examples: examples per shard.
    num_examples: examples written (the sum of `shard_examples`).
    bad_examples: reason -> manifest records skipped.
    metadata: the whole parsed features.json.
  """

  directory: str
  config: manifest_lib.ManifestConfig
  specs: Dict[str, tf.TensorSpec]
  files: Tuple[str, ...]
  shard_examples: Tuple[int, ...]
  num_examples: int
  bad_examples: Dict[str, int]
  metadata: Dict[str, Any]


def read_info(
    directory: str, expect_config: Optional[manifest_lib.ManifestConfig] = None
) -> PrecomputedInfo:
  """Reads and checks `directory`/features.json and that every shard it names is there whole.

  Args:
    directory: a folder written by tools/precompute_features.py.
    expect_config: when given, its FEATURE_FIELDS must equal the stored ones (e.g. a task
      configured for 336-pixel images must not read 224-pixel features).

  Raises:
    FileNotFoundError: the directory, features.json or a shard is missing (named).
    ValueError: features.json is malformed or disagrees with itself, the shards or
      `expect_config`; the message names the directory and the field.
  """

  def fail(detail):
    return ValueError(f'precomputed features in {directory}: {detail}')

  if not tf.io.gfile.isdir(directory):
    raise FileNotFoundError(
        f'precomputed features directory {directory} does not exist '
        '(write it with tools/precompute_features.py)'
    )
  path = os.path.join(directory, METADATA_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: {directory} is not a finished '
        'tools/precompute_features.py output'
    )
  try:
    with tf.io.gfile.GFile(path, 'r') as f:
      metadata = json.load(f)
  except json.JSONDecodeError as e:
    raise fail(f'{METADATA_FILE} is not valid JSON: {e}') from None
  if not isinstance(metadata, dict):
    raise fail(f'{METADATA_FILE} must hold an object')
  for field in (
      'format_version',
      'serialization',
      'shard_assignment',
      'config',
      'feature_specs',
      'num_examples',
      'shards',
  ):
    if field not in metadata:
      raise fail(f'{METADATA_FILE} has no field {field!r}')
  expected = {
      'format_version': FORMAT_VERSION,
      'serialization': SERIALIZATION,
      'shard_assignment': SHARD_ASSIGNMENT,
  }
  for field, value in expected.items():
    if metadata[field] != value:
      raise fail(
          f'{METADATA_FILE} field {field!r} is {metadata[field]!r}, this reader ' f'knows {value!r}'
      )

  stored = metadata['config']
  known = {f.name for f in dataclasses.fields(manifest_lib.ManifestConfig)}
  unknown = sorted(set(stored) - known) if isinstance(stored, dict) else None
  if unknown is None or unknown:
    raise fail(f'{METADATA_FILE} field "config" has fields {unknown} that ManifestConfig lacks')
  try:
    config = manifest_lib.ManifestConfig(**stored)
  except (TypeError, ValueError) as e:
    raise fail(f'{METADATA_FILE} field "config": {e}') from None
  specs = manifest_lib.feature_specs(config)
  stored_specs = metadata['feature_specs']
  want_specs = specs_to_json(specs)
  if not isinstance(stored_specs, dict) or set(stored_specs) != set(want_specs):
    raise fail(
        f'{METADATA_FILE} field "feature_specs" has features '
        f'{sorted(stored_specs) if isinstance(stored_specs, dict) else stored_specs}, '
        f'its config gives {sorted(want_specs)}'
    )
  for key, want in want_specs.items():
    if stored_specs[key] != want:
      raise fail(
          f'{METADATA_FILE} field "feature_specs.{key}" is {stored_specs[key]}, its '
          f'config gives {want}'
      )
  if expect_config is not None:
    for field in FEATURE_FIELDS:
      have, want = getattr(config, field), getattr(expect_config, field)
      if have != want:
        raise fail(
            f'ManifestConfig.{field} is {have!r} in {METADATA_FILE} but {want!r} is ' 'expected'
        )

  files, counts = [], []
  shards = metadata['shards']
  if not isinstance(shards, list) or not shards:
    raise fail(f'{METADATA_FILE} field "shards" must be a non-empty list')
  for index, shard in enumerate(shards):
    try:
      name, count, size = shard['file'], int(shard['num_examples']), int(shard['bytes'])
    except (TypeError, KeyError, ValueError):
      raise fail(
          f'{METADATA_FILE} field "shards[{index}]" must hold file, num_examples and '
          f'bytes, got {shard!r:.200}'
      ) from None
    if name != shard_name(index, len(shards)):
      raise fail(
          f'{METADATA_FILE} field "shards[{index}].file" is {name!r}, expected '
          f'{shard_name(index, len(shards))!r}'
      )
    file_path = os.path.join(directory, name)
    if not tf.io.gfile.exists(file_path):
      raise FileNotFoundError(
          f'precomputed features in {directory}: shard {file_path} '
          f'named in {METADATA_FILE} does not exist'
      )
    actual = tf.io.gfile.stat(file_path).length
    if actual != size:
      raise fail(
          f'shard {name} has {actual} bytes, {METADATA_FILE} field '
          f'"shards[{index}].bytes" says {size} (truncated or rewritten?)'
      )
    files.append(file_path)
    counts.append(count)
  if sum(counts) != metadata['num_examples']:
    raise fail(
        f'{METADATA_FILE} field "num_examples" is {metadata["num_examples"]}, the shards '
        f'hold {sum(counts)}'
    )
  return PrecomputedInfo(
      directory=directory,
      config=config,
      specs=specs,
      files=tuple(files),
      shard_examples=tuple(counts),
      num_examples=sum(counts),
      bad_examples=dict(metadata.get('bad_examples', {})),
      metadata=metadata,
  )


# ----------------------------------------------------------------------------------------------
# Reading.


def _parse_fn(specs: Mapping[str, tf.TensorSpec]):
  description = {key: tf.io.FixedLenFeature([], tf.string) for key in specs}

  def parse(record):
    serialized = tf.io.parse_single_example(record, description)
    return {
        key: tf.ensure_shape(tf.io.parse_tensor(serialized[key], spec.dtype), spec.shape)
        for key, spec in specs.items()
    }

  return parse


def _host_files(files: List[str], split_shard: Optional[seqio.ShardInfo]):
  """(files this host reads, the record-level shard still to apply or None).

  Files are split over hosts only when every host gets the same number (k divides the file
  count); round-robin writing makes that the same partition as sharding records. Otherwise
  every host reads all files and keeps every k-th example, so hosts stay balanced.
  """
  if split_shard is None or split_shard.num_shards <= 1:
    return files, None
  if len(files) % split_shard.num_shards == 0:
    return files[split_shard.index :: split_shard.num_shards], None
  return files, split_shard


def precomputed_dataset(
    directory: str,
    split_shard: Optional[seqio.ShardInfo] = None,
    shuffle: bool = False,
    seed: Optional[int] = None,
    *,
    expect_config: Optional[manifest_lib.ManifestConfig] = None,
    num_parallel_reads: int = DEFAULT_PARALLEL_READS,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
) -> tf.data.Dataset:
  """The examples of a precompute_features.py directory, with `manifest_dataset`'s element spec.

  Without shuffling the order is the manifest's (of the examples written); with split_shard it
  is the manifest order of the examples `manifest_dataset` would give that shard (when no
  record was skipped: skipped records shift the round-robin by one).

  Args:
    directory: written by tools/precompute_features.py.
    split_shard: this host's part: over files when the shard count divides the file count,
      else over examples.
    shuffle: shuffle the file order and then examples in a buffer of `shuffle_buffer_size`
      (examples are large, so the shuffle is local, unlike manifest_dataset's full shuffle of
      record indices; write more shards for a better one). Reshuffled each epoch.
    seed: for the shuffles.
    expect_config: see `read_info`.
    num_parallel_reads: threads reading files. All of the host's files are open at once (that
      keeps the order), each holding about one example in flight, so memory grows with the
      files per host times the example size.
    shuffle_buffer_size: examples held for shuffling.

  Returns:
    A dataset of {key: tensor} as `manifest.feature_specs(config)`.
  """
  info = read_info(directory, expect_config)
  files, record_shard = _host_files(list(info.files), split_shard)
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string))
  if shuffle:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  # cycle_length = all files and block_length 1 undo the round-robin writing; deterministic
  # keeps that order with parallel reads.
  ds = ds.interleave(
      tf.data.TFRecordDataset,
      cycle_length=len(files),
      block_length=1,
      num_parallel_calls=max(1, min(num_parallel_reads, len(files))),
      deterministic=True,
  )
  if record_shard is not None:
    ds = ds.shard(record_shard.num_shards, record_shard.index)
  if shuffle:
    ds = ds.shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
  return ds.map(_parse_fn(info.specs), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class PrecomputedDataSource(manifest_lib.ManifestDataSource):
  """`ManifestDataSource` whose split sizes come from features.json."""

  def __init__(
      self,
      read_split: manifest_lib.ReadSplit,
      splits: Mapping[str, str],
      expect_config: Optional[manifest_lib.ManifestConfig] = None,
  ):
    super().__init__(read_split, splits=tuple(splits))
    self._directories = dict(splits)
    self._expect_config = expect_config

  def num_input_examples(self, split: str) -> int:
    return read_info(self._directories[split], self._expect_config).num_examples


def precomputed_source(
    splits: Mapping[str, str],
    expect_config: Optional[manifest_lib.ManifestConfig] = None,
    **dataset_kwargs,
) -> PrecomputedDataSource:
  """A seqio data source: split name -> precompute_features.py directory, like `seqio_source`.

  Directories are checked when a split's dataset is built, so tasks can be registered on
  machines that do not hold the data. `dataset_kwargs` go to `precomputed_dataset`.
  """
  directories = dict(splits)

  def read_split(split, shard_info, shuffle, seed) -> tf.data.Dataset:
    return precomputed_dataset(
        directories[split],
        shard_info,
        shuffle=shuffle,
        seed=seed,
        expect_config=expect_config,
        **dataset_kwargs,
    )

  return PrecomputedDataSource(read_split, directories, expect_config)


__all__ = [
    'FEATURE_FIELDS',
    'METADATA_FILE',
    'PrecomputedDataSource',
    'PrecomputedInfo',
    'encode_example',
    'precomputed_dataset',
    'precomputed_source',
    'read_info',
    'shard_name',
    'specs_to_json',
]
