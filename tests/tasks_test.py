"""The seqio registry over the sample data: every stage's mixture yields batches of the declared
shapes through the multimodal feature converter; bad media are reported as configured."""

import importlib.util
import json
import pathlib

import gin
import numpy as np
import pytest

seqio = pytest.importorskip('seqio')

import unimoe_jax  # pylint: disable=g-import-not-at-top
from unimoe_jax import sample_data  # pylint: disable=g-import-not-at-top
from unimoe_jax.data import feature_converter as fc_lib  # pylint: disable=g-import-not-at-top
from unimoe_jax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
from unimoe_jax.modalities import MODALITIES, PLACEHOLDERS  # pylint: disable=g-import-not-at-top
from unimoe_jax.tasks import sample  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]
LENGTHS = {
    'targets': 192,
    'image_features': 2,
    'video_features': 1,
    'speech_features': 1,
    'audio_features': 1,
}
ROWS = 2


def _make_sample_data(directory):
  sample_data.make_sample_data(str(directory), num_train=8, num_validation=4)
  sample_data.train_tokenizer(str(directory))


@pytest.fixture(scope='module')
def sample_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('sample')
  _make_sample_data(directory)
  return directory


@pytest.fixture(autouse=True)
def _bind(sample_dir, monkeypatch):
  monkeypatch.setenv('UNIMOE_SAMPLE_DATA', str(sample_dir))
  gin.clear_config()
  yield
  gin.clear_config()


def _batches(name, split='train'):
  converter = fc_lib.MultimodalDecoderFeatureConverter(pack=True, modalities=MODALITIES)
  ds = seqio.get_dataset(
      name, LENGTHS, converter, dataset_split=split, shuffle=False, trim_output_features=False
  )
  return list(ds.batch(ROWS).take(2).as_numpy_iterator())


def _expected_shapes():
  shapes = {
      'decoder_input_tokens': (ROWS, 192),
      'decoder_target_tokens': (ROWS, 192),
      'decoder_loss_weights': (ROWS, 192),
      'decoder_segment_ids': (ROWS, 192),
      'decoder_positions': (ROWS, 192),
  }
  item = {'image': (32, 32, 3), 'video': (8, 32, 32, 3), 'speech': (3000, 80), 'audio': (128, 128)}
  for m, s in item.items():
    n = LENGTHS[f'{m}_features']
    shapes[f'{m}_features'] = (ROWS, n) + s
    shapes[f'{m}_mask'] = (ROWS, n)
  shapes['audio_feature_mask'] = (ROWS, LENGTHS['audio_features'], 128)
  return shapes


@pytest.mark.slow
@pytest.mark.parametrize(
    'name',
    [
        'unimoe_sample_stage1',
        'unimoe_sample_stage2_video',
        'unimoe_sample_stage3',
        'unimoe_sample_eval',
    ],
)
def test_stage_mixtures_yield_batches_of_the_declared_shapes(name):
  batches = _batches(name)
  assert batches
  expected = _expected_shapes()
  ids = {'image': -200, 'video': -201, 'speech': -202, 'audio': -203}
  for batch in batches:
    assert {k: v.shape for k, v in batch.items()} == expected
    assert batch['decoder_loss_weights'].sum() > 0
    for m, token in ids.items():
      # Placeholders in the model's input = real items x soft tokens (the splice contract).
      n = sample.SETTINGS[f'{m}_soft_tokens']
      np.testing.assert_array_equal(
          (batch['decoder_input_tokens'] == token).sum(axis=1), batch[f'{m}_mask'].sum(axis=1) * n
      )


def test_soft_token_counts_match_the_tiny_model():
  for path in unimoe_jax.gin_search_paths():
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(['models/tiny.gin', 'models/multimodal_tiny.gin'], [])
  cfg = gin.query_parameter('%MODEL_CONFIG').scoped_configurable_fn()
  for m in ('image', 'video', 'speech', 'audio'):
    assert sample.SETTINGS[f'{m}_soft_tokens'] == cfg.num_soft_tokens(m), m
  assert sample.SETTINGS['image_size'] == cfg.vision.image_size
  assert sample.SETTINGS['n_mels'] == cfg.speech_encoder.num_mel_bins
  vocab = sample.VOCABULARY
  assert vocab.vocab_size <= cfg.decoder.vocab_size


def _break_media(sample_dir):
  """Corrupts the first image and deletes the first audio clip of the training split."""
  manifest = json.loads((sample_dir / 'train' / 'align_image.json').read_text())
  image = sample_dir / manifest[0]['image']
  image.write_bytes(b'not a png')
  audio = json.loads((sample_dir / 'train' / 'align_audio.json').read_text())
  (sample_dir / audio[0]['voice'][0]).unlink()
  return image, sample_dir / audio[0]['voice'][0]


def test_bad_media_raise_naming_manifest_line_and_file(tmp_path, monkeypatch):
  _make_sample_data(tmp_path)
  monkeypatch.setenv('UNIMOE_SAMPLE_DATA', str(tmp_path))
  image, audio = _break_media(tmp_path)
  task = seqio.get_mixture_or_task('unimoe_sample_align_image')
  with pytest.raises(Exception, match=r'align_image\.json record 1.*' + image.name):
    list(task.get_dataset(None, split='train', shuffle=False).as_numpy_iterator())
  task = seqio.get_mixture_or_task('unimoe_sample_align_audio')
  with pytest.raises(Exception, match=audio.name):
    list(task.get_dataset(None, split='train', shuffle=False).as_numpy_iterator())


def test_bad_media_skipped_and_counted_when_configured(tmp_path, monkeypatch):
  _make_sample_data(tmp_path)
  monkeypatch.setenv('UNIMOE_SAMPLE_DATA', str(tmp_path))
  _break_media(tmp_path)
  gin.parse_config('unimoe_jax.data.manifest.ManifestConfig.on_bad_example = "skip"')
  manifest_lib.BAD_EXAMPLES.reset()
  for name in ('unimoe_sample_align_image', 'unimoe_sample_align_audio'):
    task = seqio.get_mixture_or_task(name)
    examples = list(task.get_dataset(None, split='train', shuffle=False).as_numpy_iterator())
    assert len(examples) == 8 - 1  # The one bad example is gone, the rest are there.
  counts = manifest_lib.BAD_EXAMPLES.counts()
  assert sum(counts.values()) == 2, counts


def test_manifest_task_reads_its_gin_scope(sample_dir):
  gin.parse_config(
      [
          f"unimoe_jax.tasks.common.vocabulary_path.path = '{sample_dir / 'tokenizer.model'}'",
          f'stage3/unimoe_jax.data.manifest.ManifestConfig.splits = '
          f"{{'train': '{sample_dir / 'train' / 'instruct_image.json'}'}}",
          f"stage3/unimoe_jax.data.manifest.ManifestConfig.media_root = '{sample_dir}'",
          'stage3/unimoe_jax.data.manifest.ManifestConfig.image_size = 32',
          'stage3/unimoe_jax.data.manifest.ManifestConfig.modalities = ("image",)',
          'stage3/unimoe_jax.data.manifest.ManifestConfig.image_soft_tokens = 16',
      ]
  )
  task = seqio.get_mixture_or_task('unimoe_manifest_stage3')
  example = next(task.get_dataset(None, split='train', shuffle=False).as_numpy_iterator())
  assert example['image_features'].shape == (1, 32, 32, 3)
  assert (example['targets'] == -200).sum() == 16


def test_manifest_task_without_gin_names_the_binding():
  task = seqio.get_mixture_or_task('unimoe_manifest_stage1')
  with pytest.raises(ValueError, match='stage1/ManifestConfig.splits'):
    task.get_dataset(None, split='train', shuffle=False)


def test_manifest_task_reads_precomputed_features_when_bound(sample_dir, tmp_path):
  spec = importlib.util.spec_from_file_location(
      'precompute_features', ROOT / 'tools' / 'precompute_features.py'
  )
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  manifest = sample_dir / 'train' / 'instruct_image.json'
  tool.main(
      [
          '--manifest',
          str(manifest),
          '--vocab',
          str(sample_dir / 'tokenizer.model'),
          '--output',
          str(tmp_path / 'features'),
          '--media_root',
          str(sample_dir),
          '--workers',
          '0',
          '--num_shards',
          '2',
          '--image_size',
          '32',
          '--modalities',
          'image',
          '--image_soft_tokens',
          '16',
      ]
  )
  gin.parse_config(
      [
          f"unimoe_jax.tasks.common.vocabulary_path.path = '{sample_dir / 'tokenizer.model'}'",
          f'stage2/unimoe_jax.tasks.common.precomputed_splits.splits = '
          f"{{'train': '{tmp_path / 'features'}'}}",
      ]
  )
  task = seqio.get_mixture_or_task('unimoe_manifest_stage2')
  got = list(task.get_dataset(None, split='train', shuffle=False).as_numpy_iterator())
  records = json.loads(manifest.read_text())
  assert len(got) == len(records)
  assert got[0]['image_features'].shape == (1, 32, 32, 3)
  # Precomputed features hold no text: the texts are decoded from 'targets' all the same.
  for record, ex in zip(records, got):
    prompt, answer = _expected_texts(record, voice_as_speech=False)
    assert ex['inputs_pretokenized'].decode() == prompt
    assert ex['targets_pretokenized'].decode() == answer


# ---- what t5x's binaries need of the tasks -------------------------------------------------


def _expected_texts(record, voice_as_speech):
  """(prompt, answer) from the manifest record: the conversation rendered up to its last
  answer, and that answer."""
  from unimoe_jax.data import conversation as conv_lib  # pylint: disable=g-import-not-at-top

  turns = [dict(t) for t in record['conversations']]
  if voice_as_speech:
    for t in turns:
      t['value'] = t['value'].replace('<audio>', '<speech>')
  prompt = conv_lib.prompt_text(turns[:-1] + [{'from': 'gpt', 'value': ''}])
  return prompt, turns[-1]['value'].strip()


@pytest.mark.parametrize(
    'task, manifest, voice_as_speech',
    [
        ('unimoe_sample_instruct_image', 'instruct_image', False),  # multi-turn
        ('unimoe_sample_instruct_speech', 'instruct_speech', True),  # "<audio>" read as speech
        ('unimoe_sample_eval_video_open', 'eval_video_open', False),
    ],
)
def test_examples_carry_the_prompt_and_answer_texts(sample_dir, task, manifest, voice_as_speech):
  """t5x.infer writes every '*_pretokenized' task feature into its output 'inputs'."""
  records = json.loads((sample_dir / 'train' / f'{manifest}.json').read_text())
  examples = list(
      seqio.get_mixture_or_task(task)
      .get_dataset(
          {
              'targets': 1024,
              'image_features': 1,
              'video_features': 1,
              'speech_features': 1,
              'audio_features': 1,
          },
          split='train',
          shuffle=False,
      )
      .as_numpy_iterator()
  )
  assert len(examples) == len(records)
  if manifest.startswith('instruct'):  # multi-turn: earlier answers render with "</s>"
    assert any(len(r['conversations']) > 2 for r in records)
  vocab = sample.VOCABULARY
  from unimoe_jax.tasks import common  # pylint: disable=g-import-not-at-top

  for record, ex in zip(records, examples):
    prompt, answer = _expected_texts(record, voice_as_speech)
    assert ex['inputs_pretokenized'].decode() == prompt
    assert ex['targets_pretokenized'].decode() == answer
    assert answer == common.last_answer(ex['targets'], ex['loss_weights'], vocab)
    # One placeholder string, however many soft tokens it stands for.
    assert sum(prompt.count(p) for p in PLACEHOLDERS.values()) == 1 and answer


def test_mixtures_pass_the_texts_through_and_the_converter_ignores_them():
  mixture = seqio.get_mixture_or_task('unimoe_sample_stage2_image')
  lengths = {'targets': 512, 'image_features': 2}
  ds = mixture.get_dataset(lengths, split='train', shuffle=False)
  assert {'inputs_pretokenized', 'targets_pretokenized'} <= set(ds.element_spec)
  assert ds.element_spec['inputs_pretokenized'].shape.rank == 0
  converter = fc_lib.MultimodalDecoderFeatureConverter(pack=True, modalities=('image',))
  (batch,) = list(
      seqio.get_dataset('unimoe_sample_stage2_image', lengths, converter, shuffle=False)
      .batch(2)
      .take(1)
      .as_numpy_iterator()
  )
  assert sorted(batch) == sorted(converter.get_model_feature_lengths(lengths))


def test_eval_dataset_length_is_known_with_on_too_long_raise(sample_dir):
  """t5x's inference calls len() on the converted dataset and zips it with the task's."""
  gin.parse_config("unimoe_jax.data.preprocessors.drop_too_long.on_too_long = 'raise'")
  records = json.loads((sample_dir / 'validation' / 'eval_image_open.json').read_text())
  lengths = {'targets': 256, 'image_features': 1}
  converter = fc_lib.MultimodalDecoderFeatureConverter(pack=False, modalities=('image',))
  ds = seqio.get_dataset(
      'unimoe_sample_eval_image_open',
      lengths,
      converter,
      num_epochs=1,
      shuffle=False,
      dataset_split='validation',
  )
  assert len(ds) == len(records) == len(list(ds.as_numpy_iterator()))
  short = seqio.get_dataset(
      'unimoe_sample_eval_image_open',
      dict(lengths, targets=32),
      converter,
      num_epochs=1,
      shuffle=False,
      dataset_split='validation',
  )
  assert len(short) == len(records)
  with pytest.raises(
      Exception,
      match=r'task unimoe_sample_eval_image_open does not fit '
      r"TASK_FEATURE_LENGTHS=.*'targets' \d+ > 32",
  ):
    list(short.as_numpy_iterator())


@pytest.mark.parametrize(
    'modalities, sequence_length',
    [
        (('image',), {'targets': 256, 'image_features': 1}),
        (('image',), None),
        (MODALITIES, dict(LENGTHS, targets=256)),
    ],
)
def test_seqio_evaluator_builds_its_datasets_with_the_converter(
    sample_dir, modalities, sequence_length
):
  """seqio's Evaluator (t5x.eval) passes a length for every output feature of the task; with
  sequence_length None it measures them (0 items for modalities the examples lack)."""
  converter = fc_lib.MultimodalDecoderFeatureConverter(pack=False, modalities=modalities)
  evaluator = seqio.Evaluator(
      'unimoe_sample_eval_image_open',
      converter,
      eval_split='validation',
      use_cached=False,
      sequence_length=sequence_length,
  )
  # pylint: disable-next=protected-access
  ds = evaluator._cached_model_datasets['unimoe_sample_eval_image_open']
  records = json.loads((sample_dir / 'validation' / 'eval_image_open.json').read_text())
  assert len(ds) == len(records)
  _, row = next(ds.as_numpy_iterator())
  assert row['image_mask'].sum() == 1 and row['image_mask'][0]
  assert set(row) == set(
      converter.get_model_feature_lengths(sequence_length or {'targets': 1, 'image_features': 1})
  )


def test_a_mixture_keeps_the_texts_only_when_all_its_tasks_have_them():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from unimoe_jax.tasks import common  # pylint: disable=g-import-not-at-top

  features = fc_lib.output_features(seqio.PassThroughVocabulary(100), ('image',))

  def register(name, with_texts):
    def dataset_fn(split, shuffle_files, seed=None):
      del split, shuffle_files, seed
      return tf.data.Dataset.from_tensors(
          {
              'targets': tf.constant([1, 5, 2]),
              'loss_weights': tf.constant([0.0, 1.0, 1.0]),
              'image_features': tf.zeros([0, 2, 2, 3]),
          }
      )

    def add_texts(ds):
      return ds.map(
          lambda ex: dict(
              ex, inputs_pretokenized=tf.constant('q'), targets_pretokenized=tf.constant('a')
          )
      )

    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=('train',)),
        preprocessors=[add_texts] if with_texts else [],
        output_features=features,
    )
    return name

  with_texts = [register('texts_test_a', True), register('texts_test_b', True)]
  mixture = common.register_mixture('texts_test_both', with_texts)
  ex = next(mixture.get_dataset(None, shuffle=False).as_numpy_iterator())
  assert ex['inputs_pretokenized'] == b'q' and ex['targets_pretokenized'] == b'a'
  mixture = common.register_mixture(
      'texts_test_one', [with_texts[0], register('texts_test_c', False)]
  )
  examples = list(mixture.get_dataset(None, shuffle=False).take(4).as_numpy_iterator())
  assert examples and all(sorted(ex) == sorted(features) for ex in examples)
