"""tools/bench_decode.py still runs end to end (a smoke test: nothing here is timed)."""

import pytest

from tool_runs import tool_rows


@pytest.mark.slow
def test_bench_decode_runs_on_a_tiny_shape(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  flags = (
      '--moe --batch-sizes 1,2 --prompt-len 4 --new-tokens 3 --embed 32 --mlp 48 --layers 1 '
      '--vocab 64 --iters 1 --warmup 0'
  )
  rows, _ = tool_rows(tmp_path, 'bench_decode.py', *flags.split())
  assert [(r['model'], r['batch']) for r in rows] == [
      ('llama', 1),
      ('llama', 2),
      ('mixtral', 1),
      ('mixtral', 2),
  ]
  for r in rows:
    assert r['jax_tokens_per_s'] > 0 and r['torch_tokens_per_s'] > 0, r
    assert r['tokens_match'], r  # Same weights, greedy: the same tokens.
