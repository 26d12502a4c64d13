"""Runs `manifest.load_example` over a manifest once and writes the features as TFRecord shards.

  python tools/precompute_features.py --manifest train.json --media_root /data/media \
      --vocab tokenizer.model --output /data/precomputed/train --num_shards 64 --workers 16 \
      --image_size 336 --gin_file my.gin --gin.ManifestConfig.voice_modality="'audio'"

Every ManifestConfig field (but path/splits: --manifest) is a flag of the same name
(--modalities takes a comma list); a flag that is not given keeps the gin binding
(--gin_file, --gin.BINDING) or the default. The examples are computed by a Pool of --workers
spawned processes (0: in this process), each with its own vocabulary, over chunks of records
(pool.imap in windows, so the manifest order is kept and at most a window of finished
examples waits in memory), and written in manifest order, the k-th example written to shard
k % num_shards (unimoe_jax/data/precomputed.py describes the format and reads it back).

on_bad_example='raise' stops at the first bad record with its BadExampleError (manifest line
and reason); 'skip' logs it and counts it by reason in features.json. Shards are written under
temporary names and renamed, and features.json written last, only when every record is done:
a failed run leaves no file under a final name (but also deletes nothing an earlier run left).
"""

import argparse
import collections
import dataclasses
import json
import multiprocessing
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import gin
import tensorflow as tf

from unimoe_jax.data import manifest as manifest_lib
from unimoe_jax.data import precomputed as precomputed_lib
from unimoe_jax.data import vocabulary as vocabulary_lib

CONFIG_FLAGS_SKIPPED = ('path', 'splits', 'vocab_path')  # --manifest, --vocab
CHUNKS_PER_WORKER_WINDOW = 16  # chunks per worker in flight before the parent catches up


# ----------------------------------------------------------------------------------------------
# Flags.


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
  """(flags, gin bindings from --gin.NAME=VALUE)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--manifest', required=True, help='JSON list or JSONL manifest')
  parser.add_argument(
      '--vocab', default=None, help='LLaMA tokenizer.model (ManifestConfig.vocab_path)'
  )
  parser.add_argument('--output', required=True, help='folder for the shards and features.json')
  parser.add_argument(
      '--num_shards',
      type=int,
      default=16,
      help='TFRecord files; a multiple of the reading hosts lets each read ' 'only its own files',
  )
  parser.add_argument(
      '--workers',
      type=int,
      default=os.cpu_count() or 1,
      help='spawned processes computing examples; 0 computes in this process',
  )
  parser.add_argument(
      '--chunksize',
      type=int,
      default=None,
      help='records per Pool task (default: 4, or fewer for small manifests)',
  )
  parser.add_argument(
      '--progress_every', type=float, default=10.0, help='seconds between progress lines'
  )
  parser.add_argument('--gin_file', action='append', default=[], help='gin file (repeatable)')
  defaults = manifest_lib.ManifestConfig(path='unused')
  for field in dataclasses.fields(manifest_lib.ManifestConfig):
    if field.name in CONFIG_FLAGS_SKIPPED:
      continue
    default = getattr(defaults, field.name)
    kind = int if isinstance(default, int) else str
    parser.add_argument(
        f'--{field.name}',
        type=kind,
        default=None,
        help=f'ManifestConfig.{field.name} (default: gin or {default!r})',
    )
  args, rest = parser.parse_known_args(argv)
  bindings, unknown = [], []
  for arg in rest:
    if arg.startswith('--gin.') and '=' in arg:
      bindings.append(arg[len('--gin.') :])
    else:
      unknown.append(arg)
  if unknown:
    parser.error(
        f'unrecognized arguments: {" ".join(unknown)} (gin bindings are ' '--gin.NAME=VALUE)'
    )
  if args.num_shards < 1 or args.workers < 0 or (args.chunksize is not None and args.chunksize < 1):
    parser.error('--num_shards and --chunksize must be >= 1, --workers >= 0')
  return args, bindings


def build_config(args: argparse.Namespace, bindings: Sequence[str]) -> manifest_lib.ManifestConfig:
  """The ManifestConfig of the flags given, gin bindings and defaults for the rest."""
  if args.gin_file or bindings:
    gin.parse_config_files_and_bindings(args.gin_file, bindings)
  overrides: Dict[str, Any] = {'path': args.manifest, 'splits': None}
  if args.vocab is not None:
    overrides['vocab_path'] = args.vocab
  for field in dataclasses.fields(manifest_lib.ManifestConfig):
    value = getattr(args, field.name, None)
    if field.name in CONFIG_FLAGS_SKIPPED or value is None:
      continue
    if field.name == 'modalities':
      value = tuple(m.strip() for m in value.split(',') if m.strip())
    overrides[field.name] = value
  return manifest_lib.ManifestConfig(**overrides)


# ----------------------------------------------------------------------------------------------
# Workers. Globals, because a Pool initializer is the only per-process hook.

_WORKER: Dict[str, Any] = {}


def _init_worker(config: manifest_lib.ManifestConfig, placeholder_ids: Dict[str, int]) -> None:
  # Many workers on one machine: one TF thread each is enough to serialize tensors.
  if multiprocessing.parent_process() is not None:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
  _WORKER['config'] = config
  _WORKER['vocabulary'] = vocabulary_lib.get_vocabulary(config.vocab_path, placeholder_ids)
  _WORKER['specs'] = manifest_lib.feature_specs(config)


def _compute(task: Tuple[Any, int, str]):
  """(raw record, number, location) -> ('ok', serialized Example) | ('bad', location, reason,
  detail) | ('error', location, traceback)."""
  raw, number, location = task
  try:
    example = manifest_lib.load_example(raw, number, _WORKER['config'], _WORKER['vocabulary'])
    return ('ok', precomputed_lib.encode_example(example, _WORKER['specs']))
  except manifest_lib.BadExampleError as e:
    return ('bad', e.location, e.reason, e.detail)
  except Exception:  # pylint: disable=broad-except
    return ('error', location, traceback.format_exc())


def _results(tasks: List[Tuple[Any, int, str]], workers: int, chunksize: int, init_args):
  """Yields `_compute` of every task, in order."""
  if workers == 0:
    _init_worker(*init_args)
    yield from map(_compute, tasks)
    return
  window = workers * chunksize * CHUNKS_PER_WORKER_WINDOW
  # spawn: TensorFlow's threads do not survive fork.
  with multiprocessing.get_context('spawn').Pool(workers, _init_worker, init_args) as pool:
    for start in range(0, len(tasks), window):
      yield from pool.imap(_compute, tasks[start : start + window], chunksize)


# ----------------------------------------------------------------------------------------------
# Writing.


class _ShardWriter:
  """N TFRecord files under temporary names; `commit` renames them, `abort` deletes them."""

  def __init__(self, directory: str, num_shards: int):
    self.directory = directory
    self.names = [precomputed_lib.shard_name(i, num_shards) for i in range(num_shards)]
    self.temp_paths = [os.path.join(directory, f'.{name}.tmp') for name in self.names]
    self.counts = [0] * num_shards
    self._writers = []
    for path in self.temp_paths:
      self._writers.append(tf.io.TFRecordWriter(path))

  def write(self, serialized: bytes) -> None:
    shard = sum(self.counts) % len(self.names)
    self._writers[shard].write(serialized)
    self.counts[shard] += 1

  def close(self) -> None:
    for writer in self._writers:
      writer.close()
    self._writers = []

  def abort(self) -> None:
    self.close()
    for path in self.temp_paths:
      if tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)

  def commit(self, metadata: Dict[str, Any]) -> Dict[str, Any]:
    """Renames the shards, drops shards of an earlier run with another count, writes
    features.json (a reader finding it finds complete shards); returns what it wrote."""
    self.close()
    metadata_path = os.path.join(self.directory, precomputed_lib.METADATA_FILE)
    if tf.io.gfile.exists(metadata_path):
      tf.io.gfile.remove(metadata_path)
    shards = []
    for name, temp, count in zip(self.names, self.temp_paths, self.counts):
      final = os.path.join(self.directory, name)
      tf.io.gfile.rename(temp, final, overwrite=True)
      shards.append({'file': name, 'num_examples': count, 'bytes': tf.io.gfile.stat(final).length})
    for stale in tf.io.gfile.glob(
        os.path.join(self.directory, precomputed_lib.SHARD_PREFIX + '-*')
    ):
      if os.path.basename(stale) not in self.names:
        tf.io.gfile.remove(stale)
    text = json.dumps({**metadata, 'shards': shards}, indent=1)
    temp_metadata = metadata_path + '.tmp'
    with tf.io.gfile.GFile(temp_metadata, 'w') as f:
      f.write(text)
    tf.io.gfile.rename(temp_metadata, metadata_path, overwrite=True)
    return json.loads(text)


def precompute(
    config: manifest_lib.ManifestConfig,
    output: str,
    num_shards: int = 16,
    workers: int = 0,
    chunksize: Optional[int] = None,
    progress_every: float = 10.0,
) -> Dict[str, Any]:
  """Writes the features of every record of `config.path` to `output`; returns features.json.

  Raises:
    manifest_lib.BadExampleError: the first bad record when config.on_bad_example == 'raise'.
    RuntimeError: a record failed in another way (its location and traceback in the message).
  """
  entries = manifest_lib.read_manifest(config.path)
  vocabulary = vocabulary_lib.get_vocabulary(config.vocab_path)
  if vocabulary.bos_id is None:  # loads the model: a bad path fails here, not in every record
    raise ValueError(f'{config.vocab_path} has no BOS piece')
  specs = manifest_lib.feature_specs(config)
  tasks = [(entry.raw, entry.number, entry.location) for entry in entries]
  if chunksize is None:
    chunksize = max(1, min(4, len(tasks) // max(1, 4 * workers)))
  tf.io.gfile.makedirs(output)
  bad = collections.Counter()
  writer = _ShardWriter(output, num_shards)
  start = last_print = time.perf_counter()
  done = 0
  results = _results(tasks, workers, chunksize, (config, vocabulary.placeholder_ids))
  try:
    for result in results:
      done += 1
      if result[0] == 'ok':
        writer.write(result[1])
      elif result[0] == 'bad':
        error = manifest_lib.BadExampleError(*result[1:])
        if config.on_bad_example == 'raise':
          raise error
        bad[error.reason] += 1
        total = manifest_lib.BAD_EXAMPLES.add(error.reason)
        logging.warning('skipping %s (%d bad examples so far)', error, total)
      else:
        raise RuntimeError(f'computing {result[1]} failed:\n{result[2]}')
      now = time.perf_counter()
      if now - last_print >= progress_every:
        last_print = now
        print(
            f'precompute: {done}/{len(tasks)} records, {sum(writer.counts)} written, '
            f'{sum(bad.values())} skipped, {done / (now - start):.1f} examples/s',
            flush=True,
        )
    elapsed = time.perf_counter() - start
    metadata = {
        'format_version': precomputed_lib.FORMAT_VERSION,
        'serialization': precomputed_lib.SERIALIZATION,
        'shard_assignment': precomputed_lib.SHARD_ASSIGNMENT,
        'manifest': config.path,
        'config': dataclasses.asdict(config),
        'placeholder_ids': vocabulary.placeholder_ids,
        'feature_specs': precomputed_lib.specs_to_json(specs),
        'num_records': len(tasks),
        'num_examples': sum(writer.counts),
        'bad_examples': dict(sorted(bad.items())),
        'workers': workers,
        'seconds': round(elapsed, 3),
    }
    metadata = writer.commit(metadata)
  except BaseException:
    results.close()  # terminates the Pool now, not when the generator is collected
    writer.abort()
    raise
  print(
      f'precompute: done: {len(tasks)} records, {metadata["num_examples"]} examples written '
      f'to {num_shards} shards in {output}, {sum(bad.values())} skipped {dict(bad)}, '
      f'{elapsed:.1f} s, {len(tasks) / max(elapsed, 1e-9):.1f} examples/s',
      flush=True,
  )
  return metadata


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args, bindings = parse_args(argv)
  config = build_config(args, bindings)
  return precompute(
      config,
      args.output,
      num_shards=args.num_shards,
      workers=args.workers,
      chunksize=args.chunksize,
      progress_every=args.progress_every,
  )


if __name__ == '__main__':
  try:
    main()
  except (manifest_lib.BadExampleError, RuntimeError) as e:
    print(f'precompute_features: {e}', file=sys.stderr)
    sys.exit(1)
