"""The tools/ scripts in the tests: tools/ on sys.path, so that a test imports a tool and calls
its `main` (`run_convert` for convert_checkpoint), or runs one as a subprocess (`run_tool`,
`tool_rows` for the benchmarks and planners); `cli_args` spells their command lines."""

import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tools'))
import convert_checkpoint  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# XLA:CPU at optimisation level 0 as in every test (conftest.py), without conftest's 8 host
# devices (a tool makes its own for its mesh): the smoke tests check rows, not their speed.
FAST_XLA_FLAGS = '--xla_backend_optimization_level=0'


def cli_args(*flags: str, **options: Any) -> List[str]:
  """A tool's command line: `--name value` for each of `options` (values as str), then `flags`,
  e.g. `cli_args('--merge_lora', source='unimoe', input=src)`."""
  argv = []
  for name, value in options.items():
    argv += [f'--{name}', str(value)]
  return argv + list(flags)


def run_convert(*flags: str, **options: Any) -> int:
  """`convert_checkpoint.main(cli_args(*flags, **options))`, e.g.
  `run_convert('--merge_lora', source='unimoe', input=src, output=out, dtype='float32')`."""
  return convert_checkpoint.main(cli_args(*flags, **options))


def tool_env(**overrides: str) -> Dict[str, str]:
  """This process's environment for a tool's subprocess: XLA_FLAGS = `FAST_XLA_FLAGS`, then
  `overrides`."""
  env = dict(os.environ, XLA_FLAGS=FAST_XLA_FLAGS)
  env.update(overrides)
  return env


def run_tool(cwd, script: str, *args, env=None, **run_kwargs) -> subprocess.CompletedProcess:
  """`python tools/<script> args...` in `cwd`, under `env` (default `tool_env()`)."""
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'tools', script), *map(str, args)],
      cwd=cwd,
      env=tool_env() if env is None else env,
      **run_kwargs,
  )


def tool_rows(
    tmp_path, script: str, *args, json_flag: str = '--json', **run_kwargs
) -> Tuple[Any, str]:
  """Runs `script` in `tmp_path` (`run_tool`) with its rows written as JSON (`json_flag
  PATH`); returns (the rows, its stdout). A failed run fails the test with the end of its
  stderr."""
  out = tmp_path / 'rows.json'
  proc = run_tool(
      tmp_path, script, *args, json_flag, out, capture_output=True, text=True, **run_kwargs
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout
