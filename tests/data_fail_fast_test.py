"""An input pipeline that can yield nothing fails fast, naming TASK_FEATURE_LENGTHS.

`preprocessors.drop_too_long` on a repeated dataset (seqio repeats a training dataset before
its preprocessors) raises once its first `max_leading_drops` examples were all dropped, per
task in a mixture; with `on_too_long='raise'` it keeps the cardinality and raises on the first
misfit. The training loop turns an exhausted stream into an error naming TASK_FEATURE_LENGTHS.
Everything that could hang runs under `within`.
"""

import functools

import gin
import numpy as np
import pytest

from run_within import within

tf = pytest.importorskip('tensorflow')
seqio = pytest.importorskip('seqio')

from unimoe_jax.data import feature_converter as fc  # noqa: E402
from unimoe_jax.data import preprocessors  # noqa: E402


def _examples(lengths, items=None):
  items = items or [0] * len(lengths)
  return [
      {
          'targets': np.arange(n, dtype=np.int32) + 1,
          'loss_weights': np.ones(n, np.float32),
          'image_features': np.zeros((k, 2, 2, 3), np.float32),
      }
      for n, k in zip(lengths, items)
  ]


def _dataset(examples):
  """The examples as a dataset of known cardinality (like seqio's Evaluator datasets)."""
  signature = {
      'targets': tf.TensorSpec([None], tf.int32),
      'loss_weights': tf.TensorSpec([None], tf.float32),
      'image_features': tf.TensorSpec([None, 2, 2, 3], tf.float32),
  }
  ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)
  return ds.apply(tf.data.experimental.assert_cardinality(len(examples)))


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _message(error_info) -> str:
  return str(error_info.value)


# ---- drop_too_long -------------------------------------------------------------------------


def test_repeated_dataset_whose_examples_all_drop_raises_after_max_leading_drops():
  ds = _dataset(_examples([5, 7, 6])).repeat()
  ds = preprocessors.drop_too_long(
      ds, {'targets': 4, 'image_features': 1}, task_name='t', max_leading_drops=10
  )
  with pytest.raises(tf.errors.InvalidArgumentError) as error:
    within(30, lambda: next(iter(ds)))
  message = _message(error)
  assert 'drop_too_long: the first 10 examples of task t were all dropped' in message
  assert "TASK_FEATURE_LENGTHS={'targets': 4, 'image_features': 1}" in message
  assert "'targets' (limit 4) was 5..7 in them, over the limit in 10" in message
  assert "'image_features' (limit" not in message  # it fit: not a reason


def test_the_default_and_the_gin_binding_of_max_leading_drops():
  assert preprocessors.MAX_LEADING_DROPS == 128
  preprocessors.DROPPED_TOO_LONG.reset()
  ds = preprocessors.drop_too_long(_dataset(_examples([9])).repeat(), {'targets': 4})
  with pytest.raises(tf.errors.InvalidArgumentError, match='the first 128 examples'):
    within(30, lambda: next(iter(ds)))
  assert preprocessors.DROPPED_TOO_LONG.counts()['targets'] >= 128

  gin.parse_config('unimoe_jax.data.preprocessors.drop_too_long.max_leading_drops = 3')
  ds = preprocessors.drop_too_long(_dataset(_examples([9])).repeat(), {'targets': 4})
  with pytest.raises(tf.errors.InvalidArgumentError, match='the first 3 examples'):
    within(30, lambda: next(iter(ds)))


def test_a_kept_example_disables_the_check_and_zero_never_raises():
  lengths = [9, 9, 3] + [9] * 20 + [2]
  ds = preprocessors.drop_too_long(
      _dataset(_examples(lengths)), {'targets': 4}, max_leading_drops=3
  )
  kept = within(30, lambda: [len(ex['targets']) for ex in ds.as_numpy_iterator()])
  assert kept == [3, 2]
  ds = preprocessors.drop_too_long(
      _dataset(_examples([9] * 300 + [2])), {'targets': 4}, max_leading_drops=0
  )
  assert within(30, lambda: [len(ex['targets']) for ex in ds.as_numpy_iterator()]) == [2]


def test_the_count_is_per_dataset_not_per_process():
  """Two datasets, each dropping fewer than the limit, do not add up to a failure."""
  for _ in range(3):
    ds = preprocessors.drop_too_long(
        _dataset(_examples([9, 9, 9, 2])), {'targets': 4}, max_leading_drops=4
    )
    assert within(30, lambda ds=ds: len(list(ds.as_numpy_iterator()))) == 1


def test_on_too_long_raise_keeps_every_example_and_the_cardinality():
  gin.parse_config("unimoe_jax.data.preprocessors.drop_too_long.on_too_long = 'raise'")
  fits = preprocessors.drop_too_long(
      _dataset(_examples([3, 4, 2], [1, 0, 1])), {'targets': 4, 'image_features': 1}
  )
  assert len(fits) == 3
  assert [len(ex['targets']) for ex in fits.as_numpy_iterator()] == [3, 4, 2]
  misfit = preprocessors.drop_too_long(
      _dataset(_examples([3, 4, 2], [1, 2, 1])), {'targets': 3, 'image_features': 1}, task_name='t'
  )
  assert len(misfit) == 3
  with pytest.raises(tf.errors.InvalidArgumentError) as error:
    list(misfit.as_numpy_iterator())
  message = _message(error)
  assert "drop_too_long(on_too_long='raise'): an example of task t does not fit" in message
  assert "TASK_FEATURE_LENGTHS={'targets': 3, 'image_features': 1}" in message
  assert "'image_features' 2 > 1, 'targets' 4 > 3" in message


def test_bad_settings_name_the_binding():
  ds = _dataset(_examples([3]))
  with pytest.raises(ValueError, match='drop_too_long.on_too_long'):
    preprocessors.drop_too_long(ds, {'targets': 4}, on_too_long='cut')
  with pytest.raises(ValueError, match='drop_too_long.max_leading_drops'):
    preprocessors.drop_too_long(ds, {'targets': 4}, max_leading_drops=-1)


# ---- a seqio mixture: one task that drops everything fails the mixture --------------------


def _register(name, lengths):
  data = _examples(lengths)

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return _dataset(data)

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=('train',)),
      preprocessors=[functools.partial(preprocessors.drop_too_long, task_name=name)],
      output_features=fc.output_features(seqio.PassThroughVocabulary(100), ('image',)),
  )
  return name


def test_a_mixture_fails_naming_the_task_whose_examples_all_drop():
  short = _register('fail_fast_test_short', [3, 4, 2, 3])
  long_ = _register('fail_fast_test_long', [9, 12, 10])
  mixture = 'fail_fast_test_mixture'
  if mixture in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(mixture, [short, long_], default_rate=1.0)
  gin.parse_config('unimoe_jax.data.preprocessors.drop_too_long.max_leading_drops = 16')
  lengths = {'targets': 8, 'image_features': 1}
  ds = seqio.get_dataset(
      mixture,
      lengths,
      fc.MultimodalDecoderFeatureConverter(modalities=('image',)),
      num_epochs=None,
      shuffle=True,
      seed=0,
  )
  with pytest.raises(tf.errors.InvalidArgumentError) as error:
    within(60, lambda: [row for _, row in zip(range(1000), ds.as_numpy_iterator())])
  message = _message(error)
  assert 'first 16 examples of task fail_fast_test_long were all dropped' in message
  assert "'targets' (limit 8) was 9..12" in message


# ---- the training loop (python -m unimoe_jax.train) ----------------------------------------


def _register_lm(name, lengths, with_drop_too_long):
  """A text-only task like tests/tiny_tasks.py whose train split has examples of `lengths`."""
  import tiny_tasks  # pylint: disable=g-import-not-at-top

  data = [
      {'targets': np.full(n, 5, np.int32), 'loss_weights': np.ones(n, np.float32)} for n in lengths
  ]

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tiny_tasks.generator_dataset(data)

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=('train',)),
      preprocessors=[preprocessors.drop_too_long] if with_drop_too_long else [],
      output_features=fc.output_features(tiny_tasks.VOCABULARY, ()),
  )
  return name


@pytest.mark.parametrize(
    'lengths, with_drop_too_long', [([], False), ([100] * 5, True), ([100] * 5, False)]
)
def test_training_data_that_yields_nothing_names_task_feature_lengths(
    tmp_path, lengths, with_drop_too_long
):
  """An empty split, or a few examples that all drop (fewer than max_leading_drops), end in an
  error naming TASK_FEATURE_LENGTHS instead of a bare StopIteration or a hang."""
  import tiny_tasks  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import loop  # pylint: disable=g-import-not-at-top

  name = _register_lm(
      f'fail_fast_test_lm_{len(lengths)}_{int(with_drop_too_long)}', lengths, with_drop_too_long
  )
  kwargs = tiny_tasks.train_kwargs(
      str(tmp_path), mixture_or_task_name=name, mixture_or_task_module=(), train_steps=2
  )
  with pytest.raises(ValueError, match=r"TASK_FEATURE_LENGTHS.*'targets': 64"):
    within(300, lambda: loop.train(**kwargs))
