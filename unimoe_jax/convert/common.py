"""What every state-dict converter shares: a reader that reports mismatches by name, a writer
for the inverse direction, and the activation names of Hugging Face configs.

A state dict is a mapping from the source's tensor names to numpy arrays. Torch `nn.Linear`
stores `[out, in]`; our kernels are `[in, out]` (`linear_kernel`, `torch_linear_weight`).
"""

from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

# HF `hidden_act` / `activation_function` -> our activation name (encoder_blocks.ACTIVATIONS).
HF_ACTIVATIONS = {
    'gelu': 'gelu',
    'gelu_new': 'gelu_tanh',
    'gelu_pytorch_tanh': 'gelu_tanh',
    'quick_gelu': 'quick_gelu',
    'relu': 'relu',
}
# Ours -> HF: the first HF name of each of ours ('gelu_tanh' -> 'gelu_new').
TO_HF_ACTIVATIONS = {ours: hf for hf, ours in reversed(list(HF_ACTIVATIONS.items()))}


def fields_from_hf(
    hf: Mapping[str, Any], names: Mapping[str, str], defaults: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
  """`{our field: hf[its HF key]}` for each `(our field, HF key)` of `names`; the HF keys in
  `defaults` may be absent from `hf` and then take their default."""
  defaults = defaults or {}
  return {
      ours: hf.get(theirs, defaults[theirs]) if theirs in defaults else hf[theirs]
      for ours, theirs in names.items()
  }


def fields_to_hf(config: Any, names: Mapping[str, str]) -> Dict[str, Any]:
  """`fields_from_hf`'s inverse: `{HF key: config.<our field>}` for each pair of `names`."""
  return {theirs: getattr(config, ours) for ours, theirs in names.items()}


def hf_activation(act: str, where: str) -> str:
  """Our activation name -> the HF name, or ValueError naming `where` (the config field)."""
  if act not in TO_HF_ACTIVATIONS:
    raise ValueError(
        f'{where}: activation {act!r} has no Hugging Face name; '
        f'known: {sorted(TO_HF_ACTIVATIONS)}'
    )
  return TO_HF_ACTIVATIONS[act]


def ours_activation(hf_name: str, field: str) -> str:
  """A HF config's activation name -> ours, or ValueError naming the config `field`."""
  if hf_name not in HF_ACTIVATIONS:
    raise ValueError(f'{field}={hf_name!r} is not supported; known: {sorted(HF_ACTIVATIONS)}')
  return HF_ACTIVATIONS[hf_name]


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

  def linear(
      self, name: str, in_shape: Sequence[int], out_shape: Sequence[int], bias: bool = True
  ) -> Dict[str, np.ndarray]:
    """`TensorWriter.linear`'s inverse: torch's `{name}.weight [out, in]` (and `.bias [out]`)
    -> `{'kernel': [in..., out...], 'bias': [out...]}`, either side possibly split into heads."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    kernel = linear_kernel(self.pop(f'{name}.weight', (n_out, n_in)))
    p = {'kernel': kernel.reshape(tuple(in_shape) + tuple(out_shape))}
    if bias:
      p['bias'] = self.pop(f'{name}.bias', (n_out,)).reshape(out_shape)
    return p

  def layer_norm(self, name: str, width: int) -> Dict[str, np.ndarray]:
    """`TensorWriter.layer_norm`'s inverse: `{name}.weight` / `.bias` -> `scale` / `bias`."""
    return {
        'scale': self.pop(f'{name}.weight', (width,)),
        'bias': self.pop(f'{name}.bias', (width,)),
    }

  def finish(self):
    unexpected = sorted(k for k in self._sd if not k.endswith(self._ignore))
    if self.missing or unexpected:
      raise ValueError(
          f'state dict does not match the model: missing {self.missing}, '
          f'unexpected {unexpected}'
      )


def convert_parts(
    steps: Sequence[Tuple[str, Callable[[], Any]]], headline: str, errors: Sequence[str] = ()
) -> Dict[str, Any]:
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


def torch_linear_weight(kernel: np.ndarray) -> np.ndarray:
  """Our kernel `[in, out]` -> torch Linear weight `[out, in]` (`linear_kernel`'s inverse)."""
  return np.ascontiguousarray(np.asarray(kernel, np.float32).T)


class TensorWriter:
  """Builds a state dict from our params: each tensor is shape-checked against what the config
  says (ValueError naming the tensor otherwise) and stored float32, C-contiguous.

  `put` stores a tensor as is; `linear` a Dense (`kernel [in..., out...]`, optional `bias
  [out...]`, either side possibly split into heads) as torch's `weight [out, in]` / `bias
  [out]`; `layer_norm` a LayerNorm's `scale` / `bias` as `weight` / `bias`.
  """

  def __init__(self):
    self.state_dict: Dict[str, np.ndarray] = {}

  @staticmethod
  def checked(name: str, value: Any, shape: Sequence[int]) -> np.ndarray:
    value = np.ascontiguousarray(np.asarray(value, np.float32))
    if value.shape != tuple(shape):
      raise ValueError(f'{name}: expected shape {tuple(shape)}, got {value.shape}')
    return value

  def put(self, name: str, value: Any, shape: Sequence[int]) -> None:
    self.state_dict[name] = self.checked(name, value, shape)

  def linear(
      self,
      name: str,
      p: Mapping[str, Any],
      in_shape: Sequence[int],
      out_shape: Sequence[int],
      bias: bool = True,
  ) -> None:
    kernel = self.checked(
        f'{name}.weight (our kernel)', p['kernel'], tuple(in_shape) + tuple(out_shape)
    )
    n_out = int(np.prod(out_shape))
    self.state_dict[f'{name}.weight'] = torch_linear_weight(kernel.reshape(-1, n_out))
    if bias:
      self.state_dict[f'{name}.bias'] = self.checked(f'{name}.bias', p['bias'], out_shape).reshape(
          n_out
      )

  def layer_norm(self, name: str, p: Mapping[str, Any], width: int) -> None:
    self.put(f'{name}.weight', p['scale'], (width,))
    self.put(f'{name}.bias', p['bias'], (width,))
