"""Reading tf.data datasets so that a pipeline error can end the process.

`numpy_iterator(ds)` is `ds.as_numpy_iterator()`, except for what happens when the pipeline
fails (a bad example in raise mode, nothing that fits): the error is re-raised as a fresh
exception of the same type and message, after the tf.data iterator is deleted.

Why: an error raised straight out of `next()` keeps the iterator alive through its traceback.
When that error ends the program, the iterator is destroyed at interpreter exit with the
interpreter lock held, while its parallel maps wait for in-flight `tf.numpy_function` calls
(media loading) that need that lock: the process never exits. Seen with
`python -m unimoe_jax.train` on a manifest with a missing file (2 runs of 3 hung) and with
t5x.train on lengths that fit nothing (3 runs of 5).

`CheckpointableIterator(ds)` reads the same way and can also save and restore its position
(the training stream, `pipeline.train_batches`: the train-state checkpoints hold it, so a
resumed run does not recompute the batches it had read).
"""

import json
import os
import re
from typing import Any, Dict, Iterator, Mapping, Optional

from absl import logging
import tensorflow as tf


def _fresh(error: tf.errors.OpError) -> tf.errors.OpError:
  """A new exception like `error` that holds no traceback (and so no iterator)."""
  try:
    return type(error)(error.node_def, error.op, error.message)
  except TypeError:  # The base OpError also takes the error code.
    return tf.errors.OpError(error.node_def, error.op, error.message, error.error_code)


def numpy_iterator(ds: tf.data.Dataset) -> Iterator[Any]:
  """`ds`'s elements as numpy; a pipeline error is raised once the iterator is gone."""
  iterator = ds.as_numpy_iterator()
  error = None
  try:
    while True:
      try:
        element = next(iterator)
      except StopIteration:
        return
      except tf.errors.OpError as e:
        error = _fresh(e)
        break
      yield element
  finally:
    del iterator
  raise error


# ---- a training stream whose position can be checkpointed -----------------------------------

INFO_SUFFIX = '.json'
INFO_FORMAT = 1


class IteratorStateError(ValueError):
  """An input iterator state that cannot be restored (corrupt, or written by another
  pipeline); the message names the file."""


def _op_message(error: tf.errors.OpError) -> str:
  """A tf error's message without the `{{function_node ...}}` prefix and `[Op:...]` tail."""
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', error.message)
  return re.sub(r'\s*\[Op:[^\]]*\].*$', '', text, flags=re.S).strip()


def read_info(prefix: str) -> Dict[str, Any]:
  """The JSON written beside an iterator state (`prefix + '.json'`); IteratorStateError names
  the file when it cannot be read."""
  path = prefix + INFO_SUFFIX
  try:
    with tf.io.gfile.GFile(path, 'r') as f:
      info = json.load(f)
    if not isinstance(info, dict) or info.get('format') != INFO_FORMAT:
      raise ValueError(f'expected a JSON object with "format": {INFO_FORMAT}')
  except Exception as e:  # pylint: disable=broad-except
    problem = f'{type(e).__name__}: {e}'
  else:
    return info
  raise IteratorStateError(f'{path}: unreadable input iterator description ({problem})')


class CheckpointableIterator:
  """`numpy_iterator(ds)` as an object whose position can be saved and restored.

  Iterates `ds` as numpy (read-only arrays, as `ds.as_numpy_iterator()`), with the same error
  discipline as `numpy_iterator`: a pipeline error is re-raised as a fresh exception of the
  same type and message after the tf.data iterator is dropped (this object then ends), so no
  traceback keeps the iterator alive until interpreter exit.

  `save(prefix)` writes the tf.data iterator state with `tf.train.Checkpoint` (`prefix.index`,
  `prefix.data-00000-of-00001`) and `prefix.json` (this class's description of the pipeline
  and the number of elements read); `restore(prefix)` reads them into a fresh iterator of the
  same pipeline, which then continues exactly where the saved one was, without recomputing
  the elements before it. What the state holds: every buffer of the pipeline (shuffle
  buffers, prefetched and in-flight elements, the open row of a packing `scan`, batches in
  progress) plus the cursors and random states, so its size is that of the buffered elements,
  not of the data set. The pipeline decides what can be saved: `tf.data.Options
  .experimental_external_state_policy` says what to do with the state of Python functions
  (`pipeline.train_batches` sets IGNORE and says why), and a source whose state lives in
  Python (`Dataset.from_generator`) cannot be saved at all; then `save` writes only the JSON,
  saying why, logs a warning once and returns False (a resume skips elements instead).

  Args:
    ds: the dataset.
    description: JSON-serialisable facts that must be equal for a saved state to fit this
      pipeline (task, lengths, batch size, seed, element spec ...); `restore` compares them.
    position: elements already consumed before `ds` (a `ds.skip(position)` by the caller).
  """

  def __init__(
      self, ds: tf.data.Dataset, description: Optional[Mapping[str, Any]] = None, position: int = 0
  ):
    self._iterator = ds.as_numpy_iterator()
    # JSON round trip: tuples become lists, keys strings, as they come back from the file.
    self.description = json.loads(json.dumps(dict(description or {}), sort_keys=True))
    self.position = int(position)
    self._not_checkpointable: Optional[str] = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._iterator is None:
      raise StopIteration
    error = None
    try:
      element = next(self._iterator)
    except StopIteration:
      error = StopIteration()
    except tf.errors.OpError as e:
      error = _fresh(e)
    else:
      self.position += 1
      return element
    # Outside the except clauses: the original exception (and its traceback, which holds the
    # iterator) is gone; dropping our reference destroys the tf.data iterator now.
    self._iterator = None
    raise error

  def close(self) -> None:
    """Destroys the tf.data iterator now (the object then ends)."""
    self._iterator = None

  def save(self, prefix: str) -> bool:
    """Writes the state under `prefix`; False (and only `prefix.json`, with the reason) when
    the pipeline cannot be checkpointed."""
    if self._iterator is None:
      raise ValueError(f'cannot save the input iterator to {prefix}: it has ended or failed')
    if self._not_checkpointable is None:
      reason = None
      try:
        tf.train.Checkpoint(iterator=self._iterator).write(prefix)
      except tf.errors.OpError as e:
        # Unimplemented: a dataset that cannot be saved (from_generator);
        # FailedPrecondition: external state under a FAIL policy. Training goes on, and a
        # resumed run skips.
        reason = f'{type(e).__name__}: {_op_message(e)}'
      if reason is not None:
        self._not_checkpointable = reason
        logging.warning(
            'The input pipeline cannot be checkpointed (%s): checkpoints hold no '
            'input iterator state, and a resumed run will skip the batches it had '
            'read instead of restoring its position',
            reason,
        )
    info = {
        'format': INFO_FORMAT,
        'batches_read': self.position,
        'tf_state': self._not_checkpointable is None,
        'not_checkpointable': self._not_checkpointable,
        'description': self.description,
    }
    with tf.io.gfile.GFile(prefix + INFO_SUFFIX, 'w') as f:
      json.dump(info, f, indent=1, sort_keys=True)
    return info['tf_state']

  def restore(self, prefix: str) -> None:
    """Continues from the state saved under `prefix`; IteratorStateError naming the file when
    it was written by another pipeline or cannot be read (after a failed tf.data restore this
    iterator is dropped: it ends)."""
    if self._iterator is None:
      raise ValueError(f'cannot restore {prefix} into an iterator that has ended or failed')
    info = read_info(prefix)
    info_path = prefix + INFO_SUFFIX
    if not info.get('tf_state'):
      raise IteratorStateError(
          f'{info_path}: holds no tf.data iterator state (the pipeline '
          f'could not be checkpointed: {info.get("not_checkpointable")})'
      )
    saved = info.get('description', {})
    differ = sorted(
        k for k in set(saved) | set(self.description) if saved.get(k) != self.description.get(k)
    )
    if differ:
      raise IteratorStateError(
          f'{info_path}: the input iterator state was written by another input pipeline: '
          + '; '.join(f'{k} was {saved.get(k)!r}, now {self.description.get(k)!r}' for k in differ)
      )
    problem = None
    try:
      tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()
    except Exception as e:  # pylint: disable=broad-except
      problem = (
          f'{type(e).__name__}: ' f'{_op_message(e) if isinstance(e, tf.errors.OpError) else e}'
      )
    if problem is None:
      self.position = int(info['batches_read'])
      return
    self._iterator = None  # Restoring may have started its threads: destroy it now.
    raise IteratorStateError(
        f'{prefix}.index: cannot restore the tf.data iterator state from '
        f'it and {os.path.basename(prefix)}.data-*: {problem}; the files '
        'are corrupt or incomplete'
    )
