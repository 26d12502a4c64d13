"""Decoder-only feature converter for multimodal examples, with greedy in-order packing.

Input examples (after a task's preprocessors, docs: data path contract):

    targets              int32   [length]           BOS + tokens, placeholders expanded
    loss_weights         float32 [length]           1.0 on answer tokens
    <m>_features         float32 [items, *item_shape] for each declared modality m
    audio_feature_mask   bool    [items, frames]    optional; True on real frames

Output rows (t5x decoder-only keys plus media, every shape static):

    decoder_target_tokens  int32   [L]
    decoder_input_tokens   int32   [L]   targets shifted right within each segment, 0 at starts
    decoder_loss_weights   float32 [L]   0 on padding
    decoder_segment_ids    int32   [L]   packing only: 1, 2, ... per example; 0 = padding
    decoder_positions      int32   [L]   packing only: restart at 0 per example
    <m>_features           float32 [max_items_m, *item_shape]  items of the row's examples in order
    <m>_mask               bool    [max_items_m]               True on real items
    audio_feature_mask     bool    [max_items_audio, frames]   when 'audio' is declared

Packing is greedy and in input order: an example joins the current row when its tokens and
every modality's items still fit, otherwise the row is emitted and a new one starts. Examples
are never split and never lose items, so the model's splice rule ("j-th placeholder of m in
a row <- j-th soft token of the row's m items") stays aligned. When packing, an example that
cannot fit in an empty row is dropped, logged and counted (`dropped_examples`,
`OVERSIZE_DROPS`), never cut; when the first `max_leading_drops` examples were all dropped the
dataset raises, naming TASK_FEATURE_LENGTHS (a repeated dataset would otherwise spin forever).
Without packing (t5x's eval and infer) every input example becomes exactly one row: one that
does not fit raises, naming TASK_FEATURE_LENGTHS, and the dataset keeps its cardinality.

Input features the converter does not consume are ignored (e.g. '*_pretokenized' text).

Implementation: pure tf.data (graph mode), lazy and streaming. A `Dataset.scan` carries the
row being filled (unpadded tensors plus segment count) and emits it when the next example
does not fit; a sentinel element appended after the input flushes the last row; a `filter`
keeps the emitted rows; a `map` pads them. Without packing there are maps only. The row state
is re-concatenated per example, which copies at most one row's media per example: small next
to decoding that media.
"""

from typing import Callable, Dict, Mapping, Optional, Sequence

from absl import logging
import gin
import numpy as np
import seqio
from seqio import utils as seqio_utils
from seqio.feature_converters import _check_exact_match
import tensorflow as tf

from unimoe_jax.data import bad_examples
from unimoe_jax.data import iteration
from unimoe_jax.data import lengths as lengths_lib
from unimoe_jax.data import preprocessors

FeatureSpec = seqio.FeatureConverter.FeatureSpec

# Rank of one item per modality (the model's batch format): image [S, S, 3];
# video [frames, S, S, 3]; speech (Whisper log-mel) [frames, n_mels]; audio (BEATs) [frames, 128].
ITEM_RANK = {'image': 3, 'video': 4, 'speech': 2, 'audio': 2}

_SENTINEL = '_end_of_input'
_NUM_SEGMENTS = '_num_segments'


# All converters of the process together (for the trainer's logs); each converter also has
# its own `dropped_examples`.
OVERSIZE_DROPS = bad_examples.BadExampleCounter()
# The one reason the converter counts (a BadExampleCounter counts by reason).
LONGER_THAN_A_ROW = 'longer_than_a_row'


@gin.configurable
class MultimodalDecoderFeatureConverter(seqio.FeatureConverter):
  """seqio feature converter: multimodal decoder-only examples -> packed or padded rows.

  task_feature_lengths (TASK_FEATURE_LENGTHS): {'targets': L, '<m>_features': max_items_m for
  each declared m}. Lengths of features the converter does not consume are ignored (seqio's
  Evaluator passes one for every output feature: 'loss_weights', 'audio_feature_mask',
  '*_pretokenized' ...), except '<m>_features' of a modality not declared: its media would
  never reach the model, so a length > 0 is refused (0 or None, what the Evaluator measures
  for a modality the examples do not use, is accepted).

  Differences from seqio's FeatureConverter.__call__ (overridden, same validations):
  - Media features have rank > 1 (leading items axis). seqio refuses rank > 1 model features
    when packing because its packers concatenate 1-D features only; this converter packs
    media along the items axis itself, so that refusal is skipped. Their TASK_FEATURES /
    MODEL_FEATURES are declared with their true rank (ITEM_RANK + 1) and sequence_dim 0, so
    seqio's dtype, rank and exact output-length checks still apply to them.
  - Input lengths are not asserted by seqio's validation. Packing: an example longer than L
    tokens or with more than max_items_m items is dropped and counted (contract: never cut;
    one bad example must not kill a long run), and `max_leading_drops` drops before any kept
    example raise. Without packing an example that does not fit raises. Output lengths are
    checked exactly when `apply_length_check`.
  `use_custom_packing_ops` is accepted so seqio-style gin configs work; it changes nothing
  (seqio's custom op only packs 1-D features).
  """

  TASK_FEATURES = {'targets': FeatureSpec(dtype=tf.int32)}
  MODEL_FEATURES = {
      'decoder_target_tokens': FeatureSpec(dtype=tf.int32),
      'decoder_input_tokens': FeatureSpec(dtype=tf.int32),
      'decoder_loss_weights': FeatureSpec(dtype=tf.float32),
  }
  PACKING_FEATURE_DTYPES = {
      'decoder_segment_ids': tf.int32,
      'decoder_positions': tf.int32,
  }

  def __init__(
      self,
      pack: bool = True,
      use_custom_packing_ops: bool = False,
      apply_length_check: bool = True,
      bos_id: int = 0,
      modalities: Sequence[str] = (),
      max_leading_drops: int = preprocessors.MAX_LEADING_DROPS,
      probe_first_row: bool = False,
      row_check: Optional[Callable[[Dict[str, np.ndarray]], None]] = None,
  ):
    """See the class docstring. Packing only:

    max_leading_drops: raise when this many examples were dropped before one was kept (0:
      never).
    probe_first_row: read the first row while the dataset is built (eagerly), so that a
      pipeline that can yield nothing fails there rather than at its first batch. t5x.train
      warms its input pipeline up in a background thread and reads that thread's error only
      after compiling the train step (tens of seconds to minutes); `T5XUniMoEModel` turns this
      on. Costs the examples of one row, read twice. The error is raised as
      `iteration.numpy_iterator` raises it (after its iterator is gone, so the process can
      exit).
    row_check: called on every output row, as a batch of one (`decoder_input_tokens` and the
      `<m>_mask`s, `[1, ...]` numpy), inside the pipeline; it raises to stop a row the model
      must not see. `T5XUniMoEModel` passes `network.check_placeholders` of its config, so
      that t5x's binaries refuse data whose soft-token counts differ from the model's, as our
      loops do (`UniMoEModel.check_batch`); with `probe_first_row` the first row is checked
      while the dataset is built.
    """
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in ITEM_RANK]
    if unknown:
      raise ValueError(f'modalities: unknown {unknown}; expected a subset of {tuple(ITEM_RANK)}')
    if len(set(modalities)) != len(modalities):
      raise ValueError(f'modalities: duplicates in {modalities}')
    if max_leading_drops < 0:
      raise ValueError(
          'MultimodalDecoderFeatureConverter.max_leading_drops must be >= 0, got '
          f'{max_leading_drops}'
      )
    self._modalities = modalities
    self._max_leading_drops = int(max_leading_drops)
    self._probe_first_row = probe_first_row
    self._row_check = row_check
    task_features = dict(type(self).TASK_FEATURES)
    model_features = dict(type(self).MODEL_FEATURES)
    for m in modalities:
      rank = ITEM_RANK[m] + 1
      task_features[f'{m}_features'] = FeatureSpec(dtype=tf.float32, rank=rank)
      model_features[f'{m}_features'] = FeatureSpec(dtype=tf.float32, rank=rank)
      model_features[f'{m}_mask'] = FeatureSpec(dtype=tf.bool)
    if 'audio' in modalities:
      model_features['audio_feature_mask'] = FeatureSpec(dtype=tf.bool, rank=2)
    self.TASK_FEATURES = task_features
    self.MODEL_FEATURES = model_features
    self.dropped_examples = bad_examples.BadExampleCounter()
    super().__init__(
        pack=pack,
        use_custom_packing_ops=use_custom_packing_ops,
        apply_length_check=apply_length_check,
        bos_id=bos_id,
    )

  @property
  def modalities(self) -> Sequence[str]:
    return self._modalities

  def __call__(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    task_feature_lengths = self.task_lengths(task_feature_lengths)
    # dtype and rank only (no expected lengths): input lengths are checked by _convert_features.
    ds = self._validate_dataset(
        ds, self.TASK_FEATURES, expected_lengths={}, strict=False, error_label='input_validation'
    )
    ds = self._convert_features(ds, task_feature_lengths)
    if self._row_check is not None:
      ds = ds.map(self._checked_row, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    expected = dict(self.MODEL_FEATURES)
    if self.pack:
      expected.update({k: FeatureSpec(dtype=v) for k, v in self.PACKING_FEATURE_DTYPES.items()})
    model_feature_lengths = self.get_model_feature_lengths(task_feature_lengths)
    _check_exact_match(
        list(expected), list(model_feature_lengths), 'model_feature_names', 'model_feature_lengths'
    )
    ds = self._validate_dataset(
        ds, expected, model_feature_lengths, strict=True, error_label='output_validation'
    )
    _check_exact_match(
        list(expected), list(ds.element_spec), 'model_feature_names', 'output_dataset'
    )
    if (self.pack or self._row_check) and self._probe_first_row and tf.executing_eagerly():
      next(iteration.numpy_iterator(ds.take(1)), None)  # A pipeline error raises here.
    return ds

  def _checked_row(self, row: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """`row` after `row_check` passed on it (a numpy call inside the graph; the tokens it
    returns carry the dependency)."""
    keys = ['decoder_input_tokens'] + [f'{m}_mask' for m in self._modalities]

    def check(*arrays):
      self._row_check({k: a[None] for k, a in zip(keys, arrays)})
      return arrays[0]

    tokens = tf.numpy_function(check, [row[k] for k in keys], tf.int32, stateful=False)
    tokens.set_shape(row['decoder_input_tokens'].shape)
    return {**row, 'decoder_input_tokens': tokens}

  def task_lengths(self, task_feature_lengths: Mapping[str, int]) -> Dict[str, int]:
    """The lengths this converter consumes, {'targets': L, '<m>_features': items}, checked.

    Raises:
      ValueError: naming TASK_FEATURE_LENGTHS, when it is not a dict of lengths (ints >= 0,
        `lengths.validate_task_feature_lengths`), when a needed length is missing or None, or
        when a modality not declared has a '<m>_features' length > 0.
    """
    task_feature_lengths = lengths_lib.validate_task_feature_lengths(
        task_feature_lengths, require_targets=False
    )
    undeclared = [
        m
        for m in ITEM_RANK
        if m not in self._modalities and task_feature_lengths.get(f'{m}_features')
    ]
    if undeclared:
      raise ValueError(
          f'TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} gives items to modalities '
          f'{undeclared} that the feature converter was not declared with (its modalities: '
          f'{self._modalities}): their media would never reach the model. Declare them '
          f'(MultimodalDecoderFeatureConverter.modalities) or set their <m>_features to 0.'
      )
    missing = [k for k in self.TASK_FEATURES if task_feature_lengths.get(k) is None]
    if missing:
      raise ValueError(
          f'TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} is missing '
          f'{missing}, which the feature converter needs (its modalities: '
          f'{self._modalities})'
      )
    return {k: int(task_feature_lengths[k]) for k in self.TASK_FEATURES}

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Dict[str, int]:
    task_feature_lengths = self.task_lengths(task_feature_lengths)
    length = task_feature_lengths['targets']
    lengths = {
        'decoder_target_tokens': length,
        'decoder_input_tokens': length,
        'decoder_loss_weights': length,
    }
    if self.pack:
      lengths['decoder_segment_ids'] = length
      lengths['decoder_positions'] = length
    for m in self._modalities:
      items = task_feature_lengths[f'{m}_features']
      lengths[f'{m}_features'] = items
      lengths[f'{m}_mask'] = items
    if 'audio' in self._modalities:
      lengths['audio_feature_mask'] = task_feature_lengths['audio_features']
    return lengths

  # ---------------------------------------------------------------------------------------

  def _convert_features(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    spec = ds.element_spec
    item_shapes = self._item_shapes(spec)
    length = int(task_feature_lengths['targets'])
    max_items = {m: int(task_feature_lengths[f'{m}_features']) for m in self._modalities}
    ds = ds.map(lambda ex: self._select_features(ex, spec), num_parallel_calls=tf.data.AUTOTUNE)
    limits = (('targets', length),) + tuple(
        (f'{m}_features', max_items[m]) for m in self._modalities
    )
    lengths = dict(limits)
    if self.pack:
      ds = preprocessors.filter_failing_fast(
          ds,
          self._sizes,
          limits,
          lambda sizes: self._record_drop(length, max_items, *sizes),
          lambda dropped, sizes: (
              f'MultimodalDecoderFeatureConverter: the first {dropped} examples were all '
              f'dropped, none fits one row of TASK_FEATURE_LENGTHS={lengths}: {sizes} (targets '
              'in tokens with media placeholders expanded, <m>_features in items). Raise '
              'TASK_FEATURE_LENGTHS (MultimodalDecoderFeatureConverter.max_leading_drops sets how '
              'many leading drops fail; 0 never fails).'
          ),
          self._max_leading_drops,
      )
      ds = self._pack_rows(ds, item_shapes, length, max_items)
    else:
      ds = preprocessors.assert_fits(
          ds,
          self._sizes,
          limits,
          lambda over: (
              'MultimodalDecoderFeatureConverter(pack=False) keeps every example as one row (t5x '
              f'eval / infer), but an example does not fit TASK_FEATURE_LENGTHS={lengths}: {over} '
              '(targets in tokens with media placeholders expanded, <m>_features in items). Raise '
              'TASK_FEATURE_LENGTHS, or drop such examples before the converter (e.g. the task '
              "preprocessor drop_too_long with on_too_long='drop')."
          ),
      )
    return ds.map(
        lambda row: self._pad_row(row, item_shapes, length, max_items),
        num_parallel_calls=tf.data.AUTOTUNE,
    )

  def _sizes(self, ex) -> tf.Tensor:
    """int32 `[1 + modalities]`: tokens, then items of each declared modality."""
    return tf.stack(
        [tf.shape(ex['targets'], out_type=tf.int32)[0]]
        + [tf.shape(ex[f'{m}_features'], out_type=tf.int32)[0] for m in self._modalities]
    )

  def _item_shapes(self, spec) -> Dict[str, tf.TensorShape]:
    """Static per-item shapes from the element_spec; validates the non-task inputs."""
    if 'loss_weights' not in spec:
      raise ValueError("input dataset has no 'loss_weights' (float32 [length]) feature")
    if spec['loss_weights'].dtype != tf.float32 or spec['loss_weights'].shape.rank != 1:
      raise ValueError(f"'loss_weights' must be float32 [length], got {spec['loss_weights']}")
    shapes = {}
    for m in self._modalities:
      shape = spec[f'{m}_features'].shape[1:]
      if not shape.is_fully_defined():
        raise ValueError(
            f"'{m}_features' item shape {shape} is not static; pad items to a "
            'fixed shape before the feature converter (rows need static shapes)'
        )
      shapes[m] = shape
    # Without the audio modality the frame mask goes unused, like undeclared media features
    # (a text-only run over multimodal tasks).
    if 'audio_feature_mask' in spec and 'audio' in self._modalities:
      mask = spec['audio_feature_mask']
      if mask.dtype != tf.bool or mask.shape.rank != 2 or mask.shape[1] != shapes['audio'][0]:
        raise ValueError(
            f"'audio_feature_mask' must be bool [items, {shapes['audio'][0]}], " f'got {mask}'
        )
    return shapes

  def _select_features(self, ex, spec) -> Dict[str, tf.Tensor]:
    """Keeps the features the converter uses; an absent audio mask means every frame is real."""
    targets = ex['targets']
    weights = ex['loss_weights']
    tf.debugging.assert_equal(
        tf.shape(weights),
        tf.shape(targets),
        message="'loss_weights' and 'targets' differ in length",
    )
    out = {'targets': targets, 'loss_weights': weights}
    for m in self._modalities:
      out[f'{m}_features'] = ex[f'{m}_features']
    if 'audio' in self._modalities:
      if 'audio_feature_mask' in spec:
        mask = ex['audio_feature_mask']
        tf.debugging.assert_equal(
            tf.shape(mask)[0],
            tf.shape(ex['audio_features'])[0],
            message="'audio_feature_mask' and 'audio_features' items",
        )
      else:
        mask = tf.ones(tf.shape(ex['audio_features'])[:2], tf.bool)
      out['audio_feature_mask'] = mask
    return out

  def _record_drop(self, length: int, max_items: Mapping[str, int], tokens, *items) -> None:
    mine = self.dropped_examples.add(LONGER_THAN_A_ROW)
    total = OVERSIZE_DROPS.add(LONGER_THAN_A_ROW)
    sizes = ', '.join(f'{m} items {int(n)}/{max_items[m]}' for m, n in zip(self._modalities, items))
    logging.warning(
        'MultimodalDecoderFeatureConverter: dropped an example that cannot fit '
        'in one row (tokens %d/%d%s). Dropped so far: %d by this converter, %d '
        'in all.',
        int(tokens),
        length,
        ', ' + sizes if sizes else '',
        mine,
        total,
    )

  def fits_alone_or_record_drop(self, ex, length: int, max_items: Mapping[str, int]):
    """tf bool: one example fits `length` tokens and `max_items` items per modality; a drop is
    counted and logged. Inference uses it to skip the examples the converter would refuse."""
    num_tokens = tf.shape(ex['targets'])[0]
    num_items = [tf.shape(ex[f'{m}_features'])[0] for m in self._modalities]
    fits = num_tokens <= length
    for m, n in zip(self._modalities, num_items):
      fits &= n <= max_items[m]

    def record(tokens, *items):
      self._record_drop(length, max_items, tokens, *items)
      return False

    def drop():
      keep = tf.py_function(record, [num_tokens] + num_items, Tout=tf.bool)
      keep.set_shape([])
      return keep

    return tf.cond(fits, lambda: tf.constant(True), drop)

  def _empty_row(self, item_shapes) -> Dict[str, tf.Tensor]:
    row = {
        'targets': tf.zeros([0], tf.int32),
        'loss_weights': tf.zeros([0], tf.float32),
        'segment_ids': tf.zeros([0], tf.int32),
        'positions': tf.zeros([0], tf.int32),
        _NUM_SEGMENTS: tf.constant(0, tf.int32),
    }
    for m in self._modalities:
      row[f'{m}_features'] = tf.zeros([0] + item_shapes[m].as_list(), tf.float32)
    if 'audio' in self._modalities:
      row['audio_feature_mask'] = tf.zeros([0, item_shapes['audio'][0]], tf.bool)
    return row

  def _append(self, row, ex) -> Dict[str, tf.Tensor]:
    """`row` with example `ex` appended as the next segment."""
    n = tf.shape(ex['targets'])[0]
    segment = row[_NUM_SEGMENTS] + 1
    out = {
        'segment_ids': tf.concat([row['segment_ids'], tf.fill([n], segment)], 0),
        'positions': tf.concat([row['positions'], tf.range(n, dtype=tf.int32)], 0),
        _NUM_SEGMENTS: segment,
    }
    for key in ex:
      out[key] = tf.concat([row[key], ex[key]], 0)
    return out

  def _pack_rows(self, ds, item_shapes, length: int, max_items: Mapping[str, int]):
    empty = self._empty_row(item_shapes)
    example_keys = [k for k in empty if k not in ('segment_ids', 'positions', _NUM_SEGMENTS)]
    sentinel = {k: empty[k] for k in example_keys}
    sentinel[_SENTINEL] = tf.constant(True)
    ds = ds.map(lambda ex: dict(ex, **{_SENTINEL: tf.constant(False)}))
    ds = ds.concatenate(tf.data.Dataset.from_tensors(sentinel))

    def step(row, element):
      ex = {k: element[k] for k in example_keys}
      fits = tf.logical_not(element[_SENTINEL])
      fits &= tf.shape(row['targets'])[0] + tf.shape(ex['targets'])[0] <= length
      for m in self._modalities:
        key = f'{m}_features'
        fits &= tf.shape(row[key])[0] + tf.shape(ex[key])[0] <= max_items[m]
      emit = tf.logical_and(tf.logical_not(fits), row[_NUM_SEGMENTS] > 0)
      prefix = tf.cond(fits, lambda: row, lambda: empty)
      return self._append(prefix, ex), (emit, row)

    ds = ds.scan(empty, step)
    ds = ds.filter(lambda emit, row: emit)
    return ds.map(lambda emit, row: row)

  def _pad_row(
      self, row, item_shapes, length: int, max_items: Mapping[str, int]
  ) -> Dict[str, tf.Tensor]:
    def pad(x, size):
      paddings = [[0, size - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1)
      return tf.ensure_shape(tf.pad(x, paddings), [size] + x.shape.as_list()[1:])

    targets = pad(row['targets'], length)
    out = {
        'decoder_target_tokens': targets,
        'decoder_loss_weights': pad(row['loss_weights'], length),
    }
    if self.pack:
      segment_ids = pad(row['segment_ids'], length)
      out['decoder_segment_ids'] = segment_ids
      out['decoder_positions'] = pad(row['positions'], length)
      out['decoder_input_tokens'] = seqio_utils.make_autoregressive_inputs(
          targets, sequence_id=segment_ids, bos_id=self.bos_id
      )
    else:
      out['decoder_input_tokens'] = seqio_utils.make_autoregressive_inputs(
          targets, bos_id=self.bos_id
      )
    for m in self._modalities:
      features = row[f'{m}_features']
      out[f'{m}_features'] = pad(features, max_items[m])
      out[f'{m}_mask'] = tf.range(max_items[m]) < tf.shape(features)[0]
    if 'audio' in self._modalities:
      out['audio_feature_mask'] = pad(row['audio_feature_mask'], max_items['audio'])
    return out


def check_model_takes_media(
    model, task_feature_lengths: Mapping[str, int], name: str = 'TASK_FEATURE_LENGTHS'
) -> None:
  """Raises ValueError, before any compute, when TASK_FEATURE_LENGTHS gives items to a modality
  the model has no encoder for: the rows would carry its media and the model would ignore
  them (its placeholders embedded as token 0), silently.

  `model`: a UniMoEModel (its `config.modalities`, the towers UniMoEConfig builds), a
  UniMoEConfig, or a sequence of modality names. Lengths of 0 or None feed nothing and pass.
  The data side (an example carrying a modality TASK_FEATURE_LENGTHS does not name) is
  checked per example by `preprocessors.drop_too_long` (`check_media_fed`).
  """
  task_feature_lengths = lengths_lib.validate_task_feature_lengths(
      task_feature_lengths, name, require_targets=False
  )
  config = getattr(model, 'config', model)
  built = tuple(getattr(config, 'modalities', config))
  fed = [m for m in ITEM_RANK if task_feature_lengths.get(f'{m}_features')]
  unbuilt = [m for m in fed if m not in built]
  if unbuilt:
    towers = {
        'image': 'vision',
        'video': 'vision',
        'speech': 'speech_encoder + speech_aligner',
        'audio': 'audio_encoder + audio_qformer',
    }
    fields = sorted({towers[m] for m in unbuilt})
    raise ValueError(
        f'{name}={dict(task_feature_lengths)} feeds {unbuilt} items, but the model has no '
        f'encoder for {unbuilt} (its modalities: {built}; UniMoEConfig.{", ".join(fields)} '
        'unset): their media would never reach the model. Use a model with those towers '
        '(MODEL_CONFIG of gin/models/multimodal.gin or multimodal_tiny.gin) or drop '
        f'{[m + "_features" for m in unbuilt]} from {name} (and their data).'
    )


def num_dropped(converter: Optional[MultimodalDecoderFeatureConverter] = None) -> int:
  """Examples dropped for not fitting in a row: by `converter`, or by all converters."""
  return (OVERSIZE_DROPS if converter is None else converter.dropped_examples).total


def output_features(vocabulary, modalities: Sequence[str]) -> Dict[str, seqio.Feature]:
  """seqio output features of a task whose examples this converter takes.

  'targets' go through `vocabulary` without an added EOS (each answer already ends with
  `</s>`); 'loss_weights', '<m>_features' and 'audio_feature_mask' pass through. Declaring
  them all matters beyond validation: a seqio Mixture keeps only its tasks' output features.
  """
  passthrough = seqio.PassThroughVocabulary(1)
  features = {
      'targets': seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
      'loss_weights': seqio.Feature(passthrough, add_eos=False, dtype=tf.float32),
  }
  for m in modalities:
    features[f'{m}_features'] = seqio.Feature(
        passthrough, add_eos=False, required=False, dtype=tf.float32, rank=ITEM_RANK[m] + 1
    )
  if 'audio' in modalities:
    features['audio_feature_mask'] = seqio.Feature(
        passthrough, add_eos=False, required=False, dtype=tf.bool, rank=2
    )
  return features
