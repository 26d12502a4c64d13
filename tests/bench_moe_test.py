"""tools/bench_moe.py still runs end to end (a smoke test: nothing here is timed or compared)."""

import pytest

from tool_runs import tool_rows


@pytest.mark.slow
def test_bench_moe_runs_every_row_on_a_tiny_shape(tmp_path):
  flags = '--shapes 64x32x48x4x2 --iters 1 --warmup 0'.split()
  rows = {r['implementation']: r for r in tool_rows(tmp_path, 'bench_moe.py', *flags)[0]}
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
