r"""Compile time of the training step against depth, looped and scanned layers.

For each number of layers and each layout, runs `tools/plan_memory.py` in a fresh process
(abstract inputs only: no weights are allocated; the gin `MESH` is simulated with CPU
devices) and prints one table of lowering and compile seconds and per-device bytes:

  python tools/bench_compile.py                      # 7B width, 4 experts, 2 / 8 / 32 layers
  python tools/bench_compile.py --layers=2,32 --timeout=600 --fsdp
  python tools/bench_compile.py --gin_file=models/tiny.gin --gin_file=models/moe_4e_top2.gin \
      --mesh=2,4,1 --batch_size=8 --seq_len=64 --layers=2,8

The reference of the ratio column is the same layout's smallest depth, measured in the same
run: with looped layers compile time grows with depth, with scanned layers the body is
compiled once. A cell that ran past --timeout shows '>T'. Seconds are this machine's
(XLA:CPU compiling a partitioned program); a TPU compile differs in size but grows the same
way with the number of unrolled layers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import bench_common

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PLAN = os.path.join(_REPO, 'tools', 'plan_memory.py')


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
      '--gin_file',
      action='append',
      default=None,
      help='model gin files (default: models/unimoe_7b_4e.gin)',
  )
  parser.add_argument('--layers', default='2,8,32', help='comma-separated depths')
  parser.add_argument('--layouts', default='loop,scan', help="'loop', 'scan' or both")
  parser.add_argument(
      '--timeout',
      type=float,
      default=900.0,
      help='seconds per configuration before it is reported as >timeout',
  )
  parser.add_argument('--fsdp', action='store_true', help='plan with FSDP on')
  parser.add_argument('--json_out', default=None, help='also write all rows as JSON here')
  args, passthrough = parser.parse_known_args(argv)
  args.gin_file = args.gin_file or ['models/unimoe_7b_4e.gin']
  args.layers = [int(x) for x in args.layers.split(',')]
  args.layouts = args.layouts.split(',')
  bad = set(args.layouts) - {'loop', 'scan'}
  if bad:
    parser.error(f'--layouts: unknown {sorted(bad)}; use loop and/or scan')
  args.passthrough = passthrough  # e.g. --mesh, --batch_size, --seq_len, --gin.X=Y
  return args


def run_one(args, num_layers: int, layout: str) -> Dict:
  """plan_memory's numbers for one depth and layout, or {'timed_out': seconds}."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'plan.json')
    cmd = [
        sys.executable,
        _PLAN,
        f'--num_layers={num_layers}',
        f'--json_out={out}',
        f'--gin.config.DecoderConfig.scan_layers={layout == "scan"}',
    ]
    cmd += [f'--gin_file={f}' for f in args.gin_file]
    cmd += ['--fsdp' if args.fsdp else '--no_fsdp'] + list(args.passthrough)
    started = time.time()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
      return {'num_layers': num_layers, 'layout': layout, 'timed_out': args.timeout}
    if proc.returncode != 0:
      raise RuntimeError(
          f'plan_memory failed for {num_layers} layers ({layout}):\n' f'{proc.stderr[-3000:]}'
      )
    with open(out) as f:
      result = json.load(f)
  result.update(num_layers=num_layers, layout=layout, wall_seconds=round(time.time() - started, 1))
  return result


def _gib(n: Optional[float]) -> str:
  return '-' if n is None else f'{n / 2**30:.3f}'


def print_table(rows: List[Dict], timeout: float) -> None:
  first = {}
  for r in rows:
    if 'compile_seconds' in r:
      first.setdefault(r['layout'], r)
  header = (
      f"{'layout':<6}{'layers':>7}{'lower s':>10}{'compile s':>11}{'x smallest':>11}"
      f"{'params GiB':>12}{'opt GiB':>10}{'temp GiB':>10}"
  )
  print(header)
  print('-' * len(header))
  for r in rows:
    if 'timed_out' in r:
      print(f"{r['layout']:<6}{r['num_layers']:>7}{'':>10}{'>' + str(int(timeout)):>11}")
      continue
    ref = first[r['layout']]
    ratio = r['compile_seconds'] / max(ref['compile_seconds'], 1e-9)
    print(
        f"{r['layout']:<6}{r['num_layers']:>7}{r['lower_seconds']:>10.1f}"
        f"{r['compile_seconds']:>11.1f}{ratio:>11.2f}{_gib(r['params_bytes']):>12}"
        f"{_gib(r['opt_state_bytes']):>10}{_gib(r['xla_temp_bytes']):>10}"
    )
  if rows:
    r = next((x for x in rows if 'mesh' in x), None)
    if r:
      mesh = ' '.join(f'{k}={v}' for k, v in r['mesh'].items())
      print(
          f"mesh {mesh}; batch {r['batch_size']} x {r['seq_len']}; "
          f"FSDP {'on' if r['fsdp'] else 'off'}; x smallest: compile seconds over the same "
          "layout's smallest depth"
      )


def main(argv=None) -> List[Dict]:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  rows = []
  for layout in args.layouts:
    for num_layers in args.layers:
      rows.append(run_one(args, num_layers, layout))
      print(
          f'# {layout} {num_layers} layers: '
          f"{rows[-1].get('compile_seconds', '>' + str(args.timeout))} s compile",
          file=sys.stderr,
          flush=True,
      )
  print_table(rows, args.timeout)
  bench_common.write_json(args.json_out, rows)
  return rows


if __name__ == '__main__':
  main()
