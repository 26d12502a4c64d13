"""Manifest source: a tiny manifest + media written in tmp, read through manifest_dataset and the
seqio source; error policies; drop_too_long."""

import dataclasses

import numpy as np
import pytest

seqio = pytest.importorskip('seqio')
spm = pytest.importorskip('sentencepiece')
tf = pytest.importorskip('tensorflow')
soundfile = pytest.importorskip('soundfile')

from unimoe_jax.data import conversation as conv_lib  # noqa: E402
from unimoe_jax.data import manifest as manifest_lib  # noqa: E402
from unimoe_jax.data import preprocessors  # noqa: E402
from unimoe_jax.data import vocabulary as vocab_lib  # noqa: E402
from unimoe_jax.media import audio as audio_lib  # noqa: E402
from unimoe_jax.media import image as image_lib  # noqa: E402

from data_fixtures import AUDIO_FRAMES, FRAMES, SIZE, small_config, write_media  # noqa: E402
from data_fixtures import SHORT_AUDIO, TEXT_ONLY, VIDEO_WITH_VOICE, manifest_tokenizer  # noqa: E402
from data_fixtures import turns as _turns  # noqa: E402
from data_fixtures import write_manifest as _write  # noqa: E402

SOFT = {'image': 4, 'video': 3, 'speech': 2, 'audio': 5}
IDS = {'image': -200, 'video': -201, 'speech': -202, 'audio': -203}


GOOD = [
    {'id': 'img', 'image': 'pics/red.png', 'conversations': _turns('<image>\nWhat is this?')},
    VIDEO_WITH_VOICE,
    SHORT_AUDIO,
    TEXT_ONLY,
]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('manifest')
  write_media(root, {'red.png': (30, 40)})
  return root, manifest_tokenizer(root, 'Describe the sound and the video in detail.', 350)


def _config(path, vocab_path, **overrides):
  return small_config(path, vocab_path, SOFT, **overrides)


def test_manifest_dataset_shapes_dtypes_and_content(data):
  root, vocab_path = data
  config = _config(_write(root, 'good.jsonl', GOOD), vocab_path)
  ds = manifest_lib.manifest_dataset(config)
  specs = manifest_lib.feature_specs(config)
  assert ds.element_spec == specs
  assert specs['video_features'].shape.as_list() == [None, FRAMES, SIZE, SIZE, 3]
  assert specs['speech_features'].shape.as_list() == [None, 3000, 80]
  assert specs['audio_feature_mask'].shape.as_list() == [None, AUDIO_FRAMES]
  examples = list(ds.as_numpy_iterator())
  assert len(examples) == len(GOOD)
  items = [
      {'image': 1, 'video': 0, 'speech': 0, 'audio': 0},
      {'image': 0, 'video': 1, 'speech': 1, 'audio': 0},
      {'image': 0, 'video': 0, 'speech': 0, 'audio': 1},
      {'image': 0, 'video': 0, 'speech': 0, 'audio': 0},
  ]
  for example, counts in zip(examples, items):
    assert example['targets'].dtype == np.int32 and example['loss_weights'].dtype == np.float32
    assert example['targets'].shape == example['loss_weights'].shape
    for m, n in counts.items():
      feats = example[f'{m}_features']
      assert feats.dtype == np.float32 and feats.shape == (n,) + config.item_shape(m), m
      assert (example['targets'] == IDS[m]).sum() == n * SOFT[m], m
    assert example['audio_feature_mask'].shape == (counts['audio'], AUDIO_FRAMES)
    assert example['audio_feature_mask'].dtype == bool
  # The right files, preprocessed as the media functions do.
  np.testing.assert_array_equal(
      examples[0]['image_features'][0],
      image_lib.preprocess_image(image_lib.load_image(root / 'pics/red.png'), SIZE, 'crop'),
  )
  np.testing.assert_array_equal(
      examples[1]['speech_features'][0],
      audio_lib.whisper_log_mel(audio_lib.load_audio(root / 'sounds/tone.wav'), 80),
  )
  wave = audio_lib.load_audio(root / 'sounds/short.wav')
  assert len(wave) == 4800  # 0.3 s: fewer frames than AUDIO_FRAMES, so padded
  # Default audio_padding 'official': the fbank of the wave edge-padded to 480000 samples, True
  # on the 30 frames that start on a real sample.
  fbank, _ = audio_lib.beats_chunk_features(wave, 'official', AUDIO_FRAMES)
  np.testing.assert_array_equal(examples[2]['audio_feature_mask'][0], np.arange(64) < 30)
  np.testing.assert_array_equal(examples[2]['audio_features'][0], fbank)
  # 'masked': the fbank of the wave itself (28 frames), zero padded.
  masked = manifest_lib.load_example(
      GOOD[2], 3, dataclasses.replace(config, audio_padding='masked')
  )
  fbank = audio_lib.beats_fbank(wave)
  assert fbank.shape[0] == 28
  np.testing.assert_array_equal(masked['audio_feature_mask'][0], np.arange(64) < 28)
  np.testing.assert_array_equal(masked['audio_features'][0, :28], fbank)
  assert not masked['audio_features'][0, 28:].any()
  # voice as speech: the official "<audio>" placeholder became speech ids.
  assert (examples[1]['targets'] == IDS['audio']).sum() == 0
  vocab = vocab_lib.get_vocabulary(vocab_path)
  for example, record in zip(examples, GOOD):
    answer = conv_lib.decode_prompt(example['targets'][example['loss_weights'] > 0], vocab)
    assert answer == record['conversations'][1]['value'] + '</s>'


def test_json_list_seqio_source_and_sharding(data):
  root, vocab_path = data
  jsonl = _config(_write(root, 'good2.jsonl', GOOD), vocab_path)
  reference = list(manifest_lib.manifest_dataset(jsonl).as_numpy_iterator())
  json_path = _write(root, 'good.json', GOOD, jsonl=False)
  listed = manifest_lib.ManifestConfig(
      **{**jsonl.__dict__, 'path': '', 'splits': {'validation': json_path}}
  )
  source = manifest_lib.seqio_source(listed)
  assert isinstance(source, seqio.FunctionDataSource) and source.splits == ('validation',)
  from_list = list(source.get_dataset('validation', shuffle=False).as_numpy_iterator())
  assert [e['targets'].tolist() for e in from_list] == [e['targets'].tolist() for e in reference]
  shard = list(
      manifest_lib.seqio_source(jsonl).get_dataset(
          'train', shuffle=False, shard_info=seqio.ShardInfo(index=1, num_shards=2)
      )
  )
  assert [e['targets'].numpy().tolist() for e in shard] == [
      reference[1]['targets'].tolist(),
      reference[3]['targets'].tolist(),
  ]
  # Only the configured modalities are features; a record with another one is bad.
  image_only = manifest_lib.ManifestConfig(**{**jsonl.__dict__, 'modalities': ('image',)})
  ds = manifest_lib.manifest_dataset(image_only)
  assert set(ds.element_spec) == {'targets', 'loss_weights', 'image_features'}
  with pytest.raises(Exception, match='line 2: modality_not_enabled'):
    list(ds.as_numpy_iterator())


def _bad_records():
  return [
      GOOD[0],
      {'image': 'pics/missing.png', 'conversations': _turns('<image>\nWhat is this?')},
      {'image': 'pics/broken.png', 'conversations': _turns('<image> What is this?')},
      GOOD[3],
  ]


def test_missing_and_corrupt_media_raise_naming_line_and_file(data):
  root, vocab_path = data
  path = _write(root, 'bad.jsonl', _bad_records())
  with pytest.raises(Exception) as info:
    list(manifest_lib.manifest_dataset(_config(path, vocab_path)).as_numpy_iterator())
  message = str(info.value)
  assert f'{path} line 2' in message and 'missing.png' in message and 'missing_file' in message
  # Line 3 alone (the first error stops iteration).
  path3 = _write(root, 'bad3.jsonl', [GOOD[0], GOOD[3], _bad_records()[2]])
  with pytest.raises(Exception) as info:
    list(manifest_lib.manifest_dataset(_config(path3, vocab_path)).as_numpy_iterator())
  message = str(info.value)
  assert f'{path3} line 3' in message and 'broken.png' in message and 'media_error' in message


def test_skip_policy_drops_and_counts(data):
  root, vocab_path = data
  path = _write(
      root,
      'bad_skip.jsonl',
      _bad_records() + [{'image': 'pics/red.png', 'conversations': _turns('No placeholder here.')}],
  )
  manifest_lib.BAD_EXAMPLES.reset()
  ds = manifest_lib.manifest_dataset(_config(path, vocab_path, on_bad_example='skip'))
  examples = list(ds.as_numpy_iterator())
  assert [e['image_features'].shape[0] for e in examples] == [1, 0]
  assert manifest_lib.BAD_EXAMPLES.counts() == {
      'missing_file': 1,
      'media_error': 1,
      'placeholder_mismatch': 1,
  }
  assert manifest_lib.BAD_EXAMPLES.total == 3


@pytest.mark.parametrize(
    'record,reason',
    [
        (
            {'image': 'pics/red.png', 'conversations': _turns('What is this?')},
            'placeholder_mismatch',
        ),
        (
            {'image': 'pics/red.png', 'conversations': _turns('<image><image> What?')},
            'placeholder_mismatch',
        ),
        (
            {
                'voice': ['sounds/tone.wav', 'sounds/short.wav'],
                'conversations': _turns('<audio> Hm?'),
            },
            'placeholder_mismatch',
        ),
        ({'conversations': _turns('Q?')[::-1]}, 'malformed_conversation'),
        (
            {
                'voice': ['sounds/tone.wav'],
                'audio': 'sounds/short.wav',
                'conversations': _turns('<audio> <audio>'),
            },
            'malformed_conversation',
        ),
        ('{"conversations": [', 'bad_json'),
        ({'id': 3}, 'malformed_record'),
    ],
)
def test_load_example_reports_bad_records(data, record, reason):
  root, vocab_path = data
  config = _config(str(root / 'm.jsonl'), vocab_path)
  with pytest.raises(manifest_lib.BadExampleError) as info:
    manifest_lib.load_example(record, 7, config)
  assert info.value.reason == reason
  assert f'{root / "m.jsonl"} line 7' in str(info.value)


def test_long_voice_becomes_several_chunks(data, tmp_path):
  root, vocab_path = data
  soundfile.write(tmp_path / 'long.wav', np.full(480001 + 16000, 0.1, np.float32), 16000)
  record = {'voice': [str(tmp_path / 'long.wav')], 'conversations': _turns('<audio> Hm?')}
  config = _config(str(root / 'm.jsonl'), vocab_path, audio_max_chunks=3, modalities=('speech',))
  example = manifest_lib.load_example(record, 1, config)
  assert example['speech_features'].shape == (2, 3000, 80)
  assert (example['targets'] == IDS['speech']).sum() == 2 * SOFT['speech']


def test_long_files_keep_the_official_number_of_chunks_by_default(data, tmp_path):
  """audio_max_chunks 0 (default): speech keeps every 480001-sample piece, audio at most 20
  pieces of 480000, as official train/data.py."""
  root, vocab_path = data
  soundfile.write(tmp_path / 'speech.wav', np.full(3 * 480001 + 5, 0.1, np.float32), 16000)
  soundfile.write(tmp_path / 'audio.wav', np.full(21 * 480000 + 5, 0.1, np.float32), 16000)
  config = _config(str(root / 'm.jsonl'), vocab_path, modalities=('speech', 'audio'))
  assert config.audio_max_chunks == 0 and config.audio_padding == 'official'
  record = {
      'speech': str(tmp_path / 'speech.wav'),
      'audio': str(tmp_path / 'audio.wav'),
      'conversations': _turns('<speech> and <audio>?'),
  }
  example = manifest_lib.load_example(record, 1, config)
  assert example['speech_features'].shape == (4, 3000, 80)
  assert example['audio_features'].shape == (20, AUDIO_FRAMES, 128)
  assert example['audio_feature_mask'].all()  # 20 full pieces: no padding
  assert (example['targets'] == IDS['speech']).sum() == 4 * SOFT['speech']
  assert (example['targets'] == IDS['audio']).sum() == 20 * SOFT['audio']
  capped = manifest_lib.load_example(record, 1, dataclasses.replace(config, audio_max_chunks=2))
  assert capped['speech_features'].shape[0] == capped['audio_features'].shape[0] == 2
  with pytest.raises(ValueError, match='audio_max_chunks'):
    dataclasses.replace(config, audio_max_chunks=-1)
  with pytest.raises(ValueError, match='audio_padding'):
    dataclasses.replace(config, audio_padding='zeros')
  with pytest.raises(ValueError, match='audio_frames=3000'):
    dataclasses.replace(config, audio_frames=3000)
  assert dataclasses.replace(config, audio_frames=3000, audio_padding='masked').audio_frames


def test_drop_too_long_drops_and_counts():
  lengths_and_items = [(5, 1), (20, 0), (8, 3), (10, 2), (30, 5)]

  def generator():
    for length, items in lengths_and_items:
      yield {
          'targets': np.arange(length, dtype=np.int32),
          'image_features': np.zeros((items, 2, 2, 3), np.float32),
      }

  ds = tf.data.Dataset.from_generator(
      generator,
      output_signature={
          'targets': tf.TensorSpec([None], tf.int32),
          'image_features': tf.TensorSpec([None, 2, 2, 3], tf.float32),
      },
  )
  preprocessors.DROPPED_TOO_LONG.reset()
  kept = list(
      preprocessors.drop_too_long(
          ds, {'targets': 10, 'image_features': 2, 'video_features': 1}
      ).as_numpy_iterator()
  )
  assert [(len(e['targets']), len(e['image_features'])) for e in kept] == [(5, 1), (10, 2)]
  # The first limit (sorted keys) that failed is the counted reason.
  assert preprocessors.DROPPED_TOO_LONG.counts() == {'targets': 1, 'image_features': 2}
  assert len(list(preprocessors.drop_too_long(ds, None))) == 5
