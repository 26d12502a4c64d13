"""Checkpoints that do not survive: unreadable steps are skipped, another model is named.

In-process, on a small TrainState (two parameters and their Adam moments) saved by
`state_checkpoints.CheckpointManager`; the end-to-end fault test (SIGKILL during a save, SIGTERM,
a truncated step, then resume with equal losses) is in train_cli_test.py.
"""

import glob
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unimoe_jax.training import state_checkpoints
from unimoe_jax.training.train_state import TrainState


def _state(params):
  return TrainState(
      step=jnp.array(0, jnp.int32), params=params, opt_state=optax.adam(1e-3).init(params)
  )


def _params(scale=1.0, kernel_shape=(3, 4)):
  return {'a': {'kernel': scale * jnp.ones(kernel_shape)}, 'b': scale * jnp.arange(5.0)}


def _abstract(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state
  )


@pytest.fixture
def model_dir(tmp_path):
  """Steps 1 and 2 (params scaled by the step), saved asynchronously as in training."""
  manager = state_checkpoints.CheckpointManager(str(tmp_path))
  for step in (1, 2):
    manager.save(step, _state(_params(step)), force=True)
  manager.wait()
  manager.close()
  return str(tmp_path)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    'truncated array files': lambda d: [
        _truncate(p) for p in glob.glob(os.path.join(d, 'state', '**', 'd', '*'), recursive=True)
    ],
    'truncated manifest': lambda d: [
        _truncate(p)
        for p in glob.glob(os.path.join(d, 'state', '**', 'manifest.ocdbt'), recursive=True)
    ],
    'deleted tree metadata': lambda d: os.remove(os.path.join(d, 'state', '_METADATA')),
    'deleted state item': lambda d: shutil.rmtree(os.path.join(d, 'state')),
}


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_unreadable_latest_step_falls_back_and_is_set_aside(model_dir, corruption, caplog):
  step_dir = os.path.join(model_dir, 'checkpoints', '2')
  CORRUPTIONS[corruption](step_dir)
  manager = state_checkpoints.CheckpointManager(model_dir)
  assert manager.latest_step() == 2  # orbax alone would pick the broken step.
  with caplog.at_level(logging.WARNING):
    step, state = manager.restore_latest(_abstract(_state(_params())))
  assert step == 1
  np.testing.assert_array_equal(state.params['b'], np.arange(5.0))  # Step 1's values.
  log = caplog.text
  assert f'Checkpoint {step_dir} is unreadable' in log, log
  assert 'Resuming from step 1, the newest readable checkpoint; skipped step 2' in log, log
  # Kept, out of orbax's sight, so step 2 can be written again.
  aside = os.path.join(model_dir, state_checkpoints.UNREADABLE_DIR, '2')
  assert os.path.isdir(aside) and not os.path.exists(step_dir)
  assert manager.all_steps() == [1]
  manager.save(2, _state(_params(7.0)), force=True)
  manager.wait()
  step, state = manager.restore_latest(_abstract(_state(_params())))
  assert step == 2 and float(state.params['b'][1]) == 7.0
  manager.close()


def test_no_readable_step_is_an_error_listing_each(model_dir):
  for step in ('1', '2'):
    os.remove(os.path.join(model_dir, 'checkpoints', step, 'state', '_METADATA'))
  manager = state_checkpoints.CheckpointManager(model_dir)
  with pytest.raises(state_checkpoints.CheckpointUnreadableError) as error:
    manager.restore_latest(_abstract(_state(_params())))
  message = str(error.value)
  for step in ('1', '2'):
    assert os.path.join(model_dir, 'checkpoints', step) + ':' in message, message
  assert 'Move the directory aside' in message
  assert not os.path.exists(os.path.join(model_dir, state_checkpoints.UNREADABLE_DIR))
  manager.close()


def test_a_changed_model_names_the_parameters_that_differ(model_dir):
  """Before: orbax's shape error surfaced as "Event loop is closed", naming no parameter."""
  manager = state_checkpoints.CheckpointManager(model_dir)
  changed = _params(kernel_shape=(3, 5))
  changed['c'] = jnp.zeros(2)
  with pytest.raises(state_checkpoints.CheckpointMismatchError) as error:
    manager.restore_latest(_abstract(_state(changed)))
  message = str(error.value)
  step_dir = os.path.join(model_dir, 'checkpoints', '2')
  assert message.startswith(f'{step_dir} was written for another model or optimizer: ')
  assert 'params.a.kernel: (3, 4) in the checkpoint, (3, 5) in the model' in message, message
  assert 'in the model only (3): opt_state.0.mu.c, opt_state.0.nu.c, params.c' in message
  assert 'use a new MODEL_DIR' in message
  assert manager.all_steps() == [1, 2]  # Nothing set aside: the files are fine.
  manager.close()


def test_half_written_save_is_ignored_and_cleaned_up(model_dir):
  """A save cut short leaves `<step>.orbax-checkpoint-tmp-*`; it is neither a step nor kept."""
  root = os.path.join(model_dir, 'checkpoints')
  partial = os.path.join(root, '3.orbax-checkpoint-tmp-1234')
  shutil.copytree(os.path.join(root, '2'), partial)
  manager = state_checkpoints.CheckpointManager(model_dir)
  assert manager.all_steps() == [1, 2]
  step, _ = manager.restore_latest(_abstract(_state(_params())))
  assert step == 2
  assert not os.path.exists(partial)
  manager.close()


def test_stop_signals_turn_sigint_and_sigterm_into_a_request(tmp_path):
  """A signal during an asynchronous save no longer aborts it: the handler only records the
  request (the loop then saves its step and raises TrainingInterrupted); a second Ctrl-C
  stops at once. Handlers are restored on exit."""
  from unimoe_jax.training import interrupts  # pylint: disable=g-import-not-at-top

  before = {s: signal.getsignal(s) for s in interrupts.StopSignals.SIGNALS}
  manager = state_checkpoints.CheckpointManager(str(tmp_path))
  with interrupts.StopSignals() as stop:
    assert not stop.requested(1)
    manager.save(1, _state(_params(3.0)), force=True)  # In flight ...
    os.kill(os.getpid(), signal.SIGTERM)  # ... when the preemption notice comes.
    assert stop.requested(1) and stop.signum == signal.SIGTERM
    manager.wait()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert {s: signal.getsignal(s) for s in interrupts.StopSignals.SIGNALS} == before
  step, state = manager.restore_latest(_abstract(_state(_params())))
  assert step == 1 and float(state.params['b'][1]) == 3.0
  manager.close()
  stopped = interrupts.TrainingInterrupted(signal.SIGTERM, 7)
  assert stopped.exit_code == 143 and 'SIGTERM received: saved a checkpoint at step 7' in str(
      stopped
  )
  assert isinstance(stopped, KeyboardInterrupt)
