"""Issue 21 (reliability), data path: each bad input gives one clear error naming the file,
line, field or flag, and no data is silently lost. docs/reliability.md lists what the user
sees for each."""

import json

import numpy as np
import pytest

seqio = pytest.importorskip('seqio')
spm = pytest.importorskip('sentencepiece')
tf = pytest.importorskip('tensorflow')
from PIL import Image  # noqa: E402

from unimoe_jax.data import conversation as conv_lib  # noqa: E402
from unimoe_jax.data import manifest as manifest_lib  # noqa: E402
from unimoe_jax.data import vocabulary as vocab_lib  # noqa: E402

from data_fixtures import TEXT_ONLY as TEXT  # noqa: E402
from data_fixtures import turns as _turns  # noqa: E402

SIZE = 16


IMAGE = {'id': 'img', 'image': 'red.png', 'conversations': _turns('<image>\nWhat is this?')}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('reliability')
  corpus = [conv_lib.SYSTEM, 'USER: What is this? ASSISTANT: A red square. Text only.'] * 20
  vocab_path = vocab_lib.train_sentencepiece(corpus, str(root / 'tokenizer.model'), 300)
  Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(root / 'red.png')
  return root, vocab_path


def _config(path, vocab_path, **overrides):
  kwargs = dict(
      path=path, vocab_path=vocab_path, image_size=SIZE, modalities=('image',), image_soft_tokens=2
  )
  kwargs.update(overrides)
  return manifest_lib.ManifestConfig(**kwargs)


def _write_bytes(root, name, data: bytes) -> str:
  path = str(root / name)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def _examples(path, vocab_path, **overrides):
  ds = manifest_lib.manifest_dataset(_config(path, vocab_path, **overrides))
  return list(ds.as_numpy_iterator())


def _jsonl(*records) -> bytes:
  return b''.join(json.dumps(r).encode() + b'\n' for r in records)


# ----------------------------------------------------------------------------------------------
# 1. Decoding manifests.


def _non_utf8_jsonl():
  bad = json.dumps(dict(TEXT, id='bad')).encode().replace(b'Text only.', b'Text \xff only.')
  return _jsonl(TEXT) + bad + b'\n' + _jsonl(IMAGE)


def test_non_utf8_line_is_a_bad_example_named_by_file_and_line_in_raise_mode(data):
  root, vocab_path = data
  path = _write_bytes(root, 'latin1.jsonl', _non_utf8_jsonl())
  with pytest.raises(Exception) as info:
    _examples(path, vocab_path)
  message = str(info.value)
  assert f'{path} line 2' in message and 'bad_encoding' in message and '0xff' in message


def test_non_utf8_line_is_skipped_and_counted_in_skip_mode(data):
  root, vocab_path = data
  path = _write_bytes(root, 'latin1_skip.jsonl', _non_utf8_jsonl())
  manifest_lib.BAD_EXAMPLES.reset()
  examples = _examples(path, vocab_path, on_bad_example='skip')
  assert [e['image_features'].shape[0] for e in examples] == [0, 1]
  assert manifest_lib.BAD_EXAMPLES.counts() == {'bad_encoding': 1}
  manifest_lib.BAD_EXAMPLES.reset()


def test_non_utf8_record_of_a_json_list_is_skipped_in_skip_mode(data):
  root, vocab_path = data
  text = json.dumps([TEXT, dict(TEXT, id='bad'), IMAGE]).encode()
  text = text.replace(b'"bad"', b'"b\xe9d"')
  path = _write_bytes(root, 'latin1_list.json', text)
  with pytest.raises(Exception) as info:
    _examples(path, vocab_path)
  assert f'{path} record 2' in str(info.value) and 'bad_encoding' in str(info.value)
  manifest_lib.BAD_EXAMPLES.reset()
  assert len(_examples(path, vocab_path, on_bad_example='skip')) == 2
  assert manifest_lib.BAD_EXAMPLES.counts() == {'bad_encoding': 1}
  manifest_lib.BAD_EXAMPLES.reset()


@pytest.mark.parametrize(
    'name,payload',
    [
        ('bom_list.json', b'\xef\xbb\xbf' + json.dumps([TEXT, IMAGE]).encode()),
        ('bom_jsonl.jsonl', b'\xef\xbb\xbf' + _jsonl(TEXT, IMAGE)),
        ('utf16_list.json', json.dumps([TEXT, IMAGE]).encode('utf-16')),
        ('pretty_list.json', json.dumps([TEXT, IMAGE], indent=2).encode()),
        ('crlf.jsonl', _jsonl(TEXT, IMAGE).replace(b'\n', b'\r\n')),
    ],
)
def test_manifest_encodings_and_layouts_read_every_record(data, name, payload):
  root, vocab_path = data
  path = _write_bytes(root, name, payload)
  for mode in ('raise', 'skip'):
    examples = _examples(path, vocab_path, on_bad_example=mode)
    assert [e['image_features'].shape[0] for e in examples] == [0, 1], mode


def test_pretty_printed_single_object_is_one_record(data):
  root, vocab_path = data
  path = _write_bytes(root, 'pretty_object.json', b'\n' + json.dumps(IMAGE, indent=2).encode())
  entries = manifest_lib.read_manifest(path)
  assert len(entries) == 1 and entries[0].location == f'{path} line 2'
  assert [e['image_features'].shape[0] for e in _examples(path, vocab_path)] == [1]


def test_line_separator_inside_a_string_does_not_split_the_line(data):
  root, vocab_path = data
  record = dict(TEXT, conversations=_turns('What\u2028is this?', 'Text\x0bonly.'))
  path = _write_bytes(
      root, 'u2028.jsonl', json.dumps(record, ensure_ascii=False).encode() + b'\n' + _jsonl(IMAGE)
  )
  assert len(_examples(path, vocab_path)) == 2


def test_broken_json_document_names_file_line_and_column(data):
  root, vocab_path = data
  text = json.dumps([TEXT, IMAGE], indent=2).replace('"id": "img",', '"id": "img"')
  path = _write_bytes(root, 'broken_list.json', b'\n\n' + text.encode())
  with pytest.raises(ValueError, match=r'broken_list.json is not valid JSON \(line \d+ column'):
    manifest_lib.read_manifest(path)
  line = int(str(_raises(manifest_lib.read_manifest, path)).split('line ')[1].split()[0])
  assert (b'\n\n' + text.encode()).split(b'\n')[line - 1].strip().startswith(b'"image"')
  pretty = _write_bytes(root, 'broken_object.json', json.dumps(IMAGE, indent=2).encode()[:-3])
  with pytest.raises(ValueError, match='broken_object.json is not valid JSON'):
    manifest_lib.read_manifest(pretty)


def _raises(fn, *args):
  try:
    fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    return e
  raise AssertionError('no error')


# ----------------------------------------------------------------------------------------------
# 3. Empty and all-skipped data; counters.


@pytest.mark.parametrize('payload', [b'', b'\n\n', b'[]', b'\xef\xbb\xbf[ ]\n'])
def test_empty_manifest_names_task_and_manifest(data, payload):
  root, vocab_path = data
  path = _write_bytes(root, 'empty.json', payload)
  with pytest.raises(ValueError, match=f'task my_task: manifest {path} holds no records'):
    manifest_lib.manifest_dataset(_config(path, vocab_path), task_name='my_task')


def test_all_skipped_manifest_names_task_manifest_and_counts(data):
  root, vocab_path = data
  path = _write_bytes(
      root,
      'all_bad.jsonl',
      _jsonl(dict(IMAGE, image='missing.png'), dict(TEXT, conversations=[])) + b'{oops\n[1, 2]\n',
  )
  manifest_lib.BAD_EXAMPLES.reset()
  ds = manifest_lib.manifest_dataset(
      _config(path, vocab_path, on_bad_example='skip'), task_name='my_task'
  ).repeat()
  with pytest.raises(tf.errors.OpError) as info:
    next(iter(ds))
  message = str(info.value)
  assert f'task my_task: all 4 records of manifest {path} are bad examples' in message
  for reason in ('missing_file', 'malformed_conversation', 'bad_json', 'malformed_record'):
    assert reason in message
  manifest_lib.BAD_EXAMPLES.reset()


def test_skip_counts_each_bad_example_once_however_often_read(data):
  root, vocab_path = data
  path = _write_bytes(root, 'some_bad.jsonl', _jsonl(TEXT, dict(IMAGE, image='missing.png'), IMAGE))
  manifest_lib.BAD_EXAMPLES.reset()
  config = _config(path, vocab_path, on_bad_example='skip')
  for _ in range(2):  # e.g. pipeline.check_examples_fit's look-ahead, then the stream
    ds = manifest_lib.manifest_dataset(config).repeat(3)
    assert len(list(ds.as_numpy_iterator())) == 6
  assert manifest_lib.BAD_EXAMPLES.counts() == {'missing_file': 1}
  assert manifest_lib.BAD_EXAMPLES.counts(path) == {'missing_file': 1}
  assert manifest_lib.BAD_EXAMPLES.reads == 6
  manifest_lib.BAD_EXAMPLES.reset()


# ----------------------------------------------------------------------------------------------
# 2. Media that TASK_FEATURE_LENGTHS or the model would not feed.


def _register_image_task(root, vocab_path, name='reliability_images'):
  from unimoe_jax.tasks import common  # pylint: disable=g-import-not-at-top

  path = _write_bytes(root, 'images.jsonl', _jsonl(TEXT, IMAGE, IMAGE))
  vocabulary = vocab_lib.LazyVocabulary(lambda: vocab_lib.get_vocabulary(vocab_path), name='test')
  source = common.lazy_manifest_source(
      lambda: _config(path, vocab_path, modalities=('image', 'speech')),
      {'train': 'train'},
      vocabulary,
      task_name=name,
  )
  common.register_task(name, source, vocabulary, modalities=('image', 'speech'))
  return name


def _converted(task, lengths):
  from unimoe_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  ds = seqio.get_dataset(
      task,
      task_feature_lengths=lengths,
      feature_converter=pipeline.feature_converter(lengths, pack=True),
      dataset_split='train',
      shuffle=False,
      num_epochs=1,
      trim_output_features=False,
  )
  return list(ds.as_numpy_iterator())


def test_media_without_a_length_raise_naming_task_modality_and_lengths(data):
  root, vocab_path = data
  task = _register_image_task(root, vocab_path)
  with pytest.raises(Exception) as info:
    _converted(task, {'targets': 256})
  message = str(info.value)
  assert f'task {task}: an example carries 1 image item(s)' in message
  assert "TASK_FEATURE_LENGTHS={'targets': 256} has no length for ['image_features']" in message
  # Named, the images reach the rows; the speech length may stay absent (no speech items).
  rows = _converted(task, {'targets': 256, 'image_features': 2})
  assert sum(int(r['image_mask'].sum()) for r in rows) == 2


def test_unfed_media_ignore_reads_a_task_as_text_only(data):
  import gin  # pylint: disable=g-import-not-at-top

  root, vocab_path = data
  task = _register_image_task(root, vocab_path)
  with gin.unlock_config():
    gin.bind_parameter('drop_too_long.unfed_media', 'ignore')
  try:
    rows = _converted(task, {'targets': 256})
  finally:
    gin.clear_config()
  assert rows and 'image_features' not in rows[0]


def test_lengths_with_a_modality_the_model_lacks_name_the_model_field():
  import types  # pylint: disable=g-import-not-at-top
  from unimoe_jax.data import feature_converter  # pylint: disable=g-import-not-at-top

  text_only = types.SimpleNamespace(config=types.SimpleNamespace(modalities=()))
  with pytest.raises(ValueError) as info:
    feature_converter.check_model_takes_media(
        text_only, {'targets': 128, 'image_features': 1, 'speech_features': 0}
    )
  message = str(info.value)
  assert "feeds ['image'] items, but the model has no encoder" in message
  assert 'UniMoEConfig.vision' in message and 'TASK_FEATURE_LENGTHS' in message
  feature_converter.check_model_takes_media(('image',), {'targets': 128, 'image_features': 1})
  feature_converter.check_model_takes_media(text_only, {'targets': 128, 'image_features': 0})
  import tiny_tasks  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match=r"feeds \['speech'\] items, but the model has no encoder"):
    feature_converter.check_model_takes_media(
        tiny_tasks.tiny_model(), {'targets': 64, 'speech_features': 1}  # a UniMoEModel
    )


# ----------------------------------------------------------------------------------------------
# 4. TASK_FEATURE_LENGTHS that is not a dict of lengths.


@pytest.mark.parametrize(
    'value,match',
    [
        (128, r'TASK_FEATURE_LENGTHS must be a dict of feature lengths .* got int 128'),
        ({'targets': -5}, r"TASK_FEATURE_LENGTHS\['targets'\] must be >= 0, got -5"),
        (
            {'targets': 128, 'image_features': -1},
            r"TASK_FEATURE_LENGTHS\['image_features'\] must be >= 0, got -1",
        ),
        ({'targets': '128'}, r"TASK_FEATURE_LENGTHS\['targets'\] must be an int"),
        ({'targets': 0}, r"TASK_FEATURE_LENGTHS\['targets'\] must be >= 1"),
    ],
)
def test_feature_converter_names_task_feature_lengths(value, match):
  from unimoe_jax.data import feature_converter  # pylint: disable=g-import-not-at-top

  converter = feature_converter.MultimodalDecoderFeatureConverter(modalities=('image',))
  with pytest.raises(ValueError, match=match):
    converter.get_model_feature_lengths(value)
  ds = tf.data.Dataset.from_tensors(
      {
          'targets': tf.zeros([3], tf.int32),
          'loss_weights': tf.zeros([3], tf.float32),
          'image_features': tf.zeros([0, 2, 2, 3], tf.float32),
      }
  )
  with pytest.raises(ValueError, match=match):
    converter(ds, value)


@pytest.mark.parametrize(
    'binding,match',
    [
        (
            "TASK_FEATURE_LENGTHS = {'targets': 128",
            r'gin binding TASK_FEATURE_LENGTHS: cannot parse .*EOF in multi-line statement',
        ),
        (
            "TASK_FEATURE_LENGTHS = {'targets': 128 'image_features': 1}",
            r"gin binding TASK_FEATURE_LENGTHS: cannot parse .*Expected ',' or '}'",
        ),
        (
            'TASK_FEATURE_LENGTHS = 128',
            r'TASK_FEATURE_LENGTHS must be a dict of feature lengths .* got int 128',
        ),
        (
            "TASK_FEATURE_LENGTHS = {'targets': -128}",
            r"TASK_FEATURE_LENGTHS\['targets'\] must be >= 0, got -128",
        ),
        (
            "EVAL_TASK_FEATURE_LENGTHS = {'image_features': 1}",
            r'EVAL_TASK_FEATURE_LENGTHS needs a "targets" length',
        ),
    ],
)
def test_gin_flags_name_the_length_macro(binding, match):
  import gin  # pylint: disable=g-import-not-at-top
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top

  bindings = ["TASK_FEATURE_LENGTHS = {'targets': 128}", binding]
  try:
    with pytest.raises(ValueError, match=match):
      gin_utils.parse(['models/tiny.gin', 'runs/train.gin'], bindings)
  finally:
    gin.clear_config()


def test_gin_flags_accept_valid_lengths_and_required_macros():
  import gin  # pylint: disable=g-import-not-at-top
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top

  required = ["MODEL_DIR = '/tmp/unused'", 'TRAIN_STEPS = 1', "MIXTURE_OR_TASK_NAME = 'x'"]
  try:
    with pytest.raises(ValueError, match='TASK_FEATURE_LENGTHS/macro.value set to `%gin.REQU'):
      gin_utils.parse(['models/tiny.gin', 'runs/train.gin'], required)  # gin's own error
    gin.clear_config()
    gin_utils.parse(
        ['models/tiny.gin', 'runs/train.gin'],
        required
        + [
            "TASK_FEATURE_LENGTHS = {'targets': 128, 'image_features': 0}",
            'EVAL_TASK_FEATURE_LENGTHS = %TASK_FEATURE_LENGTHS',
        ],
    )
  finally:
    gin.clear_config()


# ----------------------------------------------------------------------------------------------
# 3, through the training loop: what `python -m unimoe_jax.train` users see.


def _register_text_task(root, vocab_path, name, payload: bytes):
  from unimoe_jax.tasks import common  # pylint: disable=g-import-not-at-top

  path = _write_bytes(root, f'{name}.jsonl', payload)
  vocabulary = vocab_lib.LazyVocabulary(lambda: vocab_lib.get_vocabulary(vocab_path), name='test')
  source = common.lazy_manifest_source(
      lambda: _config(path, vocab_path, on_bad_example='skip'),
      {'train': 'train'},
      vocabulary,
      task_name=name,
  )
  common.register_task(name, source, vocabulary, modalities=('image',))
  return path


@pytest.mark.parametrize(
    'payload,expected',
    [  # ~0 s and ~11 s (the all-bad one reads data)
        (b'\n', 'task {name}: manifest {path} holds no records'),
        (
            _jsonl(dict(IMAGE, image='missing.png'), dict(IMAGE, image='gone.png')),
            'task {name}: all 2 records of manifest {path} are bad examples, skipped with '
            "on_bad_example='skip' (by reason: {{'missing_file': 2}})",
        ),
    ],
)
def test_training_on_empty_or_all_bad_data_names_task_and_manifest(
    data, tmp_path, payload, expected
):
  import time  # pylint: disable=g-import-not-at-top
  import tiny_tasks  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import loop  # pylint: disable=g-import-not-at-top

  root, vocab_path = data
  name = 'reliability_empty' if payload.strip() == b'' else 'reliability_all_bad'
  path = _register_text_task(root, vocab_path, name, payload)
  manifest_lib.BAD_EXAMPLES.reset()
  started = time.time()
  with pytest.raises(Exception) as info:
    loop.train(
        **tiny_tasks.train_kwargs(
            str(tmp_path / 'run'),
            mixture_or_task_name=name,
            mixture_or_task_module=(),
            # Text lengths: the tiny model has no vision tower (loop.train refuses image lengths
            # for it before reading any data), and no record here gets as far as its media.
            task_feature_lengths={'targets': 64},
        )
    )
  assert expected.format(name=name, path=path) in str(info.value)
  assert not isinstance(info.value, StopIteration)
  print(f'failed after {time.time() - started:.1f} s')
  manifest_lib.BAD_EXAMPLES.reset()
