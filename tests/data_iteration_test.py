"""data/iteration.py: a pipeline error leaves no tf.data iterator behind, so a program that
ends on it exits (it used to hang at interpreter exit, most runs)."""

import gc
import os
import subprocess
import sys
import textwrap

import pytest

tf = pytest.importorskip('tensorflow')

from unimoe_jax.data import iteration  # noqa: E402
from tensorflow.python.data.ops.dataset_ops import NumpyIterator  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _failing(fail_at=3):
  def load(i):
    if i == fail_at:
      raise ValueError(f'bad example {i}')
    return i

  ds = tf.data.Dataset.range(100).map(
      lambda i: tf.numpy_function(load, [i], tf.int64, stateful=False),
      num_parallel_calls=4,
      deterministic=True,
  )
  return ds


def test_elements_then_the_error_with_its_type_and_message():
  got = []
  with pytest.raises(tf.errors.InvalidArgumentError, match='bad example 3') as error:
    for x in iteration.numpy_iterator(_failing()):
      got.append(int(x))
  assert got == [0, 1, 2]
  # Nothing in the traceback holds a tf.data iterator: only this test's frame and the
  # generator's, whose iterator is deleted.
  assert error.value.__context__ is None
  frames = []
  tb = error.value.__traceback__
  while tb is not None:
    frames.append(tb.tb_frame)
    tb = tb.tb_next
  for frame in frames:
    for value in frame.f_locals.values():
      assert not isinstance(value, tf.data.Iterator), frame


def _is_iterator(o) -> bool:
  try:
    return isinstance(o, (tf.data.Iterator, NumpyIterator))
  except ReferenceError:  # A weakref.proxy whose object is gone (other tests leave some).
    return False


def _live_tf_iterators():
  gc.collect()
  return sum(_is_iterator(o) for o in gc.get_objects())


def test_checkpointable_iterator_fails_like_numpy_iterator():
  """The training stream's iterator (data/pipeline.train_batches): the same error, raised
  once its tf.data iterator is destroyed, and nothing after it."""
  before = _live_tf_iterators()
  stream = iteration.CheckpointableIterator(_failing())
  assert _live_tf_iterators() == before + 2  # The numpy iterator and its tf.data iterator.
  got = []
  with pytest.raises(tf.errors.InvalidArgumentError, match='bad example 3') as error:
    for x in stream:
      got.append(int(x))
  assert got == [0, 1, 2] and stream.position == 3
  assert error.value.__context__ is None
  assert _live_tf_iterators() == before  # While the error (and its traceback) is held.
  with pytest.raises(StopIteration):
    next(stream)
  with pytest.raises(ValueError, match='has ended or failed'):
    stream.save('/nonexistent/state')
  # The end of a finite dataset: a fresh StopIteration, the iterator gone.
  stream = iteration.CheckpointableIterator(tf.data.Dataset.range(2))
  assert [int(x) for x in stream] == [0, 1]
  assert _live_tf_iterators() == before


def test_end_and_early_stop_are_clean():
  assert [int(x) for x in iteration.numpy_iterator(tf.data.Dataset.range(4))] == [0, 1, 2, 3]
  gen = iteration.numpy_iterator(tf.data.Dataset.range(10))
  assert int(next(gen)) == 0
  gen.close()


@pytest.mark.slow
def test_a_program_that_ends_on_a_pipeline_error_exits():
  """Two runs of a program whose pipeline (Python work in numpy_function, 16 parallel calls)
  fails: each exits with the error within 45 s (~9 s each on 2 cores). A hang is a race: the
  iterator destroyed at exit while in-flight calls wait for the interpreter lock. With 20000
  loop iterations per call, `as_numpy_iterator()` hung in 1 run of 6 (and `python -m
  unimoe_jax.train` on a manifest with a missing file in 2 of 3); with 10**6 per call (each
  call ~30 ms of Python, so 16 are always in flight when example 16 fails) it hung in 18 runs
  of 18, loaded host or not, while this module's iterator exited in 20 of 20. So two runs
  catch the regression almost surely (six runs of the lighter program caught it ~2 times in
  3)."""
  program = textwrap.dedent("""
      import tensorflow as tf
      from unimoe_jax.data import iteration

      def load(i):
        s = 0
        for j in range(10**6):  # Python work: the calls queue on the interpreter lock.
          s += j
        if i == 16:
          raise ValueError('bad example 16')
        return i

      ds = tf.data.Dataset.range(10**6).map(
          lambda i: tf.numpy_function(load, [i], tf.int64, stateful=False),
          num_parallel_calls=16, deterministic=True).prefetch(16)
      for x in iteration.numpy_iterator(ds):
        pass
  """)
  for _ in range(2):
    proc = subprocess.run(
        [sys.executable, '-c', program], cwd=REPO, capture_output=True, text=True, timeout=45
    )
    assert proc.returncode == 1 and 'bad example 16' in proc.stderr, proc.stderr[-2000:]
