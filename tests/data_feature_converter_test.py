"""MultimodalDecoderFeatureConverter: packing, padding, media alignment, drops, validation."""

import logging

import numpy as np
import pytest

from run_within import within

tf = pytest.importorskip('tensorflow')
pytest.importorskip('seqio')

from unimoe_jax.data import feature_converter as fc  # pylint: disable=g-import-not-at-top

IMAGE, SPEECH = -200, -202
N_SOFT = 3  # soft tokens (= placeholder ids) per item, both modalities
IMAGE_SHAPE, SPEECH_SHAPE = (2, 2, 3), (4, 2)
CODE = {'image': 1, 'speech': 2}  # item value = 100 * example + 10 * item + CODE[m]
PLACEHOLDER = {'image': IMAGE, 'speech': SPEECH}
SHAPE = {'image': IMAGE_SHAPE, 'speech': SPEECH_SHAPE}


def item_value(example, item, modality):
  return 100 * example + 10 * item + CODE[modality]


def make_example(index, targets, weights, image_items=(), speech_items=()):
  """Items are given as (example, item) pairs whose values encode where they came from."""

  def stack(items, modality):
    out = np.zeros((len(items),) + SHAPE[modality], np.float32)
    for k, (e, j) in enumerate(items):
      out[k] = item_value(e, j, modality)
    return out

  del index
  return {
      'targets': np.asarray(targets, np.int32),
      'loss_weights': np.asarray(weights, np.float32),
      'image_features': stack(image_items, 'image'),
      'speech_features': stack(speech_items, 'speech'),
  }


def make_layout_example(index, layout):
  """BOS, a marker, then per media item: a text token + N_SOFT placeholders; answer + EOS."""
  targets = [1, 1000 + index]
  counts = {'image': 0, 'speech': 0}
  items = {'image': [], 'speech': []}
  for m in layout:
    targets += [2000 + index] + [PLACEHOLDER[m]] * N_SOFT
    items[m].append((index, counts[m]))
    counts[m] += 1
  targets += [3000 + index, 2]
  weights = [0.0] * (len(targets) - 2) + [1.0, 1.0]
  return make_example(index, targets, weights, items['image'], items['speech'])


def dataset(examples, modalities=('image', 'speech')):
  signature = {
      'targets': tf.TensorSpec([None], tf.int32),
      'loss_weights': tf.TensorSpec([None], tf.float32),
  }
  for m in modalities:
    signature[f'{m}_features'] = tf.TensorSpec((None,) + SHAPE[m], tf.float32)
  keys = list(signature)
  return tf.data.Dataset.from_generator(
      lambda: ({k: ex[k] for k in keys} for ex in examples), output_signature=signature
  )


def convert(examples, length, max_image=3, max_speech=2, pack=True):
  converter = fc.MultimodalDecoderFeatureConverter(pack=pack, modalities=('image', 'speech'))
  ds = converter(
      dataset(examples),
      {'targets': length, 'image_features': max_image, 'speech_features': max_speech},
  )
  return converter, list(ds.as_numpy_iterator())


# Three mixed-modality examples: text only; one image; an image then a speech item.
EX0 = make_example(0, [1, 11, 12, 13, 2], [0, 0, 1, 1, 1])
EX1 = make_example(
    1, [1, 21, IMAGE, IMAGE, IMAGE, 22, 23, 2], [0] * 6 + [1, 1], image_items=[(1, 0)]
)
EX2 = make_example(
    2,
    [1, 31, IMAGE, IMAGE, IMAGE, 32, SPEECH, SPEECH, SPEECH, 33, 34, 2],
    [0] * 10 + [1, 1],
    image_items=[(2, 0)],
    speech_items=[(2, 0)],
)
P, S = IMAGE, SPEECH
# Hand-written per packed segment (EX0, EX1, EX2, padding); the inputs are the targets shifted
# right within each segment, starting from 0.
ROW_TARGETS = [1, 11, 12, 13, 2] + [1, 21, P, P, P, 22, 23, 2]
ROW_TARGETS += [1, 31, P, P, P, 32, S, S, S, 33, 34, 2] + [0] * 3
ROW_INPUTS = [0, 1, 11, 12, 13] + [0, 1, 21, P, P, P, 22, 23]
ROW_INPUTS += [0, 1, 31, P, P, P, 32, S, S, S, 33, 34] + [0] * 3
ROW_WEIGHTS = [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1] + [0] * 10 + [1, 1] + [0] * 3
ROW_SEGMENTS = [1] * 5 + [2] * 8 + [3] * 12 + [0] * 3
ROW_POSITIONS = list(range(5)) + list(range(8)) + list(range(12)) + [0] * 3


def check_three_example_row(row):
  np.testing.assert_array_equal(row['decoder_target_tokens'], ROW_TARGETS)
  np.testing.assert_array_equal(row['decoder_input_tokens'], ROW_INPUTS)
  np.testing.assert_array_equal(row['decoder_loss_weights'], ROW_WEIGHTS)
  np.testing.assert_array_equal(row['decoder_segment_ids'], ROW_SEGMENTS)
  np.testing.assert_array_equal(row['decoder_positions'], ROW_POSITIONS)
  assert row['decoder_loss_weights'].dtype == np.float32
  expected_image = np.zeros((3,) + IMAGE_SHAPE, np.float32)
  expected_image[0], expected_image[1] = item_value(1, 0, 'image'), item_value(2, 0, 'image')
  np.testing.assert_array_equal(row['image_features'], expected_image)
  np.testing.assert_array_equal(row['image_mask'], [True, True, False])
  expected_speech = np.zeros((2,) + SPEECH_SHAPE, np.float32)
  expected_speech[0] = item_value(2, 0, 'speech')
  np.testing.assert_array_equal(row['speech_features'], expected_speech)
  np.testing.assert_array_equal(row['speech_mask'], [True, False])


def segment_examples(row, originals):
  """Original index of each segment of `row`, found by exact token match."""
  found = []
  for s in range(1, row['decoder_segment_ids'].max() + 1):
    tokens = row['decoder_target_tokens'][row['decoder_segment_ids'] == s]
    matches = [i for i, ex in enumerate(originals) if np.array_equal(ex['targets'], tokens)]
    assert len(matches) == 1, (s, tokens)
    found.append(matches[0])
  return found


def check_alignment(row, originals):
  """k-th placeholder run of m <-> k-th item of `<m>_features`, which is the right item of
  the right example; applied to decoder_input_tokens (what the model splices)."""
  examples = segment_examples(row, originals)
  tokens, segments = row['decoder_input_tokens'], row['decoder_segment_ids']
  for m in ('image', 'speech'):
    where = np.nonzero(tokens == PLACEHOLDER[m])[0]
    assert len(where) % N_SOFT == 0
    runs = where.reshape(-1, N_SOFT)
    assert row[f'{m}_mask'].sum() == len(runs)
    assert not row[f'{m}_mask'][len(runs) :].any()
    local = {}
    for k, run in enumerate(runs):
      np.testing.assert_array_equal(np.diff(run), 1)  # one contiguous run per item
      segment = segments[run[0]]
      assert (segments[run] == segment).all()
      example = examples[segment - 1]
      item = local.get(segment, 0)
      local[segment] = item + 1
      np.testing.assert_array_equal(row[f'{m}_features'][k], item_value(example, item, m))
    np.testing.assert_array_equal(row[f'{m}_features'][len(runs) :], 0)


def test_packs_three_mixed_modality_examples_into_one_row():
  converter, rows = convert([EX0, EX1, EX2], length=28)
  assert len(rows) == 1
  check_three_example_row(rows[0])
  check_alignment(rows[0], [EX0, EX1, EX2])
  assert converter.dropped_examples.total == 0


TOO_LONG = make_example(9, [1] + [5] * 27 + [2], [1.0] * 29)  # 29 tokens > 28
TOO_MANY = make_layout_example(8, ['image'] * 4)  # 18 tokens fit, 4 images > 3
EX3 = make_example(3, [1, 41, 42, 43, 2], [0, 0, 1, 1, 1])  # 25 + 5 tokens > 28


@pytest.fixture(scope='module')
def overflow_stream():
  """One conversion shared by two tests (each conversion costs ~1 s of tf.data tracing)."""

  class Capture(logging.Handler):

    def __init__(self):
      super().__init__(logging.WARNING)
      self.messages = []

    def emit(self, record):
      self.messages.append(record.getMessage())

  capture, root = Capture(), logging.getLogger()
  root.addHandler(capture)
  before = fc.OVERSIZE_DROPS.total
  try:
    converter, rows = convert([EX0, TOO_LONG, EX1, TOO_MANY, EX2, EX3], length=28)
  finally:
    root.removeHandler(capture)
  return converter, rows, '\n'.join(capture.messages), fc.OVERSIZE_DROPS.total - before


def test_token_overflow_starts_a_new_row(overflow_stream):
  _, rows, _, _ = overflow_stream
  assert len(rows) == 2
  check_three_example_row(rows[0])
  np.testing.assert_array_equal(rows[1]['decoder_target_tokens'], [1, 41, 42, 43, 2] + [0] * 23)
  np.testing.assert_array_equal(rows[1]['decoder_input_tokens'], [0, 1, 41, 42, 43] + [0] * 23)
  np.testing.assert_array_equal(rows[1]['decoder_loss_weights'], [0, 0, 1, 1, 1] + [0] * 23)
  np.testing.assert_array_equal(rows[1]['decoder_segment_ids'], [1] * 5 + [0] * 23)
  np.testing.assert_array_equal(rows[1]['decoder_positions'], list(range(5)) + [0] * 23)
  assert not rows[1]['image_mask'].any() and not rows[1]['speech_mask'].any()


def test_example_that_cannot_fit_alone_is_dropped_and_counted(overflow_stream):
  converter, rows, log_text, global_delta = overflow_stream
  check_three_example_row(rows[0])  # the two misfits left no trace in the row
  assert converter.dropped_examples.total == 2
  assert fc.num_dropped(converter) == 2
  assert global_delta == 2
  assert 'tokens 29/28' in log_text and 'image items 4/3' in log_text


def test_item_overflow_starts_a_new_row_and_packing_stays_greedy_in_order():
  ex3 = make_layout_example(3, ['image', 'image'])  # 2 + 2 images > 3, tokens would fit
  ex4 = make_layout_example(4, [])  # fits the first row too, but rows are filled in order
  originals = [EX0, EX1, EX2, ex3, ex4]
  _, rows = convert(originals, length=64)
  assert [segment_examples(r, originals) for r in rows] == [[0, 1, 2], [3, 4]]
  for row in rows:
    check_alignment(row, originals)
  np.testing.assert_array_equal(rows[1]['image_mask'], [True, True, False])


def test_random_stream_keeps_every_example_in_order_and_aligned():
  rng = np.random.default_rng(0)
  originals = [
      make_layout_example(i, list(rng.choice(['image', 'speech'], rng.integers(0, 4))))
      for i in range(40)
  ]
  length, max_items = 40, {'image': 3, 'speech': 2}
  converter, rows = convert(originals, length=length)
  fits_alone = [
      len(ex['targets']) <= length
      and all(len(ex[f'{m}_features']) <= max_items[m] for m in max_items)
      for ex in originals
  ]
  assert converter.dropped_examples.total == fits_alone.count(False) > 0
  packed = [segment_examples(r, originals) for r in rows]
  assert sum(packed, []) == [i for i, ok in enumerate(fits_alone) if ok]
  for row, members in zip(rows, packed):
    check_alignment(row, originals)
    positions, segments = row['decoder_positions'], row['decoder_segment_ids']
    for s, i in enumerate(members, 1):
      np.testing.assert_array_equal(
          positions[segments == s], np.arange(len(originals[i]['targets']))
      )
      np.testing.assert_array_equal(
          row['decoder_loss_weights'][segments == s], originals[i]['loss_weights']
      )
  for row, nxt in zip(packed, packed[1:]):  # greedy: the next row's first example overflowed
    used = [originals[i] for i in row]
    first = originals[nxt[0]]
    overflow = sum(len(e['targets']) for e in used) + len(first['targets']) > length or any(
        sum(len(e[f'{m}_features']) for e in used) + len(first[f'{m}_features']) > max_items[m]
        for m in max_items
    )
    assert overflow


def test_no_packing_gives_one_padded_example_per_row():
  converter = fc.MultimodalDecoderFeatureConverter(pack=False, modalities=('image', 'speech'))
  # A known cardinality, as seqio's Evaluator sets on its cached task datasets.
  source = dataset([EX0, EX1, EX2]).apply(tf.data.experimental.assert_cardinality(3))
  ds = converter(source, {'targets': 28, 'image_features': 3, 'speech_features': 2})
  # t5x's inference calls len() and zips the task dataset with this one: no filter, no drop.
  assert len(ds) == 3
  rows = list(ds.as_numpy_iterator())
  assert len(rows) == 3 and converter.dropped_examples.total == 0
  assert 'decoder_segment_ids' not in rows[0] and 'decoder_positions' not in rows[0]
  for row, ex in zip(rows, [EX0, EX1, EX2]):
    n = len(ex['targets'])
    np.testing.assert_array_equal(row['decoder_target_tokens'][:n], ex['targets'])
    np.testing.assert_array_equal(row['decoder_target_tokens'][n:], 0)
    np.testing.assert_array_equal(
        row['decoder_input_tokens'][: n + 1], np.concatenate([[0], ex['targets']])
    )
    np.testing.assert_array_equal(row['decoder_loss_weights'][:n], ex['loss_weights'])
    np.testing.assert_array_equal(row['decoder_loss_weights'][n:], 0)
    for m in ('image', 'speech'):
      k = len(ex[f'{m}_features'])
      np.testing.assert_array_equal(row[f'{m}_features'][:k], ex[f'{m}_features'])
      np.testing.assert_array_equal(row[f'{m}_features'][k:], 0)
      np.testing.assert_array_equal(row[f'{m}_mask'], np.arange(len(row[f'{m}_mask'])) < k)


def test_audio_feature_mask_is_packed_or_synthesised():
  shape = (5, 4)  # frames, bins

  def audio_example(items, frames_real):
    feats = np.stack([np.full(shape, v, np.float32) for v in items]).reshape((-1,) + shape)
    mask = np.arange(shape[0])[None, :] < np.asarray(frames_real)[:, None]
    return {
        'targets': np.array([1, 7, 2], np.int32),
        'loss_weights': np.ones(3, np.float32),
        'audio_features': feats,
        'audio_feature_mask': mask.reshape(-1, shape[0]),
    }

  examples = [audio_example([1.0], [3]), audio_example([2.0, 3.0], [5, 2])]
  signature = {
      'targets': tf.TensorSpec([None], tf.int32),
      'loss_weights': tf.TensorSpec([None], tf.float32),
      'audio_features': tf.TensorSpec((None,) + shape, tf.float32),
      'audio_feature_mask': tf.TensorSpec((None, shape[0]), tf.bool),
  }
  lengths = {'targets': 8, 'audio_features': 4}
  converter = fc.MultimodalDecoderFeatureConverter(modalities=('audio',))
  ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)
  (row,) = list(converter(ds, lengths).as_numpy_iterator())
  np.testing.assert_array_equal(row['audio_features'][:, 0, 0], [1, 2, 3, 0])
  np.testing.assert_array_equal(row['audio_mask'], [True, True, True, False])
  np.testing.assert_array_equal(row['audio_feature_mask'].sum(axis=1), [3, 5, 2, 0])

  del signature['audio_feature_mask']
  ds = tf.data.Dataset.from_generator(
      lambda: ({k: ex[k] for k in signature} for ex in examples), output_signature=signature
  )
  (row,) = list(converter(ds, lengths).as_numpy_iterator())
  np.testing.assert_array_equal(row['audio_feature_mask'].sum(axis=1), [5, 5, 5, 0])


def test_get_model_feature_lengths():
  lengths = {'targets': 64, 'image_features': 4, 'audio_features': 2}
  packed = fc.MultimodalDecoderFeatureConverter(modalities=('image', 'audio'))
  assert packed.get_model_feature_lengths(lengths) == {
      'decoder_target_tokens': 64,
      'decoder_input_tokens': 64,
      'decoder_loss_weights': 64,
      'decoder_segment_ids': 64,
      'decoder_positions': 64,
      'image_features': 4,
      'image_mask': 4,
      'audio_features': 2,
      'audio_mask': 2,
      'audio_feature_mask': 2,
  }
  padded = fc.MultimodalDecoderFeatureConverter(pack=False, modalities=('image',))
  assert padded.get_model_feature_lengths({'targets': 8, 'image_features': 1}) == {
      'decoder_target_tokens': 8,
      'decoder_input_tokens': 8,
      'decoder_loss_weights': 8,
      'image_features': 1,
      'image_mask': 1,
  }


def test_validation_errors_name_the_problem():
  with pytest.raises(ValueError, match='unknown'):
    fc.MultimodalDecoderFeatureConverter(modalities=('smell',))
  converter = fc.MultimodalDecoderFeatureConverter(modalities=('image',))
  lengths = {'targets': 8, 'image_features': 2}
  with pytest.raises(ValueError, match=r"TASK_FEATURE_LENGTHS=.* is missing \['image_features'\]"):
    converter(dataset([EX0], ('image',)), {'targets': 8})
  bad_rank = tf.data.Dataset.from_tensors(
      {
          'targets': EX0['targets'],
          'loss_weights': EX0['loss_weights'],
          'image_features': np.zeros((0, 2, 3), np.float32),
      }
  )
  with pytest.raises(ValueError, match="rank for feature 'image_features'"):
    converter(bad_rank, lengths)
  no_weights = tf.data.Dataset.from_tensors(
      {'targets': EX0['targets'], 'image_features': EX0['image_features']}
  )
  with pytest.raises(ValueError, match='loss_weights'):
    converter(no_weights, lengths)


def test_no_packing_refuses_an_example_that_does_not_fit():
  for misfit, detail in ((TOO_LONG, "'targets' 29 > 28"), (TOO_MANY, "'image_features' 4 > 3")):
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
      convert([EX0, misfit, EX1], length=28, pack=False)
    message = str(error.value)
    assert 'TASK_FEATURE_LENGTHS=' in message and detail in message, message


def test_packing_fails_fast_when_a_repeated_stream_drops_everything():
  converter = fc.MultimodalDecoderFeatureConverter(
      modalities=('image', 'speech'), max_leading_drops=20
  )
  ds = converter(
      dataset([TOO_LONG, TOO_MANY]).repeat(),
      {'targets': 28, 'image_features': 3, 'speech_features': 2},
  )
  with pytest.raises(tf.errors.InvalidArgumentError) as error:
    within(30, lambda: next(iter(ds)))
  message = str(error.value)
  assert 'first 20 examples were all dropped' in message, message
  assert 'TASK_FEATURE_LENGTHS=' in message
  assert "'targets' (limit 28) was 20..29 in them, over the limit in 10" in message
  assert "'image_features' (limit 3) was 0..4 in them, over the limit in 10" in message
  # tf.data may pull a few more elements in the background before the error reaches us.
  assert converter.dropped_examples.total >= 20


def test_probe_first_row_fails_while_the_dataset_is_built():
  """With probe_first_row (t5x's converter) the error comes from the converter call itself;
  a stream that yields rows builds as before and still yields its first row."""
  lengths = {'targets': 28, 'image_features': 3, 'speech_features': 2}
  probing = fc.MultimodalDecoderFeatureConverter(
      modalities=('image', 'speech'), max_leading_drops=20, probe_first_row=True
  )
  with pytest.raises(tf.errors.InvalidArgumentError, match='first 20 examples were all dropped'):
    within(30, lambda: probing(dataset([TOO_LONG, TOO_MANY]).repeat(), lengths))
  ds = within(30, lambda: probing(dataset([EX0, TOO_LONG, EX3]), lengths))
  assert len(list(ds.as_numpy_iterator())) == 1


def test_packing_keeps_going_once_an_example_was_kept():
  converter = fc.MultimodalDecoderFeatureConverter(
      modalities=('image', 'speech'), max_leading_drops=3
  )
  ds = converter(
      dataset([TOO_LONG, TOO_LONG, EX0] + [TOO_LONG] * 10 + [EX3]),
      {'targets': 28, 'image_features': 3, 'speech_features': 2},
  )
  rows = within(30, lambda: list(ds.as_numpy_iterator()))
  assert [int(r['decoder_segment_ids'].max()) for r in rows] == [2]
  assert converter.dropped_examples.total == 12


def test_lengths_of_features_the_converter_does_not_consume_are_ignored():
  """seqio's Evaluator passes a length for every output feature of the task."""
  converter = fc.MultimodalDecoderFeatureConverter(pack=False, modalities=('image',))
  lengths = {
      'targets': 16,
      'image_features': 1,
      'loss_weights': 16,
      'audio_feature_mask': 0,
      'inputs_pretokenized': 1,
      'targets_pretokenized': 1,
      'references': 3,
      'video_features': 0,
      'speech_features': None,
  }
  assert converter.task_lengths(lengths) == {'targets': 16, 'image_features': 1}
  assert converter.get_model_feature_lengths(lengths)['image_mask'] == 1
  rows = list(converter(dataset([EX0, EX1], ('image',)), lengths).as_numpy_iterator())
  assert len(rows) == 2


def test_media_lengths_of_undeclared_modalities_and_missing_lengths_are_refused():
  converter = fc.MultimodalDecoderFeatureConverter(pack=False, modalities=('image',))
  with pytest.raises(
      ValueError,
      match=r'TASK_FEATURE_LENGTHS=.* gives items to modalities '
      r"\['speech'\] that the feature converter was not "
      r'declared with',
  ):
    converter(
        dataset([EX0], ('image',)), {'targets': 16, 'image_features': 1, 'speech_features': 2}
    )
  with pytest.raises(ValueError, match=r"TASK_FEATURE_LENGTHS=.* is missing \['targets'\]"):
    converter.get_model_feature_lengths({'image_features': 1, 'loss_weights': 16})
  with pytest.raises(ValueError, match='max_leading_drops'):
    fc.MultimodalDecoderFeatureConverter(max_leading_drops=-1)
