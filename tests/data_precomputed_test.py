"""Offline features: tools/precompute_features.py writes shards of a tiny manifest (media in tmp)
and precomputed_dataset reads back exactly what manifest_dataset gives; error policies; sharding;
checks of a damaged directory."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

seqio = pytest.importorskip('seqio')
spm = pytest.importorskip('sentencepiece')
tf = pytest.importorskip('tensorflow')
soundfile = pytest.importorskip('soundfile')
gin = pytest.importorskip('gin')

from unimoe_jax.data import manifest as manifest_lib  # noqa: E402
from unimoe_jax.data import precomputed as precomputed_lib  # noqa: E402

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools')
)
import precompute_features  # noqa: E402

from data_fixtures import AUDIO_FRAMES, FRAMES, SIZE, small_config, write_media  # noqa: E402
from data_fixtures import SHORT_AUDIO, TEXT_ONLY, VIDEO_WITH_VOICE, manifest_tokenizer  # noqa: E402
from data_fixtures import turns as _turns  # noqa: E402
from data_fixtures import write_manifest as _write_manifest  # noqa: E402

SOFT = {'image': 3, 'video': 2, 'speech': 2, 'audio': 4}
NUM_SHARDS = 3


GOOD = [
    {'id': 'a', 'image': 'pics/a.png', 'conversations': _turns('<image>\nWhat is this?')},
    {
        'id': 'ab',
        'image': ['pics/a.png', 'pics/b.png'],
        'conversations': _turns('<image> and <image>: same?', 'No.'),
    },
    VIDEO_WITH_VOICE,
    SHORT_AUDIO,
    TEXT_ONLY,
    {'id': 'b', 'image': 'pics/b.png', 'conversations': _turns('<image> Describe.', 'Noise.')},
    {'id': 'sp', 'speech': 'sounds/short.wav', 'conversations': _turns('<speech> Transcribe.')},
]
BROKEN = {'id': 'broken', 'image': 'pics/broken.png', 'conversations': _turns('<image> What?')}
BROKEN_LINE = 3  # 1-based line of BROKEN in the manifest with it


def _config(path, vocab_path, **overrides):
  return small_config(path, vocab_path, SOFT, **overrides)


def _flags(manifest, vocab_path, output, workers, on_bad_example='raise'):
  return [
      '--manifest',
      manifest,
      '--vocab',
      vocab_path,
      '--output',
      str(output),
      '--num_shards',
      str(NUM_SHARDS),
      '--workers',
      str(workers),
      '--video_frames',
      str(FRAMES),
      '--audio_frames',
      str(AUDIO_FRAMES),
      '--voice_modality',
      'speech',
      '--on_bad_example',
      on_bad_example,
      '--gin.ManifestConfig.image_size=16',
  ] + [f'--{m}_soft_tokens={n}' for m, n in SOFT.items()]


def _run_tool(argv):
  try:
    return precompute_features.main(argv)
  finally:
    gin.clear_config()


def _examples(ds):
  return list(ds.as_numpy_iterator())


def _assert_same(got, want):
  assert len(got) == len(want)
  for i, (a, b) in enumerate(zip(got, want)):
    assert sorted(a) == sorted(b), i
    for key in b:
      assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (i, key)
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'example {i} {key}')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('precomputed')
  write_media(root, {'a.png': (30, 40), 'b.png': (20, 18)})
  vocab_path = manifest_tokenizer(
      root, 'Describe the sound and the video. Transcribe. Text only. Noise.', 300
  )
  manifest = _write_manifest(root, 'good.jsonl', GOOD)
  config = _config(manifest, vocab_path)
  reference = _examples(manifest_lib.manifest_dataset(config))
  assert len(reference) == len(GOOD)
  return root, vocab_path, manifest, config, reference


@pytest.fixture(scope='module')
def written(data):
  """The Pool path, once: workers=2 spawned processes (the slow part of this file)."""
  root, vocab_path, manifest, _, _ = data
  output = root / 'out_pool'
  metadata = _run_tool(_flags(manifest, vocab_path, output, workers=2))
  return output, metadata


def test_pool_output_equals_manifest_dataset(data, written):
  _, _, manifest, config, reference = data
  output, metadata = written
  names = [precomputed_lib.shard_name(i, NUM_SHARDS) for i in range(NUM_SHARDS)]
  assert names[1] == 'features.tfrecord-00001-of-00003'
  # Complete shards under final names only; nothing temporary left.
  assert sorted(os.listdir(output)) == sorted(names + ['features.json'])
  with open(output / 'features.json') as f:
    stored = json.load(f)
  assert stored == metadata
  assert stored['num_records'] == stored['num_examples'] == len(GOOD)
  assert stored['bad_examples'] == {}
  assert [s['num_examples'] for s in stored['shards']] == [3, 2, 2]  # round robin
  assert [s['file'] for s in stored['shards']] == names
  assert stored['config']['image_size'] == SIZE  # from the gin binding
  assert stored['config']['path'] == manifest
  assert stored['config'] == json.loads(json.dumps(manifest_lib.dataclasses.asdict(config)))
  ds = precomputed_lib.precomputed_dataset(str(output))
  assert ds.element_spec == manifest_lib.feature_specs(config)
  got = _examples(ds)
  _assert_same(got, reference)
  # The comparison sees real data: media and placeholders of every modality.
  assert got[1]['image_features'].shape == (2, SIZE, SIZE, 3)
  assert got[2]['video_features'].shape[0] == got[2]['speech_features'].shape[0] == 1
  assert got[3]['audio_feature_mask'].any() and not got[3]['audio_feature_mask'].all()
  assert np.abs(got[0]['image_features']).max() > 0.1
  # Reading twice gives the same (a second epoch re-reads the files).
  _assert_same(_examples(ds), reference)


def test_sharding_partitions_examples(data, written):
  reference = data[4]
  output = str(written[0])
  for num_shards in (3, 2):  # 3 divides the 3 files: over files; 2 does not: over records
    parts = [
        _examples(precomputed_lib.precomputed_dataset(output, seqio.ShardInfo(index, num_shards)))
        for index in range(num_shards)
    ]
    for index, part in enumerate(parts):
      _assert_same(part, reference[index::num_shards])  # manifest_dataset's shard
    assert sum(len(p) for p in parts) == len(reference)
  assert precomputed_lib._host_files(['a', 'b', 'c'], seqio.ShardInfo(1, 3)) == (['b'], None)
  assert precomputed_lib._host_files(['a', 'b', 'c'], seqio.ShardInfo(1, 2))[1] is not None


def test_shuffle_is_a_seeded_permutation(data, written):
  reference = data[4]
  output = str(written[0])
  orders = []
  for _ in range(2):
    got = _examples(precomputed_lib.precomputed_dataset(output, shuffle=True, seed=7))
    orders.append([tuple(e['targets']) for e in got])
  assert orders[0] == orders[1]
  assert sorted(orders[0]) == sorted(tuple(e['targets']) for e in reference)


def test_source(data, written):
  _, _, _, config, reference = data
  output = str(written[0])
  source = precomputed_lib.precomputed_source(
      {'train': output, 'validation': output}, expect_config=config
  )
  assert set(source.splits) == {'train', 'validation'}
  assert source.supports_arbitrary_sharding
  assert source.num_input_examples('validation') == len(GOOD)
  _assert_same(_examples(source.get_dataset('train', shuffle=False)), reference)
  _assert_same(
      _examples(source.get_dataset('train', shuffle=False, shard_info=seqio.ShardInfo(1, 3))),
      reference[1::3],
  )
  with pytest.raises(ValueError, match="unknown split 'test'"):
    source.get_dataset('test')


def test_skip_counts_bad_example_and_drops_it(data):
  root, vocab_path, _, _, reference = data
  records = GOOD[: BROKEN_LINE - 1] + [BROKEN] + GOOD[BROKEN_LINE - 1 :]
  manifest = _write_manifest(root, 'with_broken.jsonl', records)
  output = root / 'out_skip'
  manifest_lib.BAD_EXAMPLES.reset()
  metadata = _run_tool(_flags(manifest, vocab_path, output, workers=0, on_bad_example='skip'))
  assert metadata['bad_examples'] == {'media_error': 1}
  assert metadata['num_records'] == len(GOOD) + 1 and metadata['num_examples'] == len(GOOD)
  assert manifest_lib.BAD_EXAMPLES.counts() == {'media_error': 1}
  manifest_lib.BAD_EXAMPLES.reset()
  info = precomputed_lib.read_info(str(output))
  assert info.bad_examples == {'media_error': 1} and info.num_examples == len(GOOD)
  # Skipping keeps the round robin over written examples, so the order survives.
  _assert_same(_examples(precomputed_lib.precomputed_dataset(str(output))), reference)


def test_raise_names_line_and_leaves_no_shards(data):
  root, vocab_path, _, _, _ = data
  records = GOOD[: BROKEN_LINE - 1] + [BROKEN] + GOOD[BROKEN_LINE - 1 :]
  manifest = _write_manifest(root, 'with_broken_raise.jsonl', records)
  output = root / 'out_raise'
  with pytest.raises(manifest_lib.BadExampleError) as error:
    _run_tool(_flags(manifest, vocab_path, output, workers=0, on_bad_example='raise'))
  message = str(error.value)
  assert f'{manifest} line {BROKEN_LINE}' in message and 'broken.png' in message, message
  assert error.value.reason == 'media_error'
  assert os.listdir(output) == []  # no final names, and the temporary files are gone
  with pytest.raises(FileNotFoundError, match='features.json does not exist'):
    precomputed_lib.precomputed_dataset(str(output))


def _copy(written, tmp_path, edit=None):
  target = tmp_path / 'copy'
  shutil.copytree(written[0], target)
  if edit is not None:
    with open(target / 'features.json') as f:
      metadata = json.load(f)
    edit(metadata)
    with open(target / 'features.json', 'w') as f:
      json.dump(metadata, f)
  return str(target)


def test_damaged_or_mismatched_directory_raises(data, written, tmp_path):
  config = data[3]
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match=f'{missing} does not exist'):
    precomputed_lib.precomputed_dataset(missing)

  def set_config(field, value):
    return lambda m: m['config'].__setitem__(field, value)

  cases = [
      (set_config('image_size', 32), r'field "feature_specs.image_features"'),
      (set_config('modalities', ['image']), r'field "feature_specs" has features'),
      (set_config('colour', 1), r"field \"config\" has fields \['colour'\]"),
      (lambda m: m['shards'][1].__setitem__('num_examples', 5), r'field "num_examples"'),
      (lambda m: m['shards'][2].__setitem__('bytes', 1), r'shards\[2\].bytes'),
      (lambda m: m.__setitem__('format_version', 2), r"field 'format_version'"),
  ]
  for edit, pattern in cases:
    directory = _copy(written, tmp_path, edit)
    with pytest.raises(ValueError, match=pattern) as error:
      precomputed_lib.precomputed_dataset(directory)
    assert directory in str(error.value)
    shutil.rmtree(directory)

  directory = _copy(written, tmp_path)
  with pytest.raises(ValueError, match=r'ManifestConfig.image_size is 16 .* but 32'):
    precomputed_lib.read_info(directory, expect_config=_config('x', 'y', image_size=32))
  assert precomputed_lib.read_info(directory, expect_config=config).num_examples == len(GOOD)
  os.remove(os.path.join(directory, precomputed_lib.shard_name(0, NUM_SHARDS)))
  with pytest.raises(FileNotFoundError, match='features.tfrecord-00000-of-00003'):
    precomputed_lib.precomputed_dataset(directory)


def test_encode_example_checks_features(data):
  specs = manifest_lib.feature_specs(data[3])
  example = dict(data[4][0])
  example['loss_weights'] = example['loss_weights'].astype(np.float64)
  with pytest.raises(ValueError, match="feature 'loss_weights' is float64"):
    precomputed_lib.encode_example(example, specs)
  del example['loss_weights']
  with pytest.raises(ValueError, match='example features'):
    precomputed_lib.encode_example(example, specs)
