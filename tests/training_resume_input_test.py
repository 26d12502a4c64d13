"""Resuming the input stream from the iterator state saved with the train state (issue 17).

A resumed run restores its process's tf.data iterator state from the checkpoint
(`data/iteration.CheckpointableIterator`, `training/state_checkpoints.py`) instead of skipping, and
recomputing, every batch it had read. Measured here with `unimoe_test_lm_indexed`
(tests/tiny_tasks.py), built like a manifest source: one `tf.numpy_function` call per example
(`tiny_tasks.DECODED` counts them: the stand-in for media decoding), sharded by process,
shuffled, seqio's shuffle buffer, packing, batching, prefetch.

- in process: the restored stream continues with the same batches and decodes none of the
  examples before the saved position; a skip decodes them all again; a corrupt state, one of
  another pipeline or of another step is an error naming the file; no state, a pipeline that
  cannot be saved (`from_generator`) or another process count falls back to skipping; the
  input state is written into the uncommitted step directory, and a failure there commits no
  step;
- a killed and resumed run of `python -m unimoe_jax.train` on 2 processes (gloo; slow): its
  losses and final params equal an uninterrupted one-process run's, and the examples decoded
  after the restart are counted;
- the sample stage-3 mixture (slow): media decoded (`manifest._load_example` calls) after a
  restore vs a skip, and the size of its iterator state.
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import seqio
from flax import traverse_util

import tiny_tasks
from unimoe_jax.data import iteration
from unimoe_jax.data import pipeline
from unimoe_jax import checkpoints
from unimoe_jax.training import state_checkpoints

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
LENGTHS = {'targets': 64}
READ, AFTER = 6, 4  # Batches read before the save, and compared after it.
ROWS = 8


def _stream(skip=0, batch_size=ROWS, task=tiny_tasks.INDEXED_TASK_NAME):
  return pipeline.train_batches(task, LENGTHS, batch_size, seed=0, skip_batches=skip)


def _read(stream, n):
  return [next(stream) for _ in range(n)]


def _assert_same_batches(got, expected):
  assert len(got) == len(expected)
  for i, (a, b) in enumerate(zip(got, expected)):
    assert sorted(a) == sorted(b), i
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'batch {i} {key}')


def _copy_state(prefix, new_prefix):
  for suffix in ('.index', '.data-00000-of-00001', '.json'):
    shutil.copyfile(prefix + suffix, new_prefix + suffix)


@pytest.fixture
def saved(tmp_path):
  """A stream saved after READ batches, and the AFTER batches that followed (the reference)."""
  stream = _stream()
  try:
    _read(stream, READ)
    prefix = str(tmp_path / 'saved' / 'process_0-of-1')
    assert stream.save(prefix) is True
    reference = _read(stream, AFTER)
  finally:
    stream.close()  # No tf.data iterator left for interpreter exit (data/iteration.py).
  assert sorted(os.listdir(tmp_path / 'saved')) == [
      'process_0-of-1.data-00000-of-00001',
      'process_0-of-1.index',
      'process_0-of-1.json',
  ]
  return prefix, reference


def test_restored_stream_continues_without_decoding_what_was_read(saved):
  prefix, reference = saved
  info = iteration.read_info(prefix)
  assert info['batches_read'] == READ and info['tf_state'] is True
  assert info['description']['global_batch_size'] == ROWS

  tiny_tasks.DECODED.clear()
  restored = _stream()
  try:
    restored.restore(prefix)
    assert restored.position == READ
    _assert_same_batches(_read(restored, AFTER), reference)
    assert restored.position == READ + AFTER
  finally:
    restored.close()
  decoded_restored = tiny_tasks.DECODED['stream']

  tiny_tasks.DECODED.clear()
  skipped = _stream(skip=READ)
  try:
    _assert_same_batches(_read(skipped, AFTER), reference)
    assert skipped.position == READ + AFTER
  finally:
    skipped.close()
  decoded_skipped = tiny_tasks.DECODED['stream']
  size = sum(os.path.getsize(prefix + s) for s in ('.index', '.data-00000-of-00001', '.json'))
  print(
      f'examples decoded for {AFTER} batches after {READ}: restored {decoded_restored}, '
      f'skipped {decoded_skipped}; iterator state {size} bytes'
  )
  # Each skipped batch holds ROWS packed rows of at least one example: the skip decoded them
  # again, the restore none of them.
  assert decoded_skipped - decoded_restored >= READ * ROWS


def test_state_of_another_pipeline_or_corrupt_files_is_an_error_naming_the_file(saved, tmp_path):
  prefix, _ = saved
  other = _stream(batch_size=4)
  with pytest.raises(iteration.IteratorStateError) as error:
    other.restore(prefix)
  other.close()
  assert str(error.value).startswith(
      f'{prefix}.json: the input iterator state was written by ' 'another input pipeline'
  )
  assert 'global_batch_size was 8, now 4' in str(error.value)

  other = pipeline.train_batches(tiny_tasks.INDEXED_TASK_NAME, {'targets': 48}, ROWS, seed=0)
  with pytest.raises(
      iteration.IteratorStateError,
      match=r"task_feature_lengths was \{'targets': 64\}, now \{'targets': 48\}",
  ):
    other.restore(prefix)
  other.close()

  def corrupt(name, suffix, damage):
    bad = str(tmp_path / name)
    _copy_state(prefix, bad)
    with open(bad + suffix, 'rb') as f:
      data = f.read()
    with open(bad + suffix, 'wb') as f:
      f.write(damage(data))
    return bad

  cases = [
      (corrupt('index', '.index', lambda d: b'garbage' * 10), '.index'),
      (corrupt('truncated', '.data-00000-of-00001', lambda d: d[: len(d) // 2]), '.index'),
      (
          corrupt(
              'flipped',
              '.data-00000-of-00001',
              lambda d: d[:100] + bytes(b ^ 0xFF for b in d[100:200]) + d[200:],
          ),
          '.index',
      ),
      (corrupt('json', '.json', lambda d: d[:20]), '.json'),
  ]
  for bad, named in cases:
    stream = _stream()
    with pytest.raises(iteration.IteratorStateError) as error:
      stream.restore(bad)
    assert str(error.value).startswith(bad + named), str(error.value)
    if named == '.index':
      with pytest.raises(StopIteration):  # A failed tf.data restore drops the iterator.
        next(stream)
    stream.close()
    print(os.path.basename(bad), '->', str(error.value)[:300])


def test_checkpoint_manager_restores_or_falls_back_to_skipping(saved, tmp_path, caplog):
  prefix, reference = saved
  manager = state_checkpoints.CheckpointManager(str(tmp_path / 'run'), async_save=False)
  step_dir = os.path.join(manager.directory, str(READ))
  input_dir = os.path.join(step_dir, state_checkpoints.INPUT_ITEM)
  try:
    # A checkpoint written without input state.
    os.makedirs(step_dir)
    with caplog.at_level(logging.INFO):
      assert manager.input_state(READ) is None
    assert f'{input_dir} does not exist' in caplog.text
    assert f'skipping {READ} batches' in caplog.text

    # States of a 2-process run: the shards differ, so skip (warned).
    os.makedirs(input_dir)
    for i in range(2):
      _copy_state(prefix, os.path.join(input_dir, f'process_{i}-of-2'))
    caplog.clear()
    with caplog.at_level(logging.INFO):
      assert manager.input_state(READ) is None
    assert 'written by 2 processes' in caplog.text and 'this run has 1' in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)

    # This process's state: restored, at the right step.
    _copy_state(prefix, os.path.join(input_dir, 'process_0-of-1'))
    found = manager.input_state(READ)
    assert found == os.path.join(input_dir, 'process_0-of-1')
    stream = _stream()
    try:
      manager.restore_input(READ, found, stream)
      _assert_same_batches(_read(stream, AFTER), reference)
    finally:
      stream.close()

    # The same state paired with another step (what a non-atomic save could leave).
    stream = _stream()
    with pytest.raises(iteration.IteratorStateError) as error:
      manager.restore_input(READ - 1, found, stream)
    message = str(error.value)
    assert message.startswith(
        f'{found}.json: the input iterator had read {READ} batches, but '
        f'the train state is at step {READ - 1}'
    ), message
    assert f'delete {input_dir}' in message
    with pytest.raises(StopIteration):
      next(stream)

    # An unreadable description: an error naming it, found before any pipeline is built.
    with open(found + iteration.INFO_SUFFIX, 'w') as f:
      f.write('{"format": 1, "batches')
    with pytest.raises(iteration.IteratorStateError) as error:
      manager.input_state(READ)
    assert str(error.value).startswith(f'{found}.json: unreadable input iterator description')
    assert f'delete {input_dir}' in str(error.value)
  finally:
    manager.close()


GENERATOR_TASK = 'unimoe_test_lm_generator'


def _register_generator_task():
  if GENERATOR_TASK in seqio.TaskRegistry.names():
    return
  data = tiny_tasks.examples('train')

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tiny_tasks.generator_dataset(data)

  # No num_input_examples: seqio would cache it in memory, and a cache that has been read
  # whole is saved without its generator.
  seqio.TaskRegistry.add(
      GENERATOR_TASK,
      source=seqio.FunctionDataSource(dataset_fn, splits=('train',)),
      preprocessors=[],
      output_features=tiny_tasks.output_features(tiny_tasks.VOCABULARY, ()),
      shuffle_buffer_size=16,
  )


def test_pipeline_that_cannot_be_saved_writes_why_and_falls_back(tmp_path, caplog):
  _register_generator_task()
  manager = state_checkpoints.CheckpointManager(str(tmp_path / 'run'), async_save=False)
  input_dir = os.path.join(manager.directory, '2', state_checkpoints.INPUT_ITEM)
  os.makedirs(input_dir)
  prefix = os.path.join(input_dir, 'process_0-of-1')
  stream = _stream(task=GENERATOR_TASK)
  try:
    _read(stream, 2)
    with caplog.at_level(logging.WARNING):
      assert stream.save(prefix) is False
      assert stream.save(prefix) is False  # Not tried again, not warned again.
    warnings = [r for r in caplog.records if 'cannot be checkpointed' in r.getMessage()]
    assert len(warnings) == 1
    assert 'GeneratorDataset does not support checkpointing' in warnings[0].getMessage()
    batch = next(stream)  # The failed saves left the stream intact.
    assert batch['decoder_target_tokens'].shape == (ROWS, 64)
  finally:
    stream.close()
  assert sorted(os.listdir(input_dir)) == ['process_0-of-1.json']
  info = iteration.read_info(prefix)
  assert info['tf_state'] is False and info['batches_read'] == 2
  assert 'GeneratorDataset' in info['not_checkpointable']
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert manager.input_state(2) is None
  assert 'the input pipeline could not be checkpointed' in caplog.text
  assert 'skipping 2 batches' in caplog.text
  manager.close()


class _ProbeIterator:
  """Stands in for the input stream: records where and when the manager saves it."""

  def __init__(self, manager, fail=False):
    self.manager, self.fail, self.prefixes, self.steps_visible = manager, fail, [], []

  def save(self, prefix):
    self.prefixes.append(prefix)
    self.steps_visible.append(list(self.manager.all_steps()))
    if self.fail:
      raise OSError('no space left on device (test)')
    with open(prefix + iteration.INFO_SUFFIX, 'w') as f:
      json.dump({'format': iteration.INFO_FORMAT}, f)
    return True


def test_input_state_is_committed_with_its_step_or_not_at_all(tmp_path):
  """Asynchronous saves, as the loop makes them: the input state is written before `save`
  returns (the stream moves on right after), into the step's temporary directory, and the
  step appears only once both items are written; a failing input save commits no step."""
  manager = state_checkpoints.CheckpointManager(str(tmp_path / 'run'), async_save=True)
  state = {'w': np.arange(6, dtype=np.float32)}
  try:
    probe = _ProbeIterator(manager)
    assert manager.save(1, state, probe, force=True)
    assert len(probe.prefixes) == 1  # Written synchronously, inside save().
    manager.wait()
    final = os.path.join(manager.directory, '1', state_checkpoints.INPUT_ITEM, 'process_0-of-1')
    # Written into a temporary step directory, renamed into place on commit.
    step_dir_then = os.path.dirname(os.path.dirname(probe.prefixes[0]))
    assert os.path.dirname(step_dir_then) == manager.directory
    assert os.path.basename(step_dir_then) != '1', probe.prefixes[0]
    assert not os.path.exists(step_dir_then)
    assert probe.steps_visible == [[]]  # Step 1 was not visible while its input was written.
    assert os.path.exists(final + iteration.INFO_SUFFIX)
    assert list(manager.all_steps()) == [1]

    failing = _ProbeIterator(manager, fail=True)
    with pytest.raises(OSError, match='no space left on device'):
      manager.save(2, {'w': state['w'] + 1}, failing, force=True)
      manager.wait()
    assert list(manager.all_steps()) == [1]
    assert checkpoints.locate(str(tmp_path / 'run')) == (os.path.join(manager.directory, '1'), 1)
  finally:
    manager.close()


# ---- killed and resumed training runs ------------------------------------------------------

# `python -m unimoe_jax.train` with `crash_after_step` (gin refuses to bind it), printing the
# examples decoded by this process at the end.
_TRAIN = """
import json, sys
from unimoe_jax import train
from unimoe_jax.training import loop
crash = int(sys.argv[1]) or None
train.setup(sys.argv[2:], 'train (tests/training_resume_input_test.py)')
import tiny_tasks
loop.train(crash_after_step=crash)
print('DECODED ' + json.dumps(dict(tiny_tasks.DECODED)), flush=True)
"""
STEPS, CRASH, PERIOD = 6, 5, 2  # Checkpoints at 2 and 4; step 5 is lost and redone.
RESUMED_AT = 4


def _env(devices):
  return dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
      '--xla_backend_optimization_level=0',
      PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO, os.environ.get('PYTHONPATH', '')]),
  )


def _flags(model_dir):
  return [
      '--gin_file=models/tiny.gin',
      '--gin_file=runs/train.gin',
      f"--gin.MODEL_DIR='{model_dir}'",
      f'--gin.TRAIN_STEPS={STEPS}',
      f"--gin.MIXTURE_OR_TASK_NAME='{tiny_tasks.INDEXED_TASK_NAME}'",
      "--gin.MIXTURE_OR_TASK_MODULE='tiny_tasks'",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
      '--gin.LEARNING_RATE=3e-3',
      '--gin.loop.train.log_period=1',
      f'--gin.loop.train.checkpoint_period={PERIOD}',
  ]


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _train(model_dir, crash=0, processes=1, extra=(), timeout=400):
  """Runs the training program on `processes` processes (8 CPU devices in all); returns
  (exit codes, stderr logs, DECODED of each process or None when it did not finish)."""
  if processes == 1:
    commands = [_flags(model_dir) + list(extra)]
  else:
    port = _free_port()
    commands = [
        _flags(model_dir)
        + list(extra)
        + [
            f'--coordinator_address=localhost:{port}',
            f'--num_processes={processes}',
            f'--process_id={i}',
            '--cpu_collectives=gloo',
        ]
        for i in range(processes)
    ]
  procs = [
      subprocess.Popen(
          [sys.executable, '-c', _TRAIN, str(crash), *c],
          env=_env(8 // processes),
          cwd=REPO,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for c in commands
  ]
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  decoded = []
  for out, _ in outputs:
    lines = [l for l in out.splitlines() if l.startswith('DECODED ')]
    decoded.append(json.loads(lines[-1][len('DECODED ') :]) if lines else None)
  return [p.returncode for p in procs], [err for _, err in outputs], decoded


def _train_in_process(model_dir, extra=()):
  """The one-process run of `_train`, in this process (8 CPU devices and the same XLA flags,
  conftest.py): what a subprocess adds is ~9 s of imports. Returns DECODED."""
  import gin  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import loop  # pylint: disable=g-import-not-at-top

  tiny_tasks.DECODED.clear()
  try:
    tiny_tasks.parse_cli_gin(_flags(model_dir) + list(extra), 'train (in process)')
    loop.train()  # pylint: disable=no-value-for-parameter
  finally:
    gin.clear_config()
  return dict(tiny_tasks.DECODED)


def _losses(model_dir):
  scalars = tiny_tasks.read_scalars(model_dir)
  assert sorted(scalars) == list(range(1, STEPS + 1)), sorted(scalars)
  return [scalars[s]['loss'] for s in range(1, STEPS + 1)]


def _params(model_dir):
  params, _ = checkpoints.read_params(model_dir)
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _params_close(params, reference):
  """Final params of runs on another process count: Adam (lr 3e-3, 6 steps) turns the fp32
  rounding of a near-zero gradient into m / sqrt(v) noise, so a few entries differ by up to
  ~4e-6 (measured: about 1 in 4096); the bulk agrees to 1e-6."""
  assert sorted(params) == sorted(reference) and len(params) == 23  # Tiny MoE: 2 routers.
  loose = total = 0
  for path, value in reference.items():
    np.testing.assert_allclose(params[path], value, rtol=0, atol=2e-5, err_msg=path)
    loose += int(np.sum(np.abs(params[path] - value) > 1e-6))
    total += value.size
  print(f'{loose} of {total} entries differ by more than 1e-6')
  assert loose <= total // 1000


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_their_input(tmp_path):
  """Two processes (jax.distributed, gloo CPU collectives, 4 CPU devices each), killed after
  step CRASH (last checkpoint RESUMED_AT) and resumed, train like one uninterrupted process with
  8 devices: the same losses and final params (fp32 tolerance), and the restart restores each
  process's input iterator instead of decoding the examples before the checkpoint again. The
  model is MoE (4 experts, top-2, dropless) on MeshConfig(data=2, expert=4): on two processes
  each holds two experts' shards. (The same train step on that mesh equals one device:
  partitioning_test.py.) The one-process run is this test's process (`_train_in_process`);
  the two-process runs are `python -m unimoe_jax.train`'s code in subprocesses.

  Each process reads its own shard of the examples (`seqio.ShardInfo`), so the rows of a global
  batch come in another order than on one process; unshuffled and unpacked, every global batch
  holds the same examples, and the loss (a mean over its loss-weighted tokens) does not depend
  on their order. (Shuffled or packed, the runs would legitimately differ.) Bit-identical
  resumption on one process: train_cli_test.py's fault test.
  """
  flags = [
      '--gin.SHUFFLE_TRAIN_EXAMPLES=False',
      '--gin.loop.train.pack=False',
      '--gin_file=models/moe_4e_top2.gin',
      '--gin.partitioning.MeshConfig.data=2',
      '--gin.partitioning.MeshConfig.expert=4',
  ]
  one = str(tmp_path / 'one_process')
  one_decoded = _train_in_process(one, extra=flags)

  two = str(tmp_path / 'two_processes')
  codes, logs, _ = _train(two, crash=CRASH, processes=2, extra=flags)
  assert codes == [3, 3], logs[0][-4000:]
  assert all(f'crash_after_step={CRASH}' in log for log in logs)
  assert sorted(int(d) for d in os.listdir(os.path.join(two, 'checkpoints')) if d.isdigit()) == [
      2,
      RESUMED_AT,
  ]
  input_dir = os.path.join(two, 'checkpoints', str(RESUMED_AT), 'input')
  assert sorted(f for f in os.listdir(input_dir) if f.startswith('process_')) == sorted(
      f'process_{i}-of-2{s}' for i in range(2) for s in ('.index', '.data-00000-of-00001', '.json')
  )
  for i in range(2):
    info = iteration.read_info(os.path.join(input_dir, f'process_{i}-of-2'))
    assert info['batches_read'] == RESUMED_AT and info['tf_state'] is True

  codes, logs, decoded = _train(two, processes=2, extra=flags)
  assert codes == [0, 0], logs[0][-4000:]
  for log in logs:
    assert 'Resuming from' in log and f'Restored the input iterator of step {RESUMED_AT}' in log
    assert 'Skipping' not in log
    assert f'step {RESUMED_AT + 1}/{STEPS}' in log and f'step {RESUMED_AT}/{STEPS}' not in log

  one_losses, two_losses = _losses(one), _losses(two)
  print('one process', one_losses, 'two processes, killed and resumed', two_losses)
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
  assert one_losses[-1] < one_losses[0] - 0.3  # It trains.
  _params_close(_params(two), _params(one))

  # Unshuffled, each process's stream decodes its examples in order: a skip decodes the
  # RESUMED_AT * rows examples before the checkpoint again, a restore starts after them.
  rows = ROWS // 2
  restored = [d.get('stream', 0) for d in decoded]
  print(
      f'examples decoded by the training stream: one process, {STEPS} steps: '
      f'{one_decoded["stream"]}; each of two processes after the restart at step '
      f'{RESUMED_AT}: {restored} (a skip decodes at least {STEPS * rows})'
  )
  assert one_decoded['stream'] >= STEPS * ROWS
  assert all(r < STEPS * rows for r in restored), restored


@pytest.mark.slow
def test_sample_mixture_resumes_without_decoding_media_again(tmp_path, monkeypatch):
  """The demo's stage-3 mixture (10 manifest tasks, images, video, speech, audio, packing):
  the examples whose media `manifest._load_example` decodes, after a restore vs a skip.
  Sample data with 96 items per pool (the default 512 took 5 s to write; the stream reads
  a few hundred examples, most of them to fill the shuffle buffers)."""
  from unimoe_jax.data import manifest  # pylint: disable=g-import-not-at-top
  import unimoe_jax.tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  data = tmp_path / 'sample'
  subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, 'tools', 'make_sample_data.py'),
          '--output',
          str(data),
          '--train',
          '96',
          '--validation',
          '8',
      ],
      check=True,
      capture_output=True,
      timeout=120,
  )
  monkeypatch.setenv('UNIMOE_SAMPLE_DATA', str(data))
  decoded = []
  load = manifest._load_example  # pylint: disable=protected-access

  def counted(*args, **kwargs):
    decoded.append(1)
    return load(*args, **kwargs)

  monkeypatch.setattr(manifest, '_load_example', counted)
  # pipeline.check_examples_fit decodes a sample of every task (~430 media examples of this
  # mixture) at each start, restore or skip alike: not what this test measures, and most of
  # its time. Each start is recorded; none decodes.
  checked = []

  def counted_check(*args, **kwargs):
    del args, kwargs
    checked.append(0)

  monkeypatch.setattr(pipeline, 'check_examples_fit', counted_check)
  # 'targets' 512: room for the default (non-demo) placeholder expansion of every task.
  lengths = {
      'targets': 512,
      'image_features': 2,
      'video_features': 1,
      'speech_features': 1,
      'audio_features': 1,
  }
  read, after = 3, 2

  def stream(skip=0):
    return pipeline.train_batches('unimoe_sample_stage3', lengths, ROWS, seed=0, skip_batches=skip)

  prefix = str(tmp_path / 'input' / 'process_0-of-1')
  first = stream()
  try:
    _read(first, read)
    decoded_first = len(decoded) - checked[-1]
    assert first.save(prefix) is True
    reference = _read(first, after)
  finally:
    first.close()
  size = sum(os.path.getsize(prefix + s) for s in ('.index', '.data-00000-of-00001', '.json'))
  counts = {}
  for name, make in (('restored', lambda: stream()), ('skipped', lambda: stream(read))):
    del decoded[:]
    resumed = make()
    try:
      if name == 'restored':
        resumed.restore(prefix)
      _assert_same_batches(_read(resumed, after), reference)
    finally:
      resumed.close()
    counts[name] = len(decoded) - checked[-1]
  print(
      f'sample stage 3: examples decoded by the training stream for the first {read} '
      f'batches {decoded_first}; for the {after} batches after them: restored '
      f'{counts["restored"]}, skipped {counts["skipped"]}; iterator state '
      f'{size / 1e6:.1f} MB'
  )
  assert len(checked) == 3
  # The skip decodes the `read` batches of ROWS packed rows (>= 1 example each) again.
  assert counts['skipped'] - counts['restored'] >= read * ROWS
