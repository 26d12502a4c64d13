"""Checks of TASK_FEATURE_LENGTHS, shared by the gin flags (gin_utils.parse, before any
compute) and the feature converter (every path: training, eval, infer, Python callers).

No TensorFlow here: gin_utils imports it before the binaries import their libraries.
"""

from typing import Any, Dict, Mapping, Optional

EXAMPLE = "{'targets': 2048, 'image_features': 1}"


def _is_int(value: Any) -> bool:
  if isinstance(value, bool):
    return False
  if isinstance(value, int):
    return True
  try:  # numpy integers (seqio's Evaluator measures lengths with numpy)
    import numpy as np  # pylint: disable=g-import-not-at-top

    return isinstance(value, np.integer)
  except ImportError:  # pragma: no cover
    return False


def validate_task_feature_lengths(
    value: Any, name: str = 'TASK_FEATURE_LENGTHS', require_targets: bool = True
) -> Dict[str, Optional[int]]:
  """`value` as a dict, or ValueError naming `name` (the gin macro or flag).

  A length must be an int >= 0 (None: not measured, as seqio's Evaluator may pass for a
  feature); 'targets' (when present, and required with `require_targets`) must be >= 1.
  Feature names are not checked here (the Evaluator passes one per output feature); the
  training pipeline refuses unknown ones (`pipeline.modalities_of`).
  """
  if not isinstance(value, Mapping):
    raise ValueError(
        f'{name} must be a dict of feature lengths such as {EXAMPLE}, got '
        f'{type(value).__name__} {value!r:.200}'
    )
  for key, length in value.items():
    if not isinstance(key, str):
      raise ValueError(
          f'{name}: feature names must be strings such as {EXAMPLE}, got '
          f'{key!r} in {dict(value)}'
      )
    if length is None:
      continue
    if not _is_int(length):
      raise ValueError(
          f'{name}[{key!r}] must be an int (tokens for targets, items for '
          f'<m>_features), got {type(length).__name__} {length!r:.100}'
      )
    if length < 0:
      raise ValueError(f'{name}[{key!r}] must be >= 0, got {length}')
  if require_targets and value.get('targets') is None:
    raise ValueError(
        f'{name} needs a "targets" length (tokens per row), e.g. {EXAMPLE}; got ' f'{dict(value)}'
    )
  if value.get('targets') is not None and value['targets'] < 1:
    raise ValueError(f"{name}['targets'] must be >= 1 (tokens per row), got {value['targets']}")
  return dict(value)


__all__ = ['EXAMPLE', 'validate_task_feature_lengths']
