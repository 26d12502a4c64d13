"""Stop a training run cleanly on Ctrl-C (SIGINT) or preemption (SIGTERM).

Without this, the signal's default action ends the process at once: Python raises
KeyboardInterrupt wherever the main thread is, and SIGTERM kills it, so an asynchronous
checkpoint being written in the background is abandoned (a run interrupted at step 25 lost its
step-20 save and kept only step 10). `StopSignals` turns the signal into a request instead:
the loop finishes the step it is in, lets any save in flight complete, saves the current step,
and raises `TrainingInterrupted` (the CLI exits with 128 + the signal number, as a shell
reports a process a signal ended). A second Ctrl-C while that happens stops at once
(KeyboardInterrupt), for a user who does not want to wait.

Multi-process runs cannot act on one process's signal alone: a checkpoint is written by every
process together, so a process that saved on its own would wait forever for the others. There
SIGINT keeps its default action, and SIGTERM is left to JAX's preemption notifier (installed by
`jax.distributed.initialize`), which agrees on a step with the other processes;
`requested(step)` asks it through `multihost_utils.reached_preemption_sync_point`, as t5x's
train loop does.
"""

import signal
import threading
from typing import Optional

from absl import logging
import jax


class TrainingInterrupted(KeyboardInterrupt):
  """Raised by the training loop after it saved `step` on a stop signal. A KeyboardInterrupt,
  so that an `except Exception` on the way out does not swallow it."""

  def __init__(self, signum: int, step: int):
    self.signum, self.step = signum, step
    super().__init__(
        f'{signal.Signals(signum).name} received: saved a checkpoint at step ' f'{step} and stopped'
    )

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopSignals:
  """Context manager: while active, SIGINT / SIGTERM ask the loop to stop (`requested`)."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt('second Ctrl-C: stopping without waiting for the checkpoint')
    self.signum = signum
    logging.warning(
        '%s received: finishing this step, saving a checkpoint and stopping '
        '(Ctrl-C again to stop at once without it)',
        signal.Signals(signum).name,
    )

  def __enter__(self) -> 'StopSignals':
    # Python runs signal handlers in the main thread only, and only it may install them.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    return False

  def requested(self, step: int) -> bool:
    """True when the run should save `step` and stop. Multi-process: when every process has
    reached JAX's preemption sync point at `step` (the same answer on every process)."""
    if self.signum is not None:
      return True
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signum = signal.SIGTERM
          return True
      except RuntimeError:  # No preemption sync manager (no coordination service).
        return False
    return False
