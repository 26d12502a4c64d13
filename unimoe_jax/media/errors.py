"""The one error type every media loader raises, so callers can skip a bad sample by catching it."""

import os
from typing import Union

PathLike = Union[str, os.PathLike]


class MediaError(ValueError):
  """A media file that cannot be used: missing, empty, undecodable, or of zero length.

  The message always names the file and the reason, e.g.
  "cannot decode image /x/y.jpg: cannot identify image file". `path` and `reason` are kept as
  attributes so a data pipeline can log or count failures without parsing the message.
  """

  def __init__(self, kind: str, path: PathLike, reason: str):
    self.kind = kind
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f'cannot decode {kind} {self.path}: {reason}')


def check_readable_file(kind: str, path: PathLike) -> str:
  """Returns `path` as a str after the checks every loader shares (exists, is a file, not empty)."""
  try:
    path = os.fspath(path)
  except TypeError as e:
    raise MediaError(kind, repr(path), f'not a path ({e})') from None
  if not os.path.exists(path):
    raise MediaError(kind, path, 'no such file')
  if not os.path.isfile(path):
    raise MediaError(kind, path, 'not a regular file')
  if os.path.getsize(path) == 0:
    raise MediaError(kind, path, 'empty file (0 bytes)')
  return path
