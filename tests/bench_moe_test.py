"""tools/bench_moe.py still runs end to end (a smoke test: nothing here is timed or compared)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_moe_runs_every_row_on_a_tiny_shape(tmp_path):
  out = tmp_path / 'rows.json'
  # One host device (the tool makes its own for the EP mesh); XLA:CPU at optimisation level 0
  # as in every test (conftest.py): the test checks the rows, not their speed.
  env = dict(os.environ, XLA_FLAGS='--xla_backend_optimization_level=0')
  subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, 'tools', 'bench_moe.py'),
          '--shapes',
          '64x32x48x4x2',
          '--iters',
          '1',
          '--warmup',
          '0',
          '--json',
          str(out),
      ],
      check=True,
      cwd=tmp_path,
      env=env,
      stdout=subprocess.DEVNULL,
  )
  rows = {r['implementation']: r for r in json.loads(out.read_text())}
  for name in (
      'jax:ffn(k*F)',
      'jax:moe dense',
      'jax:moe capacity',
      'jax:moe dropless/ragged_dot',
      'jax:moe dropless/tiled',
      'jax:moe dropless/tiled unfused',
      'jax:moe dropless EP 2x4',
      'torch:mixtral',
  ):
    assert rows[name]['median_ms'] is not None and rows[name]['median_ms'] > 0, rows[name]
    if name.startswith('jax'):
      assert rows[name]['temp_mib'] is not None, rows[name]
  assert 'TPU only' in rows['jax:moe dropless/megablox']['note']
