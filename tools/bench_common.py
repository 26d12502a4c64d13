"""What the benchmarks and planners in tools/ share (bench_compile, bench_data, bench_decode,
bench_moe, plan_memory): a sibling module, imported as `bench_common`, since a script run as
`python tools/<tool>.py` (and a test that puts tools/ on sys.path) finds it next to the tool."""

import json
import statistics
import time
from typing import Any, Callable, List, Optional, Tuple


def write_json(path: Optional[str], rows: Any) -> None:
  """Writes `rows` as JSON (indent 1) to `path` (a tool's --json / --json_out); no path, no
  file."""
  if path:
    with open(path, 'w') as f:
      json.dump(rows, f, indent=1)


def call_seconds(fn: Callable[[], Any], iters: int, warmup: int) -> List[float]:
  """Seconds of each of `iters` timed calls of `fn`, after `warmup` untimed ones (wall clock)."""
  for _ in range(warmup):
    fn()
  seconds = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return seconds


def median_min_ms(fn: Callable[[], Any], iters: int, warmup: int) -> Tuple[float, float]:
  """(median, min) milliseconds of one call of `fn` (`call_seconds`)."""
  seconds = call_seconds(fn, iters, warmup)
  return 1e3 * statistics.median(seconds), 1e3 * min(seconds)
