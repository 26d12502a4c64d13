"""tools/bench_compile.py runs end to end on a tiny MoE (a smoke test: nothing here is timed)."""

import pytest

from tool_runs import tool_rows

TINY = [
    '--gin_file=models/tiny.gin',
    '--gin_file=models/moe_4e_top2.gin',
    '--mesh=2,4,1',
    '--batch_size=8',
    '--seq_len=16',
]


def _run(tmp_path, *flags):
  return tool_rows(tmp_path, 'bench_compile.py', *TINY, *flags, json_flag='--json_out')


@pytest.mark.slow  # two plan_memory subprocesses, each compiling a training step: ~30 s
def test_scanned_rows_have_numbers_and_a_table(tmp_path):
  rows, table = _run(tmp_path, '--layouts=scan', '--layers=2,4')
  assert [(r['layout'], r['num_layers'], r['scan_layers']) for r in rows] == [
      ('scan', 2, True),
      ('scan', 4, True),
  ]
  for r in rows:
    assert r['compile_seconds'] > 0 and r['xla_temp_bytes'] > 0, r
  # Twice the layers: twice the per-layer parameters (same embeddings and head).
  assert rows[1]['num_params'] > rows[0]['num_params']
  lines = table.splitlines()
  assert lines[0].split()[:4] == ['layout', 'layers', 'lower', 's']
  assert [line.split()[:2] for line in lines[2:4]] == [['scan', '2'], ['scan', '4']]
  assert lines[2].split()[4] == '1.00'  # The smallest depth is its layout's reference.


def test_a_configuration_past_the_timeout_is_reported_not_fatal(tmp_path):
  rows, table = _run(tmp_path, '--layouts=loop', '--layers=2', '--timeout=0.01')
  assert rows == [{'num_layers': 2, 'layout': 'loop', 'timed_out': 0.01}]
  assert table.splitlines()[2].split() == ['loop', '2', '>0']
