"""Batches for the training and evaluation loops, from a seqio task or mixture.

The training stream is deterministic for a given seed (seqio's seeded shuffle, ordered maps),
repeats forever, and is sharded by process (`seqio.ShardInfo(process_index, process_count)`),
so each host reads only its own examples. It is an `iteration.CheckpointableIterator`: the
training checkpoints hold its tf.data iterator state (training/state_checkpoints.py), and a resumed
run restores it and decodes no example it had already read. Without that state (a checkpoint
from before it existed, a pipeline that cannot be checkpointed, a different process count) a
resumed run reaches the same position by skipping the batches it had consumed, which runs
media decoding and packing again for every skipped batch.

What the iterator state holds and costs. `tf.data` saves every buffer of the pipeline: the
per-task shuffle buffers (`tasks/common.py` SHUFFLE_BUFFER_SIZE decoded examples per task,
seqio's default of 1,000 for other tasks), the manifest's index shuffle buffer (8 bytes per
record), prefetched batches (2 here, plus seqio's per-task prefetch), finished but unread
outputs of the parallel maps, the packer's open row, and the random states. So its size is
that of the decoded examples in flight, per process and per checkpoint: megabytes for the
demo, hundreds of MB with 336 px images or Whisper windows (docs/benchmarks.md, "Numbers the
code's comments rely on"); saving it blocks the training loop for about a second. A
small source that seqio caches in memory (a task that declares `num_input_examples` below
seqio's in-memory caching limit) puts the whole cache into the state.

External state (`tf.data.Options.experimental_external_state_policy`): IGNORE. Under the
default policy tf.data refuses to save this pipeline at all (TF 2.21: FailedPreconditionError
"PyFunc is stateful", from the feature converter's `filter_failing_fast` drop record). The
Python functions of this pipeline either are pure functions of their inputs (media loading:
`tf.numpy_function(..., stateful=False)`, not external state at all) or only log and count
(drop_too_long's and the feature converter's drop records, the bad-example counter); their
Python counters restart from zero after a restore, while everything that decides which
example comes next (indices, shuffle buffers and seeds, the packer's and the fail-fast
guard's `scan` states, the mixture's sampler) is tf.data state and is saved. A source whose
state lives in Python (`Dataset.from_generator`) cannot be saved under any policy: tf.data
raises, and the checkpoints then hold no input state (a warning says so once).
"""

import importlib
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
import numpy as np
import seqio
import tensorflow as tf

from unimoe_jax.data import iteration
from unimoe_jax.data.feature_converter import ITEM_RANK, MultimodalDecoderFeatureConverter


def import_task_modules(modules: Sequence[str]) -> None:
  """Imports the modules that register tasks (t5x's MIXTURE_OR_TASK_MODULE)."""
  for module in modules:
    if module:
      importlib.import_module(module)


def modalities_of(task_feature_lengths: Mapping[str, int]) -> Tuple[str, ...]:
  """Modalities named in TASK_FEATURE_LENGTHS (`image_features: 1` ...), in canonical order."""
  unknown = [
      k
      for k in task_feature_lengths
      if k not in ('targets',)
      and not (k.endswith('_features') and k[: -len('_features')] in ITEM_RANK)
  ]
  if unknown:
    raise ValueError(
        f'TASK_FEATURE_LENGTHS: unknown features {unknown}; expected targets and '
        f'<m>_features for m in {tuple(ITEM_RANK)}'
    )
  if 'targets' not in task_feature_lengths:
    raise ValueError('TASK_FEATURE_LENGTHS needs a "targets" length')
  return tuple(m for m in ITEM_RANK if f'{m}_features' in task_feature_lengths)


def get_mixture_or_task(name: str):
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise ValueError(
        f'MIXTURE_OR_TASK_NAME={name!r} is not a registered seqio task or '
        f'mixture (is MIXTURE_OR_TASK_MODULE imported?): {e}'
    ) from e


def feature_converter(
    task_feature_lengths: Mapping[str, int], pack: bool
) -> MultimodalDecoderFeatureConverter:
  return MultimodalDecoderFeatureConverter(
      pack=pack, modalities=modalities_of(task_feature_lengths)
  )


def check_examples_fit(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str = 'train',
    sample: int = 32,
) -> None:
  """Raises ValueError when none of the first `sample` examples of some task fits
  TASK_FEATURE_LENGTHS: every example would be dropped and training would wait forever."""
  task_or_mixture = get_mixture_or_task(mixture_or_task_name)
  for task in getattr(task_or_mixture, 'tasks', [task_or_mixture]):
    if split not in task.splits:
      continue
    ds = task.get_dataset(
        sequence_length=None,
        split=split,
        shuffle=False,
        trim_output_features=False,
        use_cached=False,
    )
    lengths, fits = [], 0
    for ex in iteration.numpy_iterator(ds.take(sample)):
      ok = len(ex['targets']) <= task_feature_lengths['targets']
      for key, limit in task_feature_lengths.items():
        if key != 'targets' and key in ex:
          ok = ok and len(ex[key]) <= limit
      lengths.append(len(ex['targets']))
      fits += ok
    if lengths and not fits:
      raise ValueError(
          f'TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} fits none of the first '
          f'{len(lengths)} examples of task {task.name} (split {split}): their targets have '
          f'{min(lengths)}-{max(lengths)} tokens (media placeholders expanded); raise '
          f'TASK_FEATURE_LENGTHS["targets"] or the item counts'
      )


def train_batches(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    global_batch_size: int,
    *,
    split: str = 'train',
    seed: int = 0,
    shuffle: bool = True,
    pack: bool = True,
    use_cached: bool = False,
    skip_batches: int = 0,
) -> iteration.CheckpointableIterator:
  """This process's share of each global batch, forever, as numpy dicts.

  Rows `[global_batch_size // process_count, ...]`; `skip_batches` resumes mid-stream by
  recomputing and dropping that many batches (when there is no iterator state to restore:
  `CheckpointableIterator.restore` continues a saved stream without recomputing it).
  """
  count, index = jax.process_count(), jax.process_index()
  if global_batch_size % count:
    raise ValueError(f'BATCH_SIZE={global_batch_size} is not divisible by the {count} processes')
  check_examples_fit(mixture_or_task_name, task_feature_lengths, split)
  ds = seqio.get_dataset(
      mixture_or_task_name,
      task_feature_lengths=dict(task_feature_lengths),
      feature_converter=feature_converter(task_feature_lengths, pack),
      dataset_split=split,
      use_cached=use_cached,
      shuffle=shuffle,
      num_epochs=None,
      shard_info=seqio.ShardInfo(index=index, num_shards=count),
      seed=seed,
      trim_output_features=False,
      verbose=False,
  )
  ds = ds.batch(global_batch_size // count, drop_remainder=True)
  if skip_batches:
    logging.info('Skipping %d batches to resume the data stream', skip_batches)
    ds = ds.skip(skip_batches)
  options = tf.data.Options()
  options.deterministic = True
  # Why IGNORE is safe for this pipeline: the module docstring.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  ds = ds.with_options(options).prefetch(2)
  # What a saved iterator state must agree on to be restored into this pipeline (tf.data
  # itself would restore, e.g., the buffered batches of another batch size without a word).
  description = {
      'mixture_or_task_name': mixture_or_task_name,
      'split': split,
      'task_feature_lengths': dict(task_feature_lengths),
      'global_batch_size': global_batch_size,
      'process_index': index,
      'process_count': count,
      'seed': seed,
      'shuffle': shuffle,
      'pack': pack,
      'use_cached': use_cached,
      'element_spec': repr(ds.element_spec),
  }
  return iteration.CheckpointableIterator(ds, description, position=skip_batches)


def batched_with_padding(
    ds: tf.data.Dataset, batch_size: int
) -> Iterator[Tuple[Dict[str, np.ndarray], int]]:
  """Fixed-size batches of a finite dataset; the last is padded with copies of its first row.

  Yields `(batch, num_real_rows)` so that every batch has one shape (one compilation).
  """
  for batch in iteration.numpy_iterator(ds.batch(batch_size)):
    n = len(next(iter(batch.values())))
    if n < batch_size:
      batch = {
          k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)]) for k, v in batch.items()
      }
    yield batch, n


class FirstPass:
  """One unshuffled epoch of a mixture's model features, unbatched: their shapes and dtypes
  (from the converter's element spec, nothing read) and the first row (reads only the examples
  that row holds). One `seqio.get_dataset` call serves both."""

  def __init__(
      self,
      mixture_or_task_name: str,
      task_feature_lengths: Mapping[str, int],
      pack: bool = True,
      split: str = 'train',
  ):
    self.dataset = seqio.get_dataset(
        mixture_or_task_name,
        task_feature_lengths=dict(task_feature_lengths),
        feature_converter=feature_converter(task_feature_lengths, pack),
        dataset_split=split,
        shuffle=False,
        num_epochs=1,
        trim_output_features=False,
        verbose=False,
    )

  def batch_specs(
      self, global_batch_size: int
  ) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, np.dtype]]:
    """Global shapes `(global_batch_size, ...)` and numpy dtypes of the model features."""
    spec = self.dataset.element_spec
    shapes = {k: (global_batch_size,) + tuple(v.shape) for k, v in spec.items()}
    return shapes, {k: v.dtype.as_numpy_dtype for k, v in spec.items()}

  def first_row(self) -> Optional[Dict[str, np.ndarray]]:
    """The first row as a batch of one (`[1, ...]` each), None when the split yields nothing:
    what the loops check against the model before any compute."""
    for row in iteration.numpy_iterator(self.dataset.take(1).batch(1)):
      return row
    return None
