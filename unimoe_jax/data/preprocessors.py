"""seqio preprocessors for the manifest examples (usable in a Task's `preprocessors` list).

seqio passes `sequence_length` to a preprocessor that names it; the keys used here are the ones
of `task_feature_lengths`: 'targets' (tokens) and '<m>_features' (items of modality m).

Also the two guards the feature converter shares with `drop_too_long`:
  - `filter_failing_fast`: a filter that raises once the first `max_leading_drops` examples of
    a dataset were all dropped. seqio repeats a training dataset *before* its preprocessors,
    so a filter that drops every example would otherwise spin forever on the repeated input
    (t5x logs "drop_too_long: 8192 examples dropped so far" and never trains).
  - `assert_fits`: a map that raises on the first example that does not fit, which keeps the
    dataset's cardinality (t5x's inference calls `len(ds)`; a filter makes it unknown).
"""

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from absl import logging
import gin
import numpy as np
import tensorflow as tf

from unimoe_jax.data import conversation as conversation_lib
from unimoe_jax.data import vocabulary as vocabulary_lib
from unimoe_jax.modalities import MODALITIES
from unimoe_jax.data.bad_examples import BadExampleCounter

# Examples `drop_too_long` dropped, by reason ('targets', '<m>_features').
DROPPED_TOO_LONG = BadExampleCounter()

# Default of `drop_too_long.max_leading_drops` and of the feature converter's: a dataset whose
# first 128 examples are all dropped raises. Sized for the 60 s a user waits for a first
# batch: at the ~8 examples/s that t5x.train loaded a media mixture at, 128 examples take ~16 s
# (the sample data loads ~100/s on 2 cores). Larger values tolerate data sorted by length.
MAX_LEADING_DROPS = 128

ON_TOO_LONG = ('drop', 'raise')
UNFED_MEDIA = ('raise', 'ignore')
PRETOKENIZED_FEATURES = ('inputs_pretokenized', 'targets_pretokenized')

Limits = Sequence[Tuple[str, int]]


# ----------------------------------------------------------------------------------------------
# Guards shared with the feature converter.


def describe_sizes(limits: Limits, mins, maxs, over) -> str:
  """ "'targets' (limit 16) was 40..212 in them, over the limit in 128" for each feature that
  was over its limit in some dropped example (the others fit)."""
  parts = []
  for k, (name, limit) in enumerate(limits):
    if over[k]:
      sizes = f'{int(mins[k])}' if mins[k] == maxs[k] else f'{int(mins[k])}..{int(maxs[k])}'
      parts.append(
          f'{name!r} (limit {limit}) was {sizes} in them, over the limit in ' f'{int(over[k])}'
      )
  return '; '.join(parts)


def filter_failing_fast(
    dataset: tf.data.Dataset,
    sizes_fn: Callable[[Dict[str, tf.Tensor]], tf.Tensor],
    limits: Limits,
    record_drop: Callable[[np.ndarray], None],
    failure: Callable[[int, str], str],
    max_leading_drops: int = MAX_LEADING_DROPS,
) -> tf.data.Dataset:
  """Keeps the examples whose sizes are within `limits`; fails fast when none ever fits.

  The counts live in a `Dataset.scan` state, so they belong to one iterator of this dataset
  (one task of a mixture: each task's dataset has its own) and run on across the epochs of a
  dataset repeated before this filter. The drop that makes `max_leading_drops` drops before
  any kept example raises (a tf.errors.InvalidArgumentError carrying the message; tf.data may
  pull and record a few more elements in the background first). Kept examples cost no Python
  call.

  Args:
    dataset: examples (dicts).
    sizes_fn: example -> int32 `[K]`, the sizes compared with `limits` (in their order).
    limits: K (name, limit) pairs, e.g. (('targets', 128), ('image_features', 1)).
    record_drop: called in Python with the sizes `[K]` of each dropped example (counting,
      logging).
    failure: (examples dropped, `describe_sizes` of the dropped examples) -> error message.
    max_leading_drops: drops before the first kept example that raise; 0 never raises.
  """
  limit_vector = tf.constant([int(v) for _, v in limits], tf.int32)
  k = len(limits)
  big = np.iinfo(np.int32).max
  initial = (
      tf.constant(0, tf.int64),
      tf.constant(0, tf.int64),
      tf.fill([k], big),
      tf.fill([k], tf.constant(-1, tf.int32)),
      tf.zeros([k], tf.int64),
  )

  def drop(sizes, kept, dropped, mins, maxs, over):
    record_drop(sizes)
    if max_leading_drops > 0 and kept == 0 and dropped >= max_leading_drops:
      raise ValueError(failure(int(dropped), describe_sizes(limits, mins, maxs, over)))
    return np.bool_(False)

  def step(state, example):
    kept, dropped, mins, maxs, over = state
    sizes = tf.cast(sizes_fn(example), tf.int32)
    too_big = sizes > limit_vector
    fits = tf.logical_not(tf.reduce_any(too_big))
    dropped += tf.cast(tf.logical_not(fits), tf.int64)
    mins = tf.where(fits, mins, tf.minimum(mins, sizes))
    maxs = tf.where(fits, maxs, tf.maximum(maxs, sizes))
    over += tf.cast(too_big, tf.int64)
    keep = tf.cond(
        fits,
        lambda: tf.constant(True),
        lambda: tf.reshape(
            tf.numpy_function(
                drop, [sizes, kept, dropped, mins, maxs, over], tf.bool, stateful=True
            ),
            [],
        ),
    )
    kept += tf.cast(fits, tf.int64)
    return (kept, dropped, mins, maxs, over), (example, keep)

  def is_kept(example, keep):
    del example
    return keep

  def example_only(example, keep):
    del keep
    return example

  return dataset.scan(initial, step).filter(is_kept).map(example_only)


def assert_fits(
    dataset: tf.data.Dataset,
    sizes_fn: Callable[[Dict[str, tf.Tensor]], tf.Tensor],
    limits: Limits,
    failure: Callable[[str], str],
) -> tf.data.Dataset:
  """Raises on the first example whose sizes exceed `limits`; a map, so the cardinality stays.

  Args: as `filter_failing_fast`; `failure(sizes)` gets "'targets' 300 > 128, ..." (the
  sizes over their limits) and returns the message.
  """
  limit_vector = tf.constant([int(v) for _, v in limits], tf.int32)

  def fail(sizes):
    over = [f'{name!r} {int(n)} > {limit}' for (name, limit), n in zip(limits, sizes) if n > limit]
    raise ValueError(failure(', '.join(over)))

  def check(example):
    sizes = tf.cast(sizes_fn(example), tf.int32)
    fits = tf.reduce_all(sizes <= limit_vector)
    ok = tf.cond(
        fits,
        lambda: tf.constant(True),
        lambda: tf.reshape(tf.numpy_function(fail, [sizes], tf.bool, stateful=True), []),
    )
    with tf.control_dependencies([ok]):
      return {key: tf.identity(value) for key, value in example.items()}

  return dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# Media that TASK_FEATURE_LENGTHS would not feed.


def check_media_fed(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, Optional[int]], task_name: str = ''
) -> tf.data.Dataset:
  """Raises on the first example that carries items of a modality whose '<m>_features' has no
  length in `sequence_length` (TASK_FEATURE_LENGTHS). The feature converter takes only the
  modalities named there: such an example's media would be dropped and its placeholders
  reach the model as plain tokens, silently (a stage-1 run trained at grad_norm 0). A map, so
  the cardinality stays; examples without such items pass at the cost of one shape check."""
  spec = dataset.element_spec
  unfed = tuple(
      m
      for m in MODALITIES
      if f'{m}_features' in spec
      and spec[f'{m}_features'].shape.rank
      and sequence_length.get(f'{m}_features') is None
  )
  if not unfed:
    return dataset
  where = f'task {task_name}' if task_name else 'a task'
  lengths = dict(sequence_length)

  def fail(counts):
    carried = ', '.join(f'{int(n)} {m} item(s)' for m, n in zip(unfed, counts) if n)
    missing = [f'{m}_features' for m, n in zip(unfed, counts) if n]
    raise ValueError(
        f'{where}: an example carries {carried}, but TASK_FEATURE_LENGTHS={lengths} has no '
        f'length for {missing}: the feature converter would not take these media and their '
        'placeholders would reach the model as plain tokens (the media silently unused). Add '
        f"{', '.join(repr(k) + ': <items per row>' for k in missing)} to "
        "TASK_FEATURE_LENGTHS, or bind drop_too_long.unfed_media = 'ignore' to read the task "
        'as text only on purpose.'
    )

  def check(example):
    counts = tf.stack([tf.shape(example[f'{m}_features'], out_type=tf.int32)[0] for m in unfed])
    ok = tf.cond(
        tf.reduce_all(tf.equal(counts, 0)),
        lambda: tf.constant(True),
        lambda: tf.reshape(tf.numpy_function(fail, [counts], tf.bool, stateful=True), []),
    )
    with tf.control_dependencies([ok]):
      return {key: tf.identity(value) for key, value in example.items()}

  return dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# drop_too_long.


def _count_drop(reason: str) -> None:
  total = DROPPED_TOO_LONG.add(reason)
  if total & (total - 1) == 0:  # 1, 2, 4, 8, ...: a running total without a line per drop
    logging.warning(
        'drop_too_long: %d examples dropped so far (%s)', total, DROPPED_TOO_LONG.counts()
    )


@gin.configurable(allowlist=['on_too_long', 'max_leading_drops', 'unfed_media'])
def drop_too_long(
    dataset: tf.data.Dataset,
    sequence_length: Optional[Mapping[str, int]] = None,
    task_name: str = '',
    on_too_long: str = 'drop',
    max_leading_drops: int = MAX_LEADING_DROPS,
    unfed_media: str = 'raise',
) -> tf.data.Dataset:
  """Drops (never cuts) examples whose targets or items exceed `sequence_length`.

  An example that does not fit cannot be packed without splitting it or losing items, which
  would break the placeholder/item alignment. Drops are counted in `DROPPED_TOO_LONG` by the
  first feature (in sorted order) that did not fit and logged at running totals 1, 2, 4, ...

  Args:
    dataset: examples with 'targets' `[length]` and '<m>_features' `[items, ...]`.
    sequence_length: {'targets': L, '<m>_features': max_items, ...} (TASK_FEATURE_LENGTHS);
      missing keys, None values and features of rank 0 are not checked; None checks nothing.
    task_name: named in error messages (`tasks/common.py` binds it per task).
    on_too_long (gin): 'drop' (default; training) or 'raise': every example is kept and one
      that does not fit raises, naming TASK_FEATURE_LENGTHS; a map instead of a filter, so
      the dataset keeps its cardinality (t5x's eval / infer: `len(ds)`, zipped datasets).
    max_leading_drops (gin): with 'drop', raise once this many examples of the dataset were
      dropped before any was kept (default MAX_LEADING_DROPS; 0: never). A repeated dataset
      whose every example is dropped then fails within seconds instead of spinning forever.
      The count is per dataset iterator: per task in a mixture.
    unfed_media (gin): 'raise' (default): an example carrying items of a modality that
      `sequence_length` gives no '<m>_features' length raises, naming the task, the modality
      and TASK_FEATURE_LENGTHS (`check_media_fed`); 'ignore': such media are dropped by the
      feature converter (reading multimodal data as text only, on purpose).
  """
  if unfed_media not in UNFED_MEDIA:
    raise ValueError(
        f'drop_too_long.unfed_media must be one of {UNFED_MEDIA}, got ' f'{unfed_media!r}'
    )
  if on_too_long not in ON_TOO_LONG:
    raise ValueError(
        f'drop_too_long.on_too_long must be one of {ON_TOO_LONG}, got ' f'{on_too_long!r}'
    )
  if max_leading_drops < 0:
    raise ValueError(f'drop_too_long.max_leading_drops must be >= 0, got {max_leading_drops}')
  if not sequence_length:
    return dataset
  if unfed_media == 'raise':
    dataset = check_media_fed(dataset, sequence_length, task_name)
  spec = dataset.element_spec
  # Checked in a fixed order so the counted reason is reproducible.
  limits = tuple(
      (k, int(v))
      for k, v in sorted(sequence_length.items())
      if v is not None and k in spec and spec[k].shape.rank
  )
  if not limits:
    return dataset
  where = f' of task {task_name}' if task_name else ''
  lengths = dict(sequence_length)

  def sizes_fn(example):
    return tf.stack([tf.shape(example[k], out_type=tf.int32)[0] for k, _ in limits])

  if on_too_long == 'raise':
    return assert_fits(
        dataset,
        sizes_fn,
        limits,
        lambda over: (
            f"drop_too_long(on_too_long='raise'): an example{where} does not fit "
            f'TASK_FEATURE_LENGTHS={lengths}: {over} (targets in tokens with media placeholders '
            'expanded, <m>_features in items). Raise TASK_FEATURE_LENGTHS, or bind '
            "drop_too_long.on_too_long = 'drop' to skip such examples."
        ),
    )

  def record_drop(sizes):
    reason = next(name for (name, limit), n in zip(limits, sizes) if n > limit)
    _count_drop(reason)

  return filter_failing_fast(
      dataset,
      sizes_fn,
      limits,
      record_drop,
      lambda dropped, sizes: (
          f'drop_too_long: the first {dropped} examples{where} were all dropped as too long for '
          f'TASK_FEATURE_LENGTHS={lengths}: {sizes} (targets in tokens with media placeholders '
          'expanded, <m>_features in items). Raise TASK_FEATURE_LENGTHS '
          '(drop_too_long.max_leading_drops sets how many leading drops fail; 0 never fails).'
      ),
      max_leading_drops,
  )


# ----------------------------------------------------------------------------------------------
# Text of the prompt and the answer.


def _last_answer_span(weights: np.ndarray) -> Tuple[int, int]:
  """[start, end) of the last loss-weighted run; (len, len) when nothing is weighted."""
  on = np.nonzero(weights > 0)[0]
  if on.size == 0:
    return len(weights), len(weights)
  # Runs are separated by unweighted tokens; the last run starts after the last gap.
  gaps = np.nonzero(np.diff(on) > 1)[0]
  start = on[gaps[-1] + 1] if gaps.size else on[0]
  return int(start), int(on[-1]) + 1


def prompt_and_answer(targets, loss_weights, vocabulary) -> Tuple[str, str]:
  """(prompt, answer) texts of one example.

  prompt: `targets` before the last answer, BOS dropped, "</s>" after earlier answers, each
    run of one placeholder's soft-token ids as its one placeholder string ("<image>"): the
    rendered conversation up to "ASSISTANT:" (`conversation.prompt_text` of the conversation
    with its last answer emptied). Two placeholders of one modality with nothing between
    them read as one.
  answer: the last loss-weighted run without `</s>`, stripped (the evaluation reference).

  Args:
    targets: `[n]` ids, placeholders expanded; loss_weights: `[n]`.
    vocabulary: a `MultimodalVocabulary` (or a LazyVocabulary of one).
  """
  if isinstance(vocabulary, vocabulary_lib.LazyVocabulary):
    vocabulary = vocabulary.vocabulary  # seqio's base bos_id would raise
  targets = np.asarray(targets).reshape(-1)
  start, end = _last_answer_span(np.asarray(loss_weights).reshape(-1))
  answer_ids = targets[start:end]
  answer = vocabulary.decode(answer_ids[answer_ids != vocabulary.eos_id].tolist()).strip()
  prompt_ids = targets[:start]
  repeated = np.zeros(len(prompt_ids), bool)
  repeated[1:] = prompt_ids[1:] == prompt_ids[:-1]
  repeated &= np.isin(prompt_ids, list(vocabulary.placeholder_ids.values()))
  return conversation_lib.decode_prompt(prompt_ids[~repeated], vocabulary), answer


def add_pretokenized(
    dataset: tf.data.Dataset, output_features: Mapping[str, object]
) -> tf.data.Dataset:
  """Adds 'inputs_pretokenized' (prompt) and 'targets_pretokenized' (answer): tf.string scalars
  from `prompt_and_answer` with the vocabulary of output feature 'targets'.

  t5x.infer writes every task feature ending in '_pretokenized' into the 'inputs' of its
  output lines. The features are not seqio output features (seqio's Evaluator measures every
  output feature's shape[0], which a scalar string has not); a task keeps them anyway, and
  `tasks/common.py`'s mixtures pass them through. The feature converter ignores them.
  """
  vocabulary = output_features['targets'].vocabulary

  def texts(targets, weights):
    prompt, answer = prompt_and_answer(targets, weights, vocabulary)
    return np.bytes_(prompt.encode('utf-8')), np.bytes_(answer.encode('utf-8'))

  def add(example):
    prompt, answer = tf.numpy_function(
        texts, [example['targets'], example['loss_weights']], [tf.string, tf.string], stateful=False
    )
    prompt.set_shape([])
    answer.set_shape([])
    return dict(example, inputs_pretokenized=prompt, targets_pretokenized=answer)

  return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)
