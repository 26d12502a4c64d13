"""What every state-dict converter shares: a reader that reports mismatches by name.

A state dict is a mapping from the source's tensor names to numpy arrays. Torch `nn.Linear`
stores `[out, in]`; our kernels are `[in, out]` (`linear_kernel`).
"""

from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np


class TensorReader:
  """Pops tensors by name, so that leftovers can be reported as unexpected.

  Missing tensors are collected (a zero placeholder is returned) and a wrong shape raises at
  once; `finish()` raises one ValueError naming every missing and unexpected tensor.
  """

  def __init__(self, state_dict: Mapping[str, np.ndarray], ignore_suffixes: Iterable[str] = ()):
    self._sd = dict(state_dict)
    self._ignore = tuple(ignore_suffixes)
    self.missing = []

  def pop(self, name: str, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    if name not in self._sd:
      self.missing.append(name)
      return np.zeros(shape or (0,), np.float32)
    value = np.asarray(self._sd.pop(name), dtype=np.float32)
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f'{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}')
    return value

  def has(self, name: str) -> bool:
    return name in self._sd

  def finish(self):
    unexpected = sorted(k for k in self._sd if not k.endswith(self._ignore))
    if self.missing or unexpected:
      raise ValueError(f'state dict does not match the model: missing {self.missing}, '
                       f'unexpected {unexpected}')


def convert_parts(steps: Sequence[Tuple[str, Callable[[], Any]]], headline: str,
                  errors: Sequence[str] = ()) -> Dict[str, Any]:
  """`{key: convert()}` for each `(key, convert)`, running every step even after one failed, so
  that one ValueError ("`headline`: key: message; ...") names every mismatch; `errors` are
  mismatches found before (reported first)."""
  errors = list(errors)
  params: Dict[str, Any] = {}
  for key, convert in steps:
    try:
      params[key] = convert()
    except ValueError as e:
      errors.append(f'{key}: {e}')
  if errors:
    raise ValueError(f'{headline}: ' + '; '.join(errors))
  return params


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight `[out, in]` -> our kernel `[in, out]`."""
  return np.ascontiguousarray(w.T)
