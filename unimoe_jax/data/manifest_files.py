"""Reading a manifest file into records: a JSON list, one JSON object or JSON lines, in UTF-8
with or without a byte-order mark, or UTF-16 with one (`read_manifest`). A record holding bytes
that are not UTF-8, or a JSONL line that is not JSON, is kept as one bad example for the
source to count or raise on (`manifest.py`), not an error of the whole file."""

import dataclasses
import json
from typing import Any, List, Optional

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
  """One record as read: `raw` is a JSON line (parsed lazily, so one bad line is one bad
  example) or an already parsed record of a JSON list."""

  path: str
  number: int  # 1-based line (JSONL) or record (JSON list)
  is_jsonl: bool
  raw: Any

  @property
  def location(self) -> str:
    return f'{self.path} {"line" if self.is_jsonl else "record"} {self.number}'


@dataclasses.dataclass(frozen=True)
class UndecodableRecord:
  """A JSONL line or JSON-list record holding bytes that are not UTF-8: a bad example."""

  detail: str


_BOMS = ((b'\xef\xbb\xbf', 'utf-8'), (b'\xff\xfe', 'utf-16-le'), (b'\xfe\xff', 'utf-16-be'))


def first_bad_byte(text: str) -> Optional[str]:
  """The first byte `surrogateescape` kept from a failed UTF-8 decode, as '0xff'; else None."""
  for ch in text:
    if '\udc80' <= ch <= '\udcff':
      return f'0x{ord(ch) - 0xdc00:02x}'
  return None


def _record_bytes_error(record) -> Optional[str]:
  """Why a parsed record (strings decoded with surrogateescape) is not valid UTF-8, or None."""
  bad = first_bad_byte(json.dumps(record, ensure_ascii=False))
  return None if bad is None else f'the record holds a byte that is not UTF-8 ({bad})'


def _looks_like_jsonl(text: str) -> bool:
  """Whether a text that is not one JSON document is JSON lines: its first non-blank line
  starts an object and holds more ('{"id": ...'); a pretty-printed object's first line is '{'
  alone (then the document's syntax error is reported)."""
  for line in text.split('\n'):
    line = line.strip()
    if line:
      return line.startswith('{') and line != '{'
  return False


def read_manifest(path: str) -> List[ManifestEntry]:
  """All entries of a manifest.

  Accepted: a JSON list of records (one line or pretty-printed), one JSON object (a single
  record, pretty-printed or not), or JSON lines (blank lines skipped; line numbers count
  them); UTF-8 with or without a byte-order mark, or UTF-16 with one. A JSONL line or a list
  record holding bytes that are not UTF-8 is a bad example (`UndecodableRecord`: skipped with
  on_bad_example='skip'); a JSONL line that is not JSON is one too (parsed lazily). A JSON
  document that cannot be parsed raises ValueError naming the file, line and column.
  """
  with tf.io.gfile.GFile(path, 'rb') as f:
    data = f.read()
  encoding = 'utf-8'
  for bom, bom_encoding in _BOMS:
    if data.startswith(bom):
      data, encoding = data[len(bom) :], bom_encoding
      break
  if encoding == 'utf-8':
    # Bytes that are not UTF-8 survive as lone surrogates and make their record bad.
    text = data.decode('utf-8', errors='surrogateescape')
  else:
    try:
      text = data.decode(encoding)
    except UnicodeDecodeError as e:
      raise ValueError(
          f'manifest {path}: starts with a {encoding} byte-order mark but is not '
          f'{encoding} (byte {e.start + 2}: {e.reason})'
      ) from None
  stripped = text.strip()
  if not stripped:
    return []
  document, error = None, None
  if stripped[0] in '[{':
    try:
      document = json.loads(stripped)
    except json.JSONDecodeError as e:
      error = e
  if error is None and document is not None:
    if isinstance(document, dict):  # One record: one JSONL line, a pretty-printed object.
      bad = _record_bytes_error(document)
      line = text[: len(text) - len(text.lstrip())].count('\n') + 1
      return [ManifestEntry(path, line, True, UndecodableRecord(bad) if bad else document)]
    entries = []
    for i, record in enumerate(document):
      bad = _record_bytes_error(record)
      entries.append(ManifestEntry(path, i + 1, False, UndecodableRecord(bad) if bad else record))
    return entries
  if stripped[0] == '[' or not _looks_like_jsonl(text):
    # text.lstrip() dropped leading whitespace: count the lines it held.
    offset = text[: len(text) - len(text.lstrip())].count('\n')
    where = (
        f'line {error.lineno + offset} column {error.colno}: {error.msg}'
        if error
        else 'it is neither a JSON list, one JSON object nor JSON lines'
    )
    raise ValueError(f'manifest {path} is not valid JSON ({where})')
  entries = []
  for i, line in enumerate(text.split('\n')):
    if not line.strip():
      continue
    line = line.rstrip('\r')
    bad = first_bad_byte(line)
    raw = UndecodableRecord(f'the line holds a byte that is not UTF-8 ({bad})') if bad else line
    entries.append(ManifestEntry(path, i + 1, True, raw))
  return entries
