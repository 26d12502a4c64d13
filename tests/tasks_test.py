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
from unimoe_jax.data import feature_converter as fc_lib  # pylint: disable=g-import-not-at-top
from unimoe_jax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
from unimoe_jax.tasks import sample  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]
LENGTHS = {'targets': 192, 'image_features': 2, 'video_features': 1, 'speech_features': 1,
           'audio_features': 1}
ROWS = 2


def _make_sample_data(directory):
  spec = importlib.util.spec_from_file_location('make_sample_data',
                                                ROOT / 'tools' / 'make_sample_data.py')
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  assert tool.main(['--output', str(directory), '--train', '8', '--validation', '4']) == 0


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
  converter = fc_lib.MultimodalDecoderFeatureConverter(
      pack=True, modalities=manifest_lib.MODALITIES)
  ds = seqio.get_dataset(name, LENGTHS, converter, dataset_split=split, shuffle=False,
                         trim_output_features=False)
  return list(ds.batch(ROWS).take(2).as_numpy_iterator())


def _expected_shapes():
  shapes = {'decoder_input_tokens': (ROWS, 192), 'decoder_target_tokens': (ROWS, 192),
            'decoder_loss_weights': (ROWS, 192), 'decoder_segment_ids': (ROWS, 192),
            'decoder_positions': (ROWS, 192)}
  item = {'image': (32, 32, 3), 'video': (8, 32, 32, 3), 'speech': (3000, 80),
          'audio': (128, 128)}
  for m, s in item.items():
    n = LENGTHS[f'{m}_features']
    shapes[f'{m}_features'] = (ROWS, n) + s
    shapes[f'{m}_mask'] = (ROWS, n)
  shapes['audio_feature_mask'] = (ROWS, LENGTHS['audio_features'], 128)
  return shapes


@pytest.mark.slow
@pytest.mark.parametrize('name', ['unimoe_sample_stage1', 'unimoe_sample_stage2_video',
                                  'unimoe_sample_stage3', 'unimoe_sample_eval'])
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
      np.testing.assert_array_equal((batch['decoder_input_tokens'] == token).sum(axis=1),
                                    batch[f'{m}_mask'].sum(axis=1) * n)


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
  gin.parse_config([
      f"unimoe_jax.tasks.common.vocabulary_path.path = '{sample_dir / 'tokenizer.model'}'",
      f"stage3/unimoe_jax.data.manifest.ManifestConfig.splits = "
      f"{{'train': '{sample_dir / 'train' / 'instruct_image.json'}'}}",
      f"stage3/unimoe_jax.data.manifest.ManifestConfig.media_root = '{sample_dir}'",
      'stage3/unimoe_jax.data.manifest.ManifestConfig.image_size = 32',
      'stage3/unimoe_jax.data.manifest.ManifestConfig.modalities = ("image",)',
      'stage3/unimoe_jax.data.manifest.ManifestConfig.image_soft_tokens = 16',
  ])
  task = seqio.get_mixture_or_task('unimoe_manifest_stage3')
  example = next(task.get_dataset(None, split='train', shuffle=False).as_numpy_iterator())
  assert example['image_features'].shape == (1, 32, 32, 3)
  assert (example['targets'] == -200).sum() == 16


def test_manifest_task_without_gin_names_the_binding():
  task = seqio.get_mixture_or_task('unimoe_manifest_stage1')
  with pytest.raises(ValueError, match='stage1/ManifestConfig.splits'):
    task.get_dataset(None, split='train', shuffle=False)


def test_manifest_task_reads_precomputed_features_when_bound(sample_dir, tmp_path):
  spec = importlib.util.spec_from_file_location('precompute_features',
                                                ROOT / 'tools' / 'precompute_features.py')
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  manifest = sample_dir / 'train' / 'instruct_image.json'
  tool.main(['--manifest', str(manifest), '--vocab', str(sample_dir / 'tokenizer.model'),
             '--output', str(tmp_path / 'features'), '--media_root', str(sample_dir),
             '--workers', '0', '--num_shards', '2', '--image_size', '32',
             '--modalities', 'image', '--image_soft_tokens', '16'])
  gin.parse_config([
      f"unimoe_jax.tasks.common.vocabulary_path.path = '{sample_dir / 'tokenizer.model'}'",
      f"stage2/unimoe_jax.tasks.common.precomputed_splits.splits = "
      f"{{'train': '{tmp_path / 'features'}'}}",
  ])
  task = seqio.get_mixture_or_task('unimoe_manifest_stage2')
  got = list(task.get_dataset(None, split='train', shuffle=False).as_numpy_iterator())
  assert len(got) == len(json.loads(manifest.read_text()))
  assert got[0]['image_features'].shape == (1, 32, 32, 3)
