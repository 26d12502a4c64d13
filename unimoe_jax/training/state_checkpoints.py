"""Training checkpoints in `MODEL_DIR` with orbax: asynchronous, keep-last-N, resumable.

Layout:

    MODEL_DIR/checkpoints/<step>/state/   orbax PyTree of the whole TrainState (params,
                                          optimizer state of the trainable params, step)
    MODEL_DIR/checkpoints/<step>/input/process_<i>-of-<n>.{index,data-00000-of-00001}
                                          the tf.data iterator state of process i of n
                                          (`tf.train.Checkpoint`), after `step` batches
    MODEL_DIR/checkpoints/<step>/input/process_<i>-of-<n>.json
                                          what that state fits (task, lengths, batch, seed,
                                          element spec) and the number of batches read
    MODEL_DIR/config.gin                  the operative gin config of the run

The data position is the step. A resumed run restores its process's input iterator state
(`input_state`, `restore_input`) and continues the stream without recomputing a batch. When
there is none (a checkpoint written before input states existed, a pipeline tf.data cannot
save, such as `Dataset.from_generator`), or it was written by another number of processes,
the run logs why and skips `step` batches instead: the pipeline is deterministic (seeded
shuffle, ordered maps), so it sees exactly the batches an uninterrupted run would, at the cost
of decoding them again (training/loop.py, data/pipeline.py). A state that is corrupt or was
written by another pipeline (other task, lengths, batch size, seed ...) is an error naming
the file: resuming would otherwise silently change the data; delete `<step>/input` to resume
by skipping. Another process count is not an error: each process's state belongs to its
shard of the data, which changes with the count, so no state can be restored; skipping gives
each process `step` batches of its new shard (as many examples in all as were read), and a
job restarted on more or fewer hosts after a preemption resumes without a manual step.

The input state is an orbax item of the same step as the train state: each process writes
its own files into the step's temporary directory while `save` runs (synchronously: the
iterator moves on right after), and orbax renames the step directory into place only after
every process has finished writing all items. A step directory either holds both or does not
exist, so a crash cannot pair a train state with another step's data position.

Every process calls `save` and `restore`; orbax writes and reads each array's shards from the
process that holds them (multi-host checkpointing needs a directory all hosts can reach).
"""

import dataclasses
import glob
import os
import re
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
import orbax.checkpoint as ocp

from unimoe_jax.checkpoints import CHECKPOINTS_DIR, STATE_ITEM

INPUT_ITEM = 'input'


def input_state_name(process_index: int, process_count: int) -> str:
  return f'process_{process_index}-of-{process_count}'


class InputIteratorHandler(ocp.CheckpointHandler):
  """Orbax handler of the input item: this process's input iterator state, written by the
  iterator itself (`iterator.save(prefix)`, data/iteration.CheckpointableIterator), under
  `input_state_name(process_index, process_count)`. Synchronous, so the state is the one of
  the step being saved. Restoring goes through `CheckpointManager.restore_input`."""

  def save(self, directory, args: 'InputIteratorSave'):
    prefix = os.path.join(
        os.fspath(directory), input_state_name(jax.process_index(), jax.process_count())
    )
    args.iterator.save(prefix)

  def restore(self, directory, args: 'InputIteratorRestore'):
    """Restores `args.iterator` in place (the loop uses `CheckpointManager.input_state` and
    `restore_input`, which also fall back to skipping and check the step)."""
    args.iterator.restore(
        os.path.join(
            os.fspath(directory), input_state_name(jax.process_index(), jax.process_count())
        )
    )
    return args.iterator

  def metadata(self, directory):
    del directory
    return None

  def finalize(self, directory):
    del directory

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f'{cls.__module__}.{cls.__qualname__}'


@ocp.args.register_with_handler(InputIteratorHandler, for_save=True)
@dataclasses.dataclass
class InputIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any  # has save(prefix): data/iteration.CheckpointableIterator


@ocp.args.register_with_handler(InputIteratorHandler, for_restore=True)
@dataclasses.dataclass
class InputIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any  # has restore(prefix)


UNREADABLE_DIR = 'unreadable_checkpoints'  # Beside CHECKPOINTS_DIR in MODEL_DIR.


class CheckpointUnreadableError(RuntimeError):
  """No checkpoint step of a MODEL_DIR can be read."""


class CheckpointMismatchError(ValueError):
  """A checkpoint holds other parameters (or shapes) than the model restoring it."""


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else '')[:limit]


def _saved_arrays(state_dir: str) -> Dict[str, Tuple[int, ...]]:
  """`{'params.decoder.layers_0....': shape}` of an orbax PyTree item, read from its
  metadata only (no array)."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f'{state_dir} does not exist')
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
  tree = metadata.tree if hasattr(metadata, 'tree') else metadata
  arrays = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    if hasattr(leaf, 'shape') and hasattr(leaf, 'name'):
      arrays[leaf.name] = tuple(leaf.shape)
  if not arrays:
    raise ValueError(f'{state_dir}: the metadata names no array')
  return arrays


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def check_same_arrays(saved: Dict[str, Tuple[int, ...]], abstract_state, step_dir: str) -> None:
  """CheckpointMismatchError naming the parameters whose presence or shape differs between
  a checkpoint (`_saved_arrays`) and the state a model would restore into it."""
  wanted = {
      '.'.join(_key_name(k) for k in path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
      if hasattr(leaf, 'shape')
  }
  only_saved = sorted(set(saved) - set(wanted))
  only_model = sorted(set(wanted) - set(saved))
  reshaped = sorted(n for n in set(saved) & set(wanted) if saved[n] != wanted[n])
  if not (only_saved or only_model or reshaped):
    return
  lines = [f'{n}: {saved[n]} in the checkpoint, {wanted[n]} in the model' for n in reshaped[:10]]
  if only_model:
    lines.append(f'in the model only ({len(only_model)}): ' + ', '.join(only_model[:10]))
  if only_saved:
    lines.append(f'in the checkpoint only ({len(only_saved)}): ' + ', '.join(only_saved[:10]))
  raise CheckpointMismatchError(
      f'{step_dir} was written for another model or optimizer: '
      + '; '.join(lines)
      + '. MODEL_DIR resumes the run it holds; to train a changed model, '
      'use a new MODEL_DIR (and INITIAL_CHECKPOINT_PATH to start from these params)'
  )


def _skip_hint(problem: str, step: int, input_dir: str) -> str:
  return (
      f'{problem}. To resume from step {step} by skipping {step} batches instead (the same '
      f'batches if the pipeline is unchanged, decoded again), delete {input_dir}'
  )


class CheckpointManager:
  """A thin wrapper over `orbax.checkpoint.CheckpointManager` for one TrainState."""

  def __init__(self, model_dir: str, max_to_keep: Optional[int] = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(model_dir), CHECKPOINTS_DIR)
    # cleanup_tmp_directories: a save cut short (SIGKILL, a lost host) leaves a temporary
    # `<step>.orbax-checkpoint-tmp-*` directory that no restore reads; it is deleted.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE_ITEM, INPUT_ITEM)
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return self._manager.all_steps()

  def save(self, step: int, state, input_iterator=None, force: bool = False) -> bool:
    """Starts an (asynchronous) save of `state` at `step`, with the state of `input_iterator`
    (written before this returns) when given; True when one was started. Every process must
    pass an input iterator or none."""
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if input_iterator is not None:
      items[INPUT_ITEM] = InputIteratorSave(input_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state):
    """The state saved at `step`, placed like `abstract_state` (ShapeDtypeStructs with
    shardings, from `create_train_state(..., abstract_only=True)`)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)})
    )
    return restored[STATE_ITEM]

  def restore_latest(self, abstract_state) -> Tuple[Optional[int], Any]:
    """`(step, state)` of the newest checkpoint that restores, or `(None, None)` when there
    is none.

    A step whose files cannot be read (truncated, metadata deleted, a half-written copy) is
    skipped with a warning naming it and the error, moved to `MODEL_DIR/unreadable_checkpoints/`
    (kept for inspection; its step can then be saved again), and the previous step is tried:
    a run killed while the disk filled up or a file system lost a write resumes from what
    survived. A readable checkpoint of another model is not skipped (older steps would hold the
    same model): `CheckpointMismatchError` names the parameters that differ. When every step is
    unreadable the error lists them all, and nothing is moved.
    """
    skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      step_dir = os.path.join(self.directory, str(step))
      problem = None
      try:
        saved = _saved_arrays(os.path.join(step_dir, STATE_ITEM))
      except Exception as e:  # pylint: disable=broad-except
        problem = f'its metadata cannot be read ({type(e).__name__}: {_first_line(e)})'
      if problem is None:
        check_same_arrays(saved, abstract_state, step_dir)
        try:
          state = self.restore(step, abstract_state)
        except Exception as e:  # pylint: disable=broad-except
          problem = f'its arrays cannot be read ({type(e).__name__}: {_first_line(e)})'
      if problem is not None:
        logging.warning(
            'Checkpoint %s is unreadable: %s; trying the previous step', step_dir, problem
        )
        skipped.append((step, step_dir, problem))
        continue
      if skipped:
        self._set_aside(skipped)
        logging.warning(
            'Resuming from step %d, the newest readable checkpoint; skipped %s',
            step,
            '; '.join(f'step {s} ({p})' for s, _, p in skipped),
        )
      return step, state
    if skipped:
      raise CheckpointUnreadableError(
          f'no checkpoint in {self.directory} can be read: '
          + '; '.join(f'{d}: {p}' for _, d, p in skipped)
          + '. Move the directory aside to start from INITIAL_CHECKPOINT_PATH or from scratch'
      )
    return None, None

  def _set_aside(self, skipped) -> None:
    """Moves unreadable step directories out of orbax's sight (process 0; every process
    waits for it), so that their steps can be saved again."""
    aside = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step, step_dir, _ in skipped:
        target = os.path.join(aside, str(step))
        n = 1
        while os.path.exists(target):
          target, n = os.path.join(aside, f'{step}.{n}'), n + 1
        os.rename(step_dir, target)
        logging.warning('Moved the unreadable checkpoint %s to %s', step_dir, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices('unimoe_jax: unreadable checkpoints set aside')
    self._manager.reload()

  def input_state(self, step: int) -> Optional[str]:
    """The prefix of this process's input iterator state saved at `step`, or None when there
    is none to restore (logged: the caller then skips `step` batches). Raises, naming the
    file, when the state's description is unreadable."""
    from unimoe_jax.data import iteration  # pylint: disable=g-import-not-at-top

    input_dir = os.path.join(self.directory, str(step), INPUT_ITEM)
    index, count = jax.process_index(), jax.process_count()
    prefix = os.path.join(input_dir, input_state_name(index, count))
    if os.path.exists(prefix + iteration.INFO_SUFFIX):
      problem = None
      try:
        info = iteration.read_info(prefix)
      except iteration.IteratorStateError as e:
        problem = str(e)
      if problem is not None:
        raise iteration.IteratorStateError(_skip_hint(problem, step, input_dir))
      if info.get('tf_state'):
        return prefix
      logging.warning(
          'Checkpoint step %d holds no input iterator state (%s: the input '
          'pipeline could not be checkpointed: %s); resuming the data stream by '
          'skipping %d batches',
          step,
          prefix + iteration.INFO_SUFFIX,
          info.get('not_checkpointable'),
          step,
      )
      return None
    if not os.path.isdir(input_dir):
      logging.info(
          'Checkpoint step %d has no input iterator state (%s does not exist: a '
          'checkpoint written without one); resuming the data stream by skipping %d '
          'batches',
          step,
          input_dir,
          step,
      )
      return None
    counts = sorted(
        {
            int(m.group(1))
            for m in (
                re.search(r'-of-(\d+)\.json$', p)
                for p in glob.glob(os.path.join(input_dir, 'process_*-of-*.json'))
            )
            if m
        }
    )
    if counts and count not in counts:
      logging.warning(
          'The input iterator states of checkpoint step %d were written by %s '
          'processes (%s), this run has %d: the data shards differ, so they '
          'cannot be restored; resuming by skipping %d batches per process (the '
          'same number of examples in all, not the same ones)',
          step,
          ' or '.join(map(str, counts)),
          input_dir,
          count,
          step,
      )
    else:
      logging.warning(
          'Checkpoint step %d has no input iterator state for process %d of %d '
          '(%s); resuming the data stream by skipping %d batches',
          step,
          index,
          count,
          prefix + iteration.INFO_SUFFIX,
          step,
      )
    return None

  def restore_input(self, step: int, prefix: str, iterator) -> None:
    """Restores `iterator` (a fresh `pipeline.train_batches` stream) from `prefix`
    (`input_state(step)`); raises `IteratorStateError` naming the file when the state is
    corrupt, was written by another pipeline, or is not at `step` batches."""
    from unimoe_jax.data import iteration  # pylint: disable=g-import-not-at-top

    problem = None
    try:
      iterator.restore(prefix)
    except iteration.IteratorStateError as e:
      problem = str(e)
    if problem is None and iterator.position != step:
      problem = (
          f'{prefix}{iteration.INFO_SUFFIX}: the input iterator had read '
          f'{iterator.position} batches, but the train state is at step {step}'
      )
    if problem is not None:
      iterator.close()
      raise iteration.IteratorStateError(_skip_hint(problem, step, os.path.dirname(prefix)))
    logging.info(
        'Restored the input iterator of step %d from %s: the data stream continues '
        'after %d batches without recomputing them',
        step,
        prefix,
        step,
    )

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
