"""tools/bench_decode.py still runs end to end (a smoke test: nothing here is timed)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_decode_runs_on_a_tiny_shape(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  out = tmp_path / 'rows.json'
  # One host device (the tool makes its own for the EP mesh); XLA:CPU at optimisation level 0
  # as in every test (conftest.py): the test checks the rows, not their speed.
  env = dict(os.environ, XLA_FLAGS='--xla_backend_optimization_level=0')
  subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, 'tools', 'bench_decode.py'),
          '--moe',
          '--batch-sizes',
          '1,2',
          '--prompt-len',
          '4',
          '--new-tokens',
          '3',
          '--embed',
          '32',
          '--mlp',
          '48',
          '--layers',
          '1',
          '--vocab',
          '64',
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
  rows = json.loads(out.read_text())
  assert [(r['model'], r['batch']) for r in rows] == [
      ('llama', 1),
      ('llama', 2),
      ('mixtral', 1),
      ('mixtral', 2),
  ]
  for r in rows:
    assert r['jax_tokens_per_s'] > 0 and r['torch_tokens_per_s'] > 0, r
    assert r['tokens_match'], r  # Same weights, greedy: the same tokens.
