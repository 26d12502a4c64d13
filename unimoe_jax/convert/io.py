"""Reading a local Hugging Face checkpoint directory tensor by tensor (`save_pretrained` layout).

A directory holds `config.json` and the weights as safetensors or PyTorch `.bin`, either in one
file or sharded with a `*.index.json` weight map. `open_state_dict` returns a `LazyStateDict`:
a mapping from tensor names to `LazyTensor`s that know their shape and dtype but read their data
only when converted with `np.asarray` (which `TensorReader.pop` does). A converter therefore holds
at most its float32 output plus one source tensor, never the whole checkpoint twice.

safetensors files are memory-mapped through their documented layout (8-byte little-endian
header size, JSON header, raw little-endian data), which also covers bfloat16 that numpy lacks.
`.bin` files are opened with `torch.load(mmap=True, weights_only=True)`; torch is imported only
when such a file is read (the converters themselves stay numpy-only).
"""

import json
import os
import resource
import struct
import sys
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

CONFIG_FILE = 'config.json'
_SAFETENSORS_DTYPES = {
    'F64': np.float64,
    'F32': np.float32,
    'F16': np.float16,
    'BF16': np.uint16,
    'I64': np.int64,
    'I32': np.int32,
    'I16': np.int16,
    'I8': np.int8,
    'U8': np.uint8,
    'BOOL': np.bool_,
}
# Single-file and sharded names, in the order `save_pretrained` prefers them.
_WEIGHT_FILES = (
    ('model.safetensors.index.json', 'model.safetensors'),
    ('pytorch_model.bin.index.json', 'pytorch_model.bin'),
)


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
  """bfloat16 is the top half of a float32: widen the raw uint16 bits."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


class LazyTensor:
  """One tensor of a checkpoint file; `np.asarray(t)` reads it (float32 for bfloat16)."""

  def __init__(self, shape: Sequence[int], dtype: str, load):
    self.shape = tuple(int(s) for s in shape)
    self.dtype = dtype
    self.ndim = len(self.shape)
    self._load = load

  def __array__(self, dtype=None, copy=None):
    del copy  # The result is always a fresh array or a read-only map of the file.
    value = self._load()
    return value if dtype is None else value.astype(dtype, copy=False)

  def __repr__(self):
    return f'LazyTensor(shape={self.shape}, dtype={self.dtype})'


def _safetensors_entries(path: str) -> Dict[str, LazyTensor]:
  """The file's tensors, checked against its size first: a truncated or damaged file is a
  ValueError naming it (and the tensor), not a bare struct / JSON / mmap error later."""
  size = os.path.getsize(path)
  try:
    with open(path, 'rb') as f:
      (header_size,) = struct.unpack('<Q', f.read(8))
      if 8 + header_size > size:
        raise ValueError(f'its header claims {header_size} bytes')
      header = json.loads(f.read(header_size))
  except (struct.error, ValueError, UnicodeDecodeError) as e:
    raise ValueError(
        f'{path}: not a readable safetensors file ({size} bytes; truncated or ' f'damaged?): {e}'
    ) from None
  data_start = 8 + header_size
  entries = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _SAFETENSORS_DTYPES:
      raise ValueError(f'{path}: tensor {name} has unsupported dtype {info["dtype"]}')
    begin, end = info['data_offsets']
    itemsize = np.dtype(_SAFETENSORS_DTYPES[info['dtype']]).itemsize
    if data_start + end > size or end - begin != int(np.prod(info['shape'])) * itemsize:
      raise ValueError(
          f'{path}: tensor {name} {info["dtype"]}{list(info["shape"])} lies at '
          f'bytes {data_start + begin}..{data_start + end} of a {size}-byte file '
          '(truncated or damaged?)'
      )

    def load(info=info, begin=begin, end=end):
      np_dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
      count = (end - begin) // np_dtype.itemsize
      if count == 0:
        return np.zeros(info['shape'], np_dtype)
      value = np.memmap(
          path, dtype=np_dtype, mode='r', offset=data_start + begin, shape=(count,)
      ).reshape(info['shape'])
      return _bfloat16_to_float32(value) if info['dtype'] == 'BF16' else np.asarray(value)

    entries[name] = LazyTensor(info['shape'], info['dtype'], load)
  return entries


def _torch_bin_entries(path: str) -> Dict[str, LazyTensor]:
  import torch  # pylint: disable=g-import-not-at-top  # Only .bin checkpoints need it.

  try:
    tensors = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
  except (RuntimeError, OSError):  # Old (non-zip) serialisation cannot be memory-mapped.
    try:
      tensors = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f'{path}: not a readable PyTorch checkpoint file '
          f'({os.path.getsize(path)} bytes; truncated or damaged?): '
          f'{type(e).__name__}: {e}'
      ) from None
  entries = {}
  for name, t in tensors.items():
    if not isinstance(t, torch.Tensor):
      continue

    def load(t=t):
      if t.dtype == torch.bfloat16:
        return t.float().numpy()
      return t.numpy()

    entries[name] = LazyTensor(tuple(t.shape), str(t.dtype).replace('torch.', ''), load)
  return entries


def file_entries(path: str) -> Dict[str, LazyTensor]:
  """The tensors of one `.safetensors` or `.bin`/`.pt`/`.pth` file."""
  if path.endswith('.safetensors'):
    return _safetensors_entries(path)
  if path.endswith(('.bin', '.pt', '.pth')):
    return _torch_bin_entries(path)
  raise ValueError(f'{path}: not a .safetensors or .bin checkpoint file')


class LazyStateDict(Mapping[str, LazyTensor]):
  """Tensor name -> `LazyTensor` over one or more files; `files` lists where they come from.

  Later files override earlier ones for a name they share (`merge`).
  """

  def __init__(self, entries: Optional[Dict[str, LazyTensor]] = None, files: Sequence[str] = ()):
    self._entries: Dict[str, LazyTensor] = dict(entries or {})
    self.files: List[str] = list(files)

  def __getitem__(self, name: str) -> LazyTensor:
    return self._entries[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def merge(self, other: 'LazyStateDict') -> 'LazyStateDict':
    return LazyStateDict({**self._entries, **other._entries}, self.files + other.files)

  def renamed(self, rename) -> 'LazyStateDict':
    """The same tensors under `rename(name)`; two names mapping to one is an error."""
    out: Dict[str, LazyTensor] = {}
    for name, value in self._entries.items():
      new = rename(name)
      if new in out:
        raise ValueError(f'two tensors are both named {new!r} after renaming (one is {name!r})')
      out[new] = value
    return LazyStateDict(out, self.files)


def open_files(paths: Sequence[str]) -> LazyStateDict:
  """The tensors of several files; a name present twice must not occur."""
  entries: Dict[str, LazyTensor] = {}
  for path in paths:
    for name, value in file_entries(path).items():
      if name in entries:
        raise ValueError(f'tensor {name} appears in more than one file (again in {path})')
      entries[name] = value
  return LazyStateDict(entries, paths)


def weight_files(directory: str) -> List[str]:
  """The model weight files of a `save_pretrained` directory (shards in index order)."""
  for index_name, single_name in _WEIGHT_FILES:
    index_path = os.path.join(directory, index_name)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)['weight_map']
      shards = sorted(set(weight_map.values()))
      missing = [s for s in shards if not os.path.exists(os.path.join(directory, s))]
      if missing:
        raise FileNotFoundError(f'{index_path} names shards that do not exist: {missing}')
      return [os.path.join(directory, s) for s in shards]
    single_path = os.path.join(directory, single_name)
    if os.path.exists(single_path):
      return [single_path]
  raise FileNotFoundError(
      f'{directory}: no model.safetensors, pytorch_model.bin or their *.index.json'
  )


def open_state_dict(directory: str) -> LazyStateDict:
  """The model weights of a `save_pretrained` directory, read lazily."""
  return open_files(weight_files(directory))


def read_config(directory: str) -> Dict[str, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{directory}: no {CONFIG_FILE}')
  with open(path) as f:
    return json.load(f)


def read_json_if_present(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def peak_rss_bytes() -> int:
  """The peak resident set size of this process so far (ru_maxrss: KiB on Linux, B on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == 'darwin' else peak * 1024)


def total_bytes(state_dict: Mapping[str, LazyTensor]) -> Tuple[int, int]:
  """(tensor count, parameter count) of a lazy state dict, without reading it."""
  return len(state_dict), int(sum(int(np.prod(t.shape)) for t in state_dict.values()))
