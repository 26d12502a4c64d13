"""Two processes (jax.distributed, gloo CPU collectives, 4 CPU devices each) train like one
process with 8 devices: same losses, same final params (fp32 tolerance).

Both runs use `python -m unimoe_jax.train` on the tiny model and `unimoe_test_lm`. Each
process reads its own shard of the examples (`seqio.ShardInfo`), so the *rows* of a global
batch come in another order than in the one-process run; with SHUFFLE_TRAIN_EXAMPLES=False
and no packing every global batch holds the same examples, and the loss (a mean over the
batch's loss-weighted tokens) is order-independent. With packing, rows would be packed from
different neighbours and the runs would legitimately differ.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

import tiny_tasks

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
STEPS = 4


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                        '--xla_backend_optimization_level=0',
              PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO, os.environ.get('PYTHONPATH', '')]))


def _command(model_dir, *extra):
  return [sys.executable, '-m', 'unimoe_jax.train',
          '--gin_file=models/tiny.gin', '--gin_file=runs/train.gin',
          f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={STEPS}',
          "--gin.MIXTURE_OR_TASK_NAME='unimoe_test_lm'",
          "--gin.MIXTURE_OR_TASK_MODULE='tiny_tasks'",
          "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
          '--gin.LEARNING_RATE=3e-3', '--gin.SHUFFLE_TRAIN_EXAMPLES=False',
          '--gin.loop.train.pack=False', '--gin.loop.train.log_period=1', *extra]


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _params(model_dir):
  from unimoe_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  params, _ = checkpoints.read_params(model_dir)
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  two_dir, one_dir = str(tmp_path / 'two'), str(tmp_path / 'one')
  port = _free_port()
  procs = [subprocess.Popen(
      _command(two_dir, f'--coordinator_address=localhost:{port}', '--num_processes=2',
               f'--process_id={i}', '--cpu_collectives=gloo'),
      env=_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=400)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f'process {i}:\n{log[-4000:]}'
    assert f'finished at step {STEPS}' in log
  one = subprocess.run(_command(one_dir), env=_env(8), cwd=REPO, capture_output=True, text=True,
                       timeout=400)
  assert one.returncode == 0, one.stderr[-4000:]

  two_losses = tiny_tasks.read_scalars(two_dir)
  one_losses = tiny_tasks.read_scalars(one_dir)
  assert sorted(two_losses) == sorted(one_losses) == list(range(1, STEPS + 1))
  two_losses = [two_losses[s]['loss'] for s in range(1, STEPS + 1)]
  one_losses = [one_losses[s]['loss'] for s in range(1, STEPS + 1)]
  print('two processes', two_losses, 'one process', one_losses)
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
  assert two_losses[-1] < two_losses[0] - 0.3

  # Final params: Adam (lr 3e-3, 4 steps: entries move up to 1.2e-2) turns the fp32 rounding
  # of a near-zero gradient into m / sqrt(v) noise, so a few entries differ by up to ~4e-6
  # (measured: 1 of 4096 in one kernel); the bulk agrees to 1e-6.
  two, one_params = _params(two_dir), _params(one_dir)
  assert sorted(two) == sorted(one_params) and len(two) == 21
  loose = total = 0
  for path, value in one_params.items():
    np.testing.assert_allclose(two[path], value, rtol=0, atol=2e-5, err_msg=path)
    loose += int(np.sum(np.abs(two[path] - value) > 1e-6))
    total += value.size
  print(f'{loose} of {total} entries differ by more than 1e-6')
  assert loose <= total // 1000
