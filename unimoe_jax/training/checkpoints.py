"""Training checkpoints in `MODEL_DIR` with orbax: asynchronous, keep-last-N, resumable.

Layout:

    MODEL_DIR/checkpoints/<step>/state/   orbax PyTree of the whole TrainState (params,
                                          optimizer state of the trainable params, step)
    MODEL_DIR/config.gin                  the operative gin config of the run

The data position is the step: the input pipeline is deterministic (seeded shuffle, ordered
maps), and a resumed run skips `step` batches, so it sees exactly the batches an uninterrupted
run would (training/loop.py).

Every process calls `save` and `restore`; orbax writes and reads each array's shards from the
process that holds them (multi-host checkpointing needs a directory all hosts can reach).
"""

import os
from typing import Any, Dict, Optional, Tuple

import orbax.checkpoint as ocp

from unimoe_jax import checkpoint as model_checkpoint

CHECKPOINTS_DIR = 'checkpoints'
STATE_ITEM = 'state'


class CheckpointManager:
  """A thin wrapper over `orbax.checkpoint.CheckpointManager` for one TrainState."""

  def __init__(self, model_dir: str, max_to_keep: Optional[int] = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(model_dir), CHECKPOINTS_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE_ITEM,))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return self._manager.all_steps()

  def save(self, step: int, state, force: bool = False) -> bool:
    """Starts an (asynchronous) save of `state` at `step`; True when one was started."""
    return self._manager.save(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state)}), force=force)

  def restore(self, step: int, abstract_state):
    """The state saved at `step`, placed like `abstract_state` (ShapeDtypeStructs with
    shardings, from `create_train_state(..., abstract_only=True)`)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE_ITEM]

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def locate(path: Optional[str], macro: str = 'INITIAL_CHECKPOINT_PATH'
           ) -> Tuple[str, Optional[int]]:
  """The directory `read_params` reads for `path`, and its training step.

  Returns `(converted_dir, None)` for a converted / exported checkpoint (`params/`), or
  `(step_dir, step)` for a training checkpoint: `path` itself when it is one step directory,
  else the latest step of `path/checkpoints` or `path`. Reads no array, so a wrong path fails at
  once; errors name `macro`.
  """
  if not path:
    raise FileNotFoundError(f'{macro} is not set: name a converted checkpoint, a MODEL_DIR or '
                            'one of its step directories')
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{macro}={path} does not exist')
  if os.path.isdir(os.path.join(path, model_checkpoint.PARAMS_DIR)):
    return path, None
  if os.path.isdir(os.path.join(path, STATE_ITEM)):
    name = os.path.basename(path)
    return path, int(name) if name.isdigit() else None
  root = path
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    root = os.path.join(path, CHECKPOINTS_DIR)
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()
                 and os.path.isdir(os.path.join(root, d, STATE_ITEM)))
  if not steps:
    raise FileNotFoundError(
        f'{macro}={path} holds no checkpoint: expected params/ + config.gin (a converted or '
        f'exported checkpoint), a MODEL_DIR with {CHECKPOINTS_DIR}/<step>/{STATE_ITEM}, or a '
        f'step directory')
  return os.path.join(root, str(steps[-1])), steps[-1]


def read_params(path: str, macro: str = 'INITIAL_CHECKPOINT_PATH'
                ) -> Tuple[Dict[str, Any], Optional[str]]:
  """Params (numpy) and gin text from any checkpoint a user may name as a starting point.

  Accepts a converted / exported checkpoint (`params/` + `config.gin`, unimoe_jax.checkpoint),
  a training `MODEL_DIR` (its latest step), a `MODEL_DIR/checkpoints` directory, or one step
  directory of it (`locate`). The gin text is None when the directory has none.
  """
  directory, _ = locate(path, macro)
  if os.path.isdir(os.path.join(directory, model_checkpoint.PARAMS_DIR)):
    return model_checkpoint.restore(directory)
  gin_text = None
  run_config = os.path.join(directory, '..', '..', 'config.gin')  # MODEL_DIR/config.gin
  if os.path.exists(run_config):
    with open(run_config) as f:
      gin_text = f.read()
  state = model_checkpoint.restore_numpy_tree(os.path.join(directory, STATE_ITEM))
  return state['params'], gin_text
