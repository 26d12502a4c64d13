"""tools/bench_data.py runs end to end with --quick (a smoke test: nothing is compared for speed).

Most of its time is importing transformers/torch, writing the inputs and starting the Pool workers.
"""

import re

import pytest

from tool_runs import tool_env, tool_rows

pytest.importorskip('transformers')
pytest.importorskip('av')
pytest.importorskip('soundfile')

# (case, implementation prefix, has a transformers reference), in the printed order: each image
# case times transformers' processor and ours (as bench_data's loop over the cases does), then
# the jpeg crop case times the two Pool variants.
EXPECTED_ROWS = [
    *[
        (f'image {kind} {mode}', implementation, True)
        for kind, mode in (('jpeg', 'crop'), ('jpeg', 'pad'), ('png', 'crop'))
        for implementation in (
            'transformers CLIPImageProcessor',
            f'unimoe_jax preprocess_image({mode})',
        )
    ],
    ('image jpeg crop', 'unimoe_jax Pool x2 (arrays returned)', True),
    ('image jpeg crop', 'unimoe_jax Pool x2 (arrays kept in workers)', True),
    ('speech (whisper)', 'transformers WhisperFeatureExtractor', True),
    ('speech (whisper)', 'unimoe_jax whisper_log_mel', True),
    ('audio (beats)', 'unimoe_jax beats_fbank', False),
    ('video', 'load_video_frames + transformers CLIPImageProcessor', True),
    ('video', 'unimoe_jax load_video_frames + preprocess_video', True),
]


@pytest.mark.slow  # 13-22 s on the 2-core machine, depending on other load
def test_bench_data_quick_prints_every_row(tmp_path):
  env = tool_env()
  env.pop('JAX_PLATFORMS', None)
  written, stdout = tool_rows(
      tmp_path, 'bench_data.py', *'--quick --iters 2 --workers 2'.split(), env=env
  )
  table = stdout[stdout.index('modality') :].splitlines()
  assert len(table) == 2 + len(EXPECTED_ROWS), stdout
  for line, (case, implementation, has_reference) in zip(table[2:], EXPECTED_ROWS):
    assert line.startswith(case) and implementation in line, (line, case, implementation)
    # The last column: 'N.NNx' with a positive ratio, or '-' where there is no reference.
    last = line.split()[-1]
    if has_reference:
      assert re.fullmatch(r'\d+\.\d\dx', last), line
      assert float(last[:-1]) > 0, line
    else:
      assert last == '-', line
    numbers = [float(v) for v in line[len(case) :].split()[-4:-1] if v != '-']
    assert numbers and all(v > 0 for v in numbers), line

  rows = written['rows']
  assert [(r['case'], r['implementation']) for r in rows] == [
      (line[:18].strip(), line[19:73].strip()) for line in table[2:]
  ]
  for row in rows:
    assert row['examples_per_s'] > 0 and row['ms_per_example'] > 0, row
    assert row['examples_per_s'] == pytest.approx(1e3 / row['ms_per_example'])
    if row['reference']:
      assert row['vs_transformers'] == 1.0, row
    elif row['case'] == 'audio (beats)':
      assert row['vs_transformers'] is None, row
    else:
      reference = next(r for r in rows if r['reference'] and r['case'] == row['case'])
      assert row['vs_transformers'] == pytest.approx(
          row['examples_per_s'] / reference['examples_per_s']
      )
