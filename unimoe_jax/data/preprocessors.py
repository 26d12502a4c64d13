"""seqio preprocessors for the manifest examples (usable in a Task's `preprocessors` list).

seqio passes `sequence_length` to a preprocessor that names it; the keys used here are the ones
of `task_feature_lengths`: 'targets' (tokens) and '<m>_features' (items of modality m).
"""

from typing import Mapping, Optional

from absl import logging
import tensorflow as tf

from unimoe_jax.data.manifest import BadExampleCounter

# Examples `drop_too_long` dropped, by reason ('targets', '<m>_features').
DROPPED_TOO_LONG = BadExampleCounter()


def _count_drop(reason: bytes) -> bool:
  reason = reason.decode() if isinstance(reason, bytes) else str(reason)
  total = DROPPED_TOO_LONG.add(reason)
  if total & (total - 1) == 0:  # 1, 2, 4, 8, ...: a running total without a line per drop
    logging.warning('drop_too_long: %d examples dropped so far (%s)', total,
                    DROPPED_TOO_LONG.counts())
  return False


def drop_too_long(dataset: tf.data.Dataset,
                  sequence_length: Optional[Mapping[str, int]] = None) -> tf.data.Dataset:
  """Drops (never cuts) examples whose targets or items exceed `sequence_length`.

  An example that does not fit cannot be packed without splitting it or losing items, which
  would break the placeholder/item alignment. Drops are counted in `DROPPED_TOO_LONG` by the
  first feature that did not fit and logged at running totals 1, 2, 4, ...

  Args:
    dataset: examples with 'targets' `[length]` and '<m>_features' `[items, ...]`.
    sequence_length: {'targets': L, '<m>_features': max_items, ...}; missing keys (or None)
      are not checked.
  """
  if not sequence_length:
    return dataset
  limits = {k: v for k, v in sequence_length.items()
            if v is not None and k in dataset.element_spec}

  def fits(example):
    ok = tf.constant(True)
    reason = tf.constant('')
    # Checked in a fixed order so the counted reason is reproducible.
    for key in sorted(limits):
      too_long = tf.shape(example[key])[0] > limits[key]
      reason = tf.where(tf.logical_and(ok, too_long), tf.constant(key), reason)
      ok = tf.logical_and(ok, tf.logical_not(too_long))
    return tf.cond(ok, lambda: tf.constant(True),
                   lambda: tf.reshape(
                       tf.numpy_function(_count_drop, [reason], tf.bool, stateful=True), []))

  return dataset.filter(fits)


def cast_features(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Casts 'targets' to int32, 'loss_weights' and '*_features' to float32 (examples from other
  sources, e.g. cached ones, may have been stored wider)."""

  def cast(example):
    out = dict(example)
    for key, value in example.items():
      if key == 'targets':
        out[key] = tf.cast(value, tf.int32)
      elif key == 'loss_weights' or key.endswith('_features'):
        out[key] = tf.cast(value, tf.float32)
    return out

  return dataset.map(cast, num_parallel_calls=tf.data.AUTOTUNE)

