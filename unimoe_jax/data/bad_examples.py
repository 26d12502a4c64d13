"""Bad examples of a data source: the error that names one, and the thread-safe count of those
dropped (`BAD_EXAMPLES`, the manifest sources'; `manifest.py` documents the policy). The same
counter counts the examples too long for their task (`preprocessors.DROPPED_TOO_LONG`) and for
one packed row (`feature_converter.OVERSIZE_DROPS`)."""

import collections
import threading
from typing import Any, Dict, Optional


class BadExampleError(ValueError):
  """A manifest record that cannot become an example. `reason` is the counter key."""

  def __init__(self, location: str, reason: str, detail: str):
    self.location = location
    self.reason = reason
    self.detail = detail
    super().__init__(f'bad example at {location}: {reason}: {detail}')


class BadExampleCounter:
  """Thread-safe counts of dropped examples by reason (tf.data maps run in several threads).

  With a `key` (the manifest BAD_EXAMPLES uses (manifest path, line or record)), an example
  counts once however often it is read: every epoch of a repeated dataset, the pipeline's
  look-ahead checks and the training stream all read the same bad line. `reads` counts every
  call. Without a key (DROPPED_TOO_LONG, OVERSIZE_DROPS) every call counts.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._counts = collections.Counter()
    self._seen: Dict[Any, str] = {}
    self._reads = 0

  def add(self, reason: str, count: int = 1, key: Any = None) -> int:
    """Adds `count` to `reason` (once per `key` when one is given); returns the new total
    over all reasons."""
    with self._lock:
      self._reads += count
      if key is None or key not in self._seen:
        if key is not None:
          self._seen[key] = reason
        self._counts[reason] += count
      return sum(self._counts.values())

  def seen(self, key: Any) -> bool:
    with self._lock:
      return key in self._seen

  def counts(self, source: Optional[str] = None) -> Dict[str, int]:
    """Counts by reason; with `source`, of the keyed examples whose key starts with it
    (BAD_EXAMPLES: one manifest's bad examples)."""
    with self._lock:
      if source is None:
        return dict(self._counts)
      return dict(
          collections.Counter(
              reason
              for key, reason in self._seen.items()
              if isinstance(key, tuple) and key[0] == source
          )
      )

  @property
  def total(self) -> int:
    with self._lock:
      return sum(self._counts.values())

  @property
  def reads(self) -> int:
    """Every `add`, repeated reads of one example included."""
    with self._lock:
      return self._reads

  def reset(self) -> None:
    with self._lock:
      self._counts.clear()
      self._seen.clear()
      self._reads = 0


BAD_EXAMPLES = BadExampleCounter()
