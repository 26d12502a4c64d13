"""t5x-style command lines for gin: `--gin_file` (repeatable), `--gin.NAME=VALUE`,
`--gin_bindings`, `--gin_search_paths`, with errors before any compute.

Gin already rejects an unknown configurable or parameter (`--gin.train.train_step=5`). A
misspelt *macro* (`--gin.TRAIN_STEP=5`) would silently define a new macro that nothing reads;
`parse` rejects that too, naming the closest macro the configuration does use. A binding that
gin cannot parse (`--gin.TASK_FEATURE_LENGTHS="{'targets': 128"`) is named with its value, and
the length macros (`TASK_FEATURE_LENGTHS`, `EVAL_TASK_FEATURE_LENGTHS`) are checked
(`data/lengths.py`: a dict of non-negative ints with a positive 'targets').
"""

import ast
import contextlib
import difflib
import importlib
import logging
import os
import re
import tokenize
from typing import Iterable, List, Sequence, Tuple

import gin
from gin import config as gin_config
from gin import config_parser

import unimoe_jax

_GIN_FLAG = re.compile(r'^--gin\.([^=]+)=(.*)$', re.DOTALL)


def split_gin_args(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """(other args, gin bindings): `--gin.NAME=VALUE` becomes the binding `NAME = VALUE`."""
  rest, bindings = [], []
  for arg in argv:
    match = _GIN_FLAG.match(arg)
    if match:
      bindings.append(f'{match.group(1)} = {match.group(2)}')
    else:
      rest.append(arg)
  return rest, bindings


def _referenced_macros(value, found):
  if isinstance(value, gin_config.ConfigurableReference):
    if value.scoped_selector.endswith('/gin.macro'):
      found.add(value.scoped_selector.rsplit('/', 1)[0])
    return
  if isinstance(value, dict):
    for v in value.values():
      _referenced_macros(v, found)
  elif isinstance(value, (list, tuple, set)):
    for v in value:
      _referenced_macros(v, found)


def referenced_macros() -> set:
  found = set()
  for params in gin_config._CONFIG.values():  # pylint: disable=protected-access
    _referenced_macros(params, found)
  return found


def task_modules(
    bindings: Sequence[str], default: Sequence[str] = ('unimoe_jax.tasks',)
) -> List[str]:
  """Modules that register tasks: the default plus any `MIXTURE_OR_TASK_MODULE` binding."""
  modules = list(default)
  for binding in bindings:
    name, _, value = binding.partition('=')
    if name.strip() == 'MIXTURE_OR_TASK_MODULE':
      try:
        value = ast.literal_eval(value.strip())
      except (ValueError, SyntaxError) as e:
        raise ValueError(
            f'MIXTURE_OR_TASK_MODULE must be a quoted module name, got ' f'{value.strip()}'
        ) from e
      modules.extend([value] if isinstance(value, str) else list(value))
  return modules


class _AcceptAll(config_parser.ParserDelegate):
  """Parses references and macros without resolving them (syntax checks only)."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return None

  def macro(self, macro_name):
    return None


def check_binding_syntax(bindings: Sequence[str]) -> None:
  """Raises ValueError naming the first binding gin cannot parse (gin's own error names none:
  "EOF in multi-line statement", "Expected ',' or '}'. (line 1)")."""
  for binding in bindings:
    try:
      for _ in config_parser.ConfigParser(binding, _AcceptAll()):
        pass
    except (SyntaxError, tokenize.TokenError, ValueError) as e:
      name = binding.split('=', 1)[0].strip()
      detail = (
          e.msg
          if isinstance(e, SyntaxError)
          else (e.args[0] if isinstance(e, tokenize.TokenError) else str(e))
      )
      raise ValueError(
          f'gin binding {name}: cannot parse {binding!r}: {detail} (a value is '
          "a Python literal, e.g. --gin.TASK_FEATURE_LENGTHS=\"{'targets': "
          "2048, 'image_features': 1}\"; strings need quotes inside the shell "
          'quotes)'
      ) from None


LENGTH_MACROS = ('TASK_FEATURE_LENGTHS', 'EVAL_TASK_FEATURE_LENGTHS')


def _macro_value(name: str, hops: int = 10):
  """The value bound to macro `name` (following `%OTHER`), or None when unbound or required."""
  for _ in range(hops):
    try:
      value = gin.query_parameter(f'{name}/macro.value')
    except ValueError:
      return None
    if not isinstance(value, gin_config.ConfigurableReference):
      return value
    selector = value.scoped_selector
    if not selector.endswith('/gin.macro'):
      return None  # gin.REQUIRED, or a configurable's result
    name = selector.rsplit('/', 1)[0]
  return None


def check_length_macros() -> None:
  """ValueError naming the macro when a bound TASK_FEATURE_LENGTHS (or the eval one) is not a
  dict of non-negative int lengths with a positive 'targets'."""
  from unimoe_jax.data import lengths  # pylint: disable=g-import-not-at-top

  for name in LENGTH_MACROS:
    value = _macro_value(name)
    if value is not None:  # unbound, gin.REQUIRED or None (EVAL_...: the training lengths)
      lengths.validate_task_feature_lengths(value, name)


class _SearchPathProbeFilter(logging.Filter):
  """Drops gin's ERROR-level `Path not found: F` records: gin logs one for each search path
  that does *not* hold F (gin/resource_reader.py probes it as a Python package) before it opens
  F from the path that does, so every good run printed them. A file found nowhere is still an
  error: gin raises `Unable to open file: F. Searched config paths: [...]`."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (
        record.msg == 'Path not found: %s'
        and record.pathname.endswith(os.path.join('gin', 'resource_reader.py'))
    )


@contextlib.contextmanager
def _quiet_search_path_probes():
  probe_filter = _SearchPathProbeFilter()
  root = logging.getLogger()  # gin's resource reader logs through the root logger.
  root.addFilter(probe_filter)
  try:
    yield
  finally:
    root.removeFilter(probe_filter)


def parse(
    gin_files: Sequence[str],
    bindings: Sequence[str],
    search_paths: Iterable[str] = (),
    import_modules: Sequence[str] = (),
) -> None:
  """Parses files then bindings (in order), like t5x; finalizes the config.

  `import_modules` (e.g. `task_modules(bindings)`) are imported first, so that their
  configurables (a task's data folder, ...) can be bound. Raises gin's own error for unknown
  names, and ValueError for a binding gin cannot parse, a binding of a macro that no
  configuration references, or a length macro that is not a dict of lengths.
  """
  for module in import_modules:
    importlib.import_module(module)
  for path in list(search_paths) + unimoe_jax.gin_search_paths():
    gin.add_config_file_search_path(path)
  check_binding_syntax(bindings)
  with _quiet_search_path_probes():
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
  used = referenced_macros()
  for binding in bindings:
    name = binding.split('=', 1)[0].strip()
    if '.' in name or '/' in name or not name.isidentifier():
      continue
    if name not in used:
      close = difflib.get_close_matches(name, sorted(used - {name}), n=3)
      hint = f'; did you mean {" or ".join(close)}?' if close else ''
      raise ValueError(f'gin binding {name} = ... sets a macro that no configuration uses{hint}')
  check_length_macros()
  gin.finalize()
