"""What the benchmarks and planners in tools/ share (bench_compile, bench_data, bench_decode,
bench_moe, plan_memory): a sibling module, imported as `bench_common`, since a script run as
`python tools/<tool>.py` (and a test that puts tools/ on sys.path) finds it next to the tool."""

import json
from typing import Any, Optional


def write_json(path: Optional[str], rows: Any) -> None:
  """Writes `rows` as JSON (indent 1) to `path` (a tool's --json / --json_out); no path, no
  file."""
  if path:
    with open(path, 'w') as f:
      json.dump(rows, f, indent=1)
