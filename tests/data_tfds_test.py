"""TFDS sources (LibriSpeech, COCO captions): examples, equality with manifest examples, tasks.

The data dirs are real TFDS data dirs written by the real builders (tfrecords +
dataset_info.json), with only their `_split_generators` replaced by a few hand-made examples
(the real ones download and decode FLAC with pydub), so the reading path is what a user with a
prepared data dir runs. `tfds.testing.mock_data` is used too, but its data sets have no split
metadata, which seqio's Task.get_dataset reads (`num_input_examples`).
"""

import dataclasses
import json
import sys
from unittest import mock

import numpy as np
import pytest

pytest.importorskip('seqio')
pytest.importorskip('sentencepiece')
tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')
soundfile = pytest.importorskip('soundfile')
Image = pytest.importorskip('PIL.Image')

import gin  # noqa: E402
import seqio  # noqa: E402

from unimoe_jax.data import conversation as conv_lib  # noqa: E402
from unimoe_jax.data import feature_converter as fc_lib  # noqa: E402
from unimoe_jax.data import manifest as manifest_lib  # noqa: E402
from unimoe_jax.data import metrics as metrics_lib  # noqa: E402
from unimoe_jax.data import tfds_sources as ts  # noqa: E402
from unimoe_jax.data import vocabulary as vocab_lib  # noqa: E402
from unimoe_jax.media import audio as audio_lib  # noqa: E402
from unimoe_jax.media import image as image_lib  # noqa: E402
from unimoe_jax.modalities import PLACEHOLDERS  # noqa: E402

from data_fixtures import llama_like_tokenizer  # noqa: E402

SETTINGS = ts.TfdsSettings(
    image_size=32,
    n_mels=80,
    video_frames=2,
    audio_frames=16,
    image_soft_tokens=4,
    video_soft_tokens=5,
    speech_soft_tokens=3,
    audio_soft_tokens=2,
)
PLACEHOLDER_IDS = vocab_lib.DEFAULT_PLACEHOLDER_IDS


@pytest.fixture(scope='module')
def vocab(tmp_path_factory):
  corpus = [
      conv_lib.SYSTEM,
      ts.ASR_PROMPT,
      ts.CAPTION_PROMPT,
      'USER: ASSISTANT: hello world',
      "it's a dog on a mat. a cat sits. the quick brown fox jumps 0123456789",
  ]
  return vocab_lib.get_vocabulary(llama_like_tokenizer(tmp_path_factory.mktemp('spm'), corpus))


# ------------------------------------------------------------------------------------------------
# Real TFDS data dirs with hand-made examples.


def _prepare(name, examples_by_split, data_dir):
  """Runs the real builder of `name` with its examples replaced by `examples_by_split`."""
  builder = tfds.builder(name, data_dir=data_dir)

  def split_generators(self, dl_manager):
    del self, dl_manager
    return {split: iter(examples) for split, examples in examples_by_split.items()}

  # code_path: TFDS looks for a checksums file next to the builder's code, through
  # importlib_resources, which this environment lacks; no download happens here.
  with mock.patch.object(type(builder), '_split_generators', split_generators), mock.patch.object(
      tfds.core.DatasetBuilder, 'code_path', None
  ):
    builder.download_and_prepare()


def _librispeech_builder_splits():
  """The splits the real LibriSpeech builder writes (its download table's keys, dev_clean ...
  train_other500): TFDS's own list, not `tfds_sources`' copy, so a wrong split name there fails
  the tests that read it instead of being written into the data dir."""
  module = sys.modules[tfds.builder_cls('librispeech').__module__]
  return tuple(module._DL_URLS)  # pylint: disable=protected-access


def _librispeech_examples(rng):
  out = {}
  for i, split in enumerate(_librispeech_builder_splits()):
    examples = []
    for j in range(2):
      key = f'{10 + i}-{20 + i}-{j:04d}'
      # dev_clean's second utterance is 31 s long: only its first 30 s may be used.
      samples = 31 * 16000 if (split, j) == ('dev_clean', 1) else 4000 + 1000 * j
      speech = np.clip(rng.normal(size=samples) * 4000, -32768, 32767).astype(np.int16)
      text = f"HELLO WORLD IT'S {split.upper().replace('_', ' ')} {j}"
      examples.append(
          (
              key,
              {
                  'id': key,
                  'speaker_id': 10 + i,
                  'chapter_id': 20 + i,
                  'speech': speech,
                  'text': text,
              },
          )
      )
    out[split] = examples
  return out


def _coco_examples(rng):
  out = {}
  for i, split in enumerate(('train', 'val', 'test', 'restval')):
    examples = []
    for j in range(2):
      filename = f'COCO_{split}_{j}.jpg'
      height, width = (40, 57) if j == 0 else (36, 36)
      image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
      captions = [f'  A Dog on a mat {split} {j}. ', f'A cat sits {j}.', 'The quick brown fox.']
      objects = {
          'area': np.zeros(0, np.int64),
          'bbox': np.zeros((0, 4), np.float32),
          'id': np.zeros(0, np.int64),
          'is_crowd': np.zeros(0, bool),
          'label': np.zeros(0, np.int64),
      }
      examples.append(
          (
              filename,
              {
                  'image': image,
                  'image/filename': filename,
                  'image/id': 100 * i + j,
                  'objects': objects,
                  'captions': {'text': captions[: 3 - j], 'id': np.arange(3 - j, dtype=np.int64)},
              },
          )
      )
    out[split] = examples
  return out


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  tfds.disable_progress_bar()
  rng = np.random.default_rng(0)
  _prepare(ts.LIBRISPEECH_TFDS_NAME, _librispeech_examples(rng), path)
  _prepare(ts.COCO_CAPTIONS_TFDS_NAME, _coco_examples(rng), path)
  return path


def _raw(source, split):
  return list(tfds.as_numpy(source.get_dataset(split, shuffle=False)))


def _examples(ds):
  return list(tfds.as_numpy(ds))


# ------------------------------------------------------------------------------------------------
# Checks shared by both data sets.


def _check_specs(ds):
  specs = manifest_lib.feature_specs(SETTINGS)
  assert set(ds.element_spec) == set(specs) | {'references'}
  for key, spec in specs.items():
    assert ds.element_spec[key].dtype == spec.dtype, key
    assert ds.element_spec[key].shape.as_list() == spec.shape.as_list(), key
  assert ds.element_spec['references'].dtype == tf.string
  assert ds.element_spec['references'].shape.as_list() == [None]


def _check_example(ex, vocab, modality, prompt, answer):
  """Shapes, one placeholder run, loss on the answer only, answer text."""
  for m in SETTINGS.modalities:
    items = 1 if m == modality else 0
    assert ex[f'{m}_features'].shape == (items,) + SETTINGS.item_shape(m), m
    assert ex[f'{m}_features'].dtype == np.float32
  assert ex['audio_feature_mask'].shape == (0, SETTINGS.audio_frames)
  targets, weights = ex['targets'], ex['loss_weights']
  assert targets.dtype == np.int32 and weights.dtype == np.float32
  assert targets.shape == weights.shape and targets[0] == vocab.bos_id
  placeholder = PLACEHOLDER_IDS[PLACEHOLDERS[modality]]
  others = [i for i in PLACEHOLDER_IDS.values() if i != placeholder]
  assert not np.isin(targets, others).any()
  positions = np.nonzero(targets == placeholder)[0]
  run = SETTINGS.num_soft_tokens(modality)
  assert len(positions) == run and np.all(np.diff(positions) == 1)
  assert set(np.unique(weights)) == {0.0, 1.0}
  weighted = np.nonzero(weights)[0]
  # The answer is the contiguous tail: its tokens and the closing </s>.
  assert np.array_equal(weighted, np.arange(weighted[0], len(targets)))
  assert targets[-1] == vocab.eos_id
  assert vocab.decode(targets[weighted[:-1]].tolist()) == answer
  assert not np.isin(targets[weighted], list(PLACEHOLDER_IDS.values())).any()
  prompt_ids = targets[: weighted[0]]
  expected = conv_lib.prompt_text(ts.conversation_for(modality, prompt, answer))
  expected = expected[: expected.index('ASSISTANT:') + len('ASSISTANT:')]
  assert (
      conv_lib.decode_prompt(
          np.concatenate([prompt_ids[: positions[0] + 1], prompt_ids[positions[-1] + 1 :]]), vocab
      )
      == expected
  )


def _manifest_example(tmp_path, vocab, conversation, **media):
  fields = {f.name: getattr(SETTINGS, f.name) for f in dataclasses.fields(SETTINGS)}
  # TFDS sources give one item per clip (tfds_sources.py), the first 30 s; a manifest keeps
  # every official chunk unless audio_max_chunks caps it.
  fields['audio_max_chunks'] = 1
  config = manifest_lib.ManifestConfig(path=str(tmp_path / 'manifest.jsonl'), **fields)
  record = {'conversations': conversation, **media}
  return manifest_lib.load_example(json.dumps(record), 1, config, vocab)


# ------------------------------------------------------------------------------------------------
# LibriSpeech.


def test_librispeech_examples(vocab, data_dir, tmp_path):
  source = ts.librispeech_source(data_dir=data_dir)
  ds = ts.librispeech_preprocessor(source.get_dataset('validation', shuffle=False), SETTINGS, vocab)
  _check_specs(ds)
  raw, examples = _raw(source, 'validation'), _examples(ds)
  assert len(examples) == len(raw) == 2
  lengths = sorted(len(r['speech']) for r in raw)
  assert lengths == [4000, 31 * 16000]
  for r, ex in zip(raw, examples):
    answer = r['text'].decode().lower()
    assert answer.startswith("hello world it's dev clean")
    _check_example(ex, vocab, 'speech', ts.ASR_PROMPT, answer)
    assert ex['references'].tolist() == [answer.encode()]
    wave = r['speech'].astype(np.float32) / 32768
    np.testing.assert_array_equal(
        ex['speech_features'][0], audio_lib.whisper_log_mel(wave[:480000], 80)
    )
    # The same text and audio as a manifest record give the same features.
    wav = tmp_path / f'{r["id"].decode()}.wav'
    soundfile.write(str(wav), r['speech'], 16000, subtype='PCM_16')
    expected = _manifest_example(
        tmp_path, vocab, ts.conversation_for('speech', ts.ASR_PROMPT, answer), speech=str(wav)
    )
    assert set(expected) == set(ex) - {'references'}
    for key, value in expected.items():
      np.testing.assert_array_equal(ex[key], value, err_msg=key)
  long_one = examples[[len(r['speech']) for r in raw].index(31 * 16000)]
  # Trimming matters: the whole 31 s would give another spectrogram.
  assert not np.array_equal(
      long_one['speech_features'][0],
      audio_lib.whisper_log_mel(
          raw[[len(r['speech']) for r in raw].index(31 * 16000)]['speech'][-480000:] / 32768, 80
      ),
  )


def test_prompt_is_gin_configurable(vocab):
  ds = tf.data.Dataset.from_tensors(
      {'speech': np.ones(800, np.int16), 'text': 'ONE TWO', 'id': 'x'}
  )
  gin.bind_parameter('tfds_test_scope/librispeech_preprocessor.prompt', 'Write it down.')
  with gin.config_scope('tfds_test_scope'):
    (ex,) = _examples(ts.librispeech_preprocessor(ds, SETTINGS, vocab))
  _check_example(ex, vocab, 'speech', 'Write it down.', 'one two')


def test_manifest_config_as_settings(vocab, tmp_path):
  ds = tf.data.Dataset.from_tensors(
      {'speech': np.arange(900, dtype=np.int16), 'text': 'A B', 'id': 'x'}
  )
  config = manifest_lib.ManifestConfig(
      path=str(tmp_path / 'unused.jsonl'),
      **{f.name: getattr(SETTINGS, f.name) for f in dataclasses.fields(SETTINGS)},
  )
  (got,) = _examples(ts.librispeech_preprocessor(ds, config, vocab))
  (want,) = _examples(ts.librispeech_preprocessor(ds, SETTINGS, vocab))
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_bad_examples_raise_or_skip(vocab):
  ds = tf.data.Dataset.from_tensor_slices(
      {
          'speech': np.ones((3, 800), np.int16),
          'text': ['FINE', '  ', 'A <image> B'],
          'id': ['ok', 'blank', 'placeholder'],
      }
  )
  with pytest.raises(tf.errors.InvalidArgumentError, match='librispeech example blank.*empty'):
    _examples(ts.librispeech_preprocessor(ds, SETTINGS, vocab))
  skip = dataclasses.replace(SETTINGS, on_bad_example='skip')
  manifest_lib.BAD_EXAMPLES.reset()
  examples = _examples(ts.librispeech_preprocessor(ds, skip, vocab))
  assert [ex['references'].tolist() for ex in examples] == [[b'fine']]
  assert manifest_lib.BAD_EXAMPLES.counts() == {'empty_answer': 1, 'malformed_conversation': 1}
  _examples(ts.librispeech_preprocessor(ds, skip, vocab))  # A second epoch: counted once.
  assert manifest_lib.BAD_EXAMPLES.counts() == {'empty_answer': 1, 'malformed_conversation': 1}
  assert manifest_lib.BAD_EXAMPLES.reads == 4
  manifest_lib.BAD_EXAMPLES.reset()
  with pytest.raises(ValueError, match='prompt must not hold placeholders'):
    ts.librispeech_preprocessor(ds, SETTINGS, vocab, prompt='<image> say it')
  with pytest.raises(ValueError, match="needs 'speech' in settings.modalities"):
    ts.librispeech_preprocessor(ds, ts.TfdsSettings(modalities=('image',)), vocab)


# ------------------------------------------------------------------------------------------------
# COCO captions.


def test_coco_caption_examples(vocab, data_dir, tmp_path):
  source = ts.coco_captions_source(data_dir=data_dir)
  ds = ts.coco_captions_preprocessor(
      source.get_dataset('validation', shuffle=False), SETTINGS, vocab
  )
  _check_specs(ds)
  raw, examples = _raw(source, 'validation'), _examples(ds)
  assert len(examples) == len(raw) == 2
  for r, ex in zip(raw, examples):
    captions = r['captions']['text'].tolist()
    answer = captions[0].decode().strip()
    assert answer.startswith('A Dog on a mat val')
    _check_example(ex, vocab, 'image', ts.CAPTION_PROMPT, answer)
    assert ex['references'].tolist() == captions
    np.testing.assert_array_equal(
        ex['image_features'][0], image_lib.preprocess_image(r['image'], 32, 'crop')
    )
    png = tmp_path / f'{r["image/id"]}.png'  # lossless: the manifest reads the same pixels
    Image.fromarray(r['image']).save(png)
    expected = _manifest_example(
        tmp_path, vocab, ts.conversation_for('image', ts.CAPTION_PROMPT, answer), image=str(png)
    )
    for key, value in expected.items():
      np.testing.assert_array_equal(ex[key], value, err_msg=key)

  every = _examples(
      ts.coco_captions_preprocessor(
          source.get_dataset('validation', shuffle=False), SETTINGS, vocab, caption='all'
      )
  )
  answers = [c.decode().strip() for r in raw for c in r['captions']['text']]
  assert len(every) == len(answers) == 5
  for ex, answer in zip(every, answers):
    _check_example(ex, vocab, 'image', ts.CAPTION_PROMPT, answer)


def test_mock_data_examples(vocab):
  """TFDS's random mock examples (odd image sizes, random text) go through too."""
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=2):
    coco = _examples(
        ts.coco_captions_preprocessor(
            ts.coco_captions_source().get_dataset('train', shuffle=False), SETTINGS, vocab
        )
    )
    speech = _examples(
        ts.librispeech_preprocessor(
            ts.librispeech_source().get_dataset('train', shuffle=False), SETTINGS, vocab
        )
    )
  assert len(coco) == 2 and len(speech) == 2
  for ex in coco:
    _check_example(ex, vocab, 'image', ts.CAPTION_PROMPT, ex['references'][0].decode().strip())
  for ex in speech:
    _check_example(ex, vocab, 'speech', ts.ASR_PROMPT, ex['references'][0].decode())


# ------------------------------------------------------------------------------------------------
# Registered tasks.


def test_registered_tasks(vocab, data_dir):
  prefix = 'tfds_test'
  names = ts.register_tfds_tasks(vocab, SETTINGS, data_dir=data_dir, prefix=prefix)
  try:
    assert names == [f'{prefix}_librispeech_asr', f'{prefix}_coco_captions']
    tasks = [seqio.get_mixture_or_task(n) for n in names]
    with mock.patch.object(ts.logging, 'warning') as warning:
      assert ts.register_tfds_tasks(vocab, SETTINGS, data_dir=data_dir, prefix=prefix) == names
      warning.assert_not_called()
      other = dataclasses.replace(SETTINGS, image_size=64)  # same output features
      ts.register_tfds_tasks(vocab, other, data_dir=data_dir, prefix=prefix)
      assert warning.call_count == 2
      ts.register_tfds_tasks(
          vocab,
          dataclasses.replace(SETTINGS, modalities=('image', 'speech')),
          data_dir=data_dir,
          prefix=prefix,
      )
      assert warning.call_count == 4
    assert [seqio.get_mixture_or_task(n) for n in names] == tasks  # kept, not replaced
    asr, coco = tasks
    assert asr.metric_fns == [metrics_lib.word_error_rate]
    assert coco.metric_fns == [metrics_lib.bleu, metrics_lib.cider]
    assert set(asr.output_features) == {'targets', 'loss_weights'} | {
        f'{m}_features' for m in SETTINGS.modalities
    } | ({'audio_feature_mask'} if 'audio' in SETTINGS.modalities else set())
    assert asr.output_features['video_features'].rank == 5

    lengths = {'targets': 128, **{f'{m}_features': 2 for m in SETTINGS.modalities}}
    asr_train = _examples(
        asr.get_dataset(lengths, split='train', shuffle=False, trim_output_features=False)
    )
    # 'train' = train_clean100 + train_clean360 + train_other500, two utterances each.
    assert sorted(ex['references'][0].decode()[:-2] for ex in asr_train) == sorted(
        2
        * [
            "hello world it's train clean100",
            "hello world it's train clean360",
            "hello world it's train other500",
        ]
    )
    # Multi-host: seqio shards the source by files (needs the config-qualified TFDS name).
    shards = [
        _examples(
            asr.get_dataset(
                lengths,
                split='train',
                shuffle=False,
                shard_info=seqio.ShardInfo(i, 2),
                trim_output_features=False,
            )
        )
        for i in range(2)
    ]
    assert sorted(ex['references'][0] for shard in shards for ex in shard) == sorted(
        ex['references'][0] for ex in asr_train
    )
    assert all(shards)
    coco_train = _examples(
        coco.get_dataset(lengths, split='train', shuffle=False, trim_output_features=False)
    )
    assert sorted(ex['references'][0].decode().split()[-2] for ex in coco_train) == [
        'restval',
        'restval',
        'train',
        'train',
    ]
    for ex in asr_train:
      _check_example(ex, vocab, 'speech', ts.ASR_PROMPT, ex['references'][0].decode())
      # t5x.infer writes these into each output line's 'inputs'.
      assert ex['targets_pretokenized'].decode() == ex['references'][0].decode()
      assert '<speech>' in ex['inputs_pretokenized'].decode()

    # Evaluation reads the references through the postprocessor.
    ex = asr_train[0]
    assert asr.postprocess_fn('ignored', example=ex, is_target=True) == ex['references'][0].decode()
    assert asr.postprocess_fn(b' hello there ', example=ex, is_target=False) == 'hello there'
    ex = coco_train[0]
    assert coco.postprocess_fn('ignored', example=ex, is_target=True) == [
        r.decode() for r in ex['references']
    ]

    # The feature converter ignores 'references'; packing keeps every example.
    converter = fc_lib.MultimodalDecoderFeatureConverter(pack=True, modalities=SETTINGS.modalities)
    rows = _examples(
        converter(
            asr.get_dataset(lengths, split='train', shuffle=False, trim_output_features=False),
            lengths,
        )
    )
    assert 'references' not in rows[0]
    assert sum(int(r['speech_mask'].sum()) for r in rows) == len(asr_train)
    assert sum(int(r['decoder_segment_ids'].max()) for r in rows) == len(asr_train)

    # drop_too_long: an example longer than 'targets' is dropped, never cut.
    def validation(sequence_length):
      return _examples(
          asr.get_dataset(
              sequence_length, split='validation', shuffle=False, trim_output_features=False
          )
      )

    sizes = [len(ex['targets']) for ex in validation(lengths)]
    short = dict(lengths, targets=max(sizes) - 1)
    kept = validation(short)
    assert [len(ex['targets']) for ex in kept] == [n for n in sizes if n <= short['targets']]
    assert len(kept) < len(sizes)
  finally:
    for name in names:
      seqio.TaskRegistry.remove(name)
