"""unimoe_jax.sample_data and tools/make_sample_data.py: official manifest format, media that
decode, labels that the media really carry (checked by measuring the pixels and the signals),
determinism and class balance."""

import collections
import colorsys
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('PIL')
pytest.importorskip('soundfile')
ndimage = pytest.importorskip('scipy.ndimage')

from unimoe_jax import sample_data  # noqa: E402
from unimoe_jax.data import metrics  # noqa: E402
from unimoe_jax.media import audio as audio_lib  # noqa: E402
from unimoe_jax.media import image as image_lib  # noqa: E402
from unimoe_jax.media import video as video_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, 'tools', 'make_sample_data.py')
NUM_TRAIN, NUM_VALIDATION, SEED, SIZE = 24, 12, 3, 32
SPLIT_SIZES = {'train': NUM_TRAIN, 'validation': NUM_VALIDATION}
MEDIA_FIELDS = ('image', 'video', 'voice')

# Ground truth written out here, not taken from the tool, so a wrong table there fails here.
NUMBER_WORDS = {1: 'one', 2: 'two', 3: 'three', 4: 'four'}
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles', 'cross': 'crosses'}
HUE_RANGES = {
    'red': (-20, 20),
    'yellow': (40, 70),
    'green': (90, 150),
    'cyan': (165, 200),
    'blue': (210, 250),
    'purple': (260, 300),
}  # degrees
MOTION = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}  # (x, y); y goes down
DTMF = {
    '1': (697, 1209),
    '2': (697, 1336),
    '3': (697, 1477),
    '4': (770, 1209),
    '5': (770, 1336),
    '6': (770, 1477),
    '7': (852, 1209),
    '8': (852, 1336),
    '9': (852, 1477),
    '0': (941, 1336),
}
PITCHES = ('C', 'C#', 'D', 'D#', 'E', 'F', 'F#', 'G', 'G#', 'A', 'A#', 'B')
COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'cyan')
SHAPES = ('circle', 'square', 'triangle', 'cross')
MC_OPTIONS = {  # the options of each multiple-choice question, in order
    ('image', 'colour'): COLOURS,
    ('image', 'shape'): SHAPES,
    ('image', 'count'): ('one', 'two', 'three'),
    ('video', 'motion'): ('horizontal', 'vertical'),
    ('video', 'colour'): COLOURS,
    ('video', 'shape'): SHAPES,
    ('speech', 'length'): ('three', 'four'),
    ('speech', 'first'): tuple('0123456789'),
    ('audio', 'sweep'): ('rising', 'falling'),
    ('audio', 'pitch'): PITCHES,
}
NOTES_OCTAVE_4 = {name: 440.0 * 2.0 ** ((k - 9) / 12.0) for k, name in enumerate(PITCHES)}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The command line, as a user runs it."""
  root = tmp_path_factory.mktemp('sample_data')
  subprocess.run(
      [
          sys.executable,
          TOOL,
          '--output',
          str(root),
          '--train',
          str(NUM_TRAIN),
          '--validation',
          str(NUM_VALIDATION),
          '--seed',
          str(SEED),
          '--image_size',
          str(SIZE),
      ],
      check=True,
      stdout=subprocess.DEVNULL,
  )
  return str(root)


@pytest.fixture(scope='module')
def info(data_dir):
  with open(os.path.join(data_dir, 'sample_data_info.json')) as f:
    return json.load(f)


def _manifest(data_dir, split, name):
  with open(os.path.join(data_dir, split, f'{name}.json')) as f:
    return json.load(f)


def _all_manifests(data_dir, info):
  for split, split_info in info['splits'].items():
    for name, entry in split_info['manifests'].items():
      with open(os.path.join(data_dir, entry['file'])) as f:
        yield split, name, json.load(f)


# ------------------------------------------------------------------------------------------
# Format.

EXPECTED_MANIFESTS = (
    ['align_image', 'align_speech', 'align_audio', 'instruct_mixed']
    + [f'instruct_{m}' for m in ('image', 'video', 'speech', 'audio')]
    + [f'eval_{m}_{k}' for m in ('image', 'video', 'speech', 'audio') for k in ('mc', 'open')]
    + ['warmup_text']
)


def test_manifests_follow_the_official_format(data_dir, info):
  assert set(info['splits']) == {'train', 'validation'}
  for split, n in SPLIT_SIZES.items():
    assert sorted(info['splits'][split]['manifests']) == sorted(EXPECTED_MANIFESTS)
  placeholders = {'image': '<image>', 'video': '<video>', 'voice': '<audio>'}
  for split, name, entries in _all_manifests(data_dir, info):
    if name == 'warmup_text':
      continue  # text only: test_text_warmup_describes_the_media
    n = SPLIT_SIZES[split]
    assert isinstance(entries, list)
    assert info['splits'][split]['manifests'][name]['num_examples'] == len(entries)
    if name.startswith(('align_', 'instruct_')) and name != 'instruct_mixed':
      assert len(entries) == n, name
    ids = [e['id'] for e in entries]
    assert len(set(ids)) == len(ids), f'{split}/{name}: duplicate ids'
    for e in entries:
      fields = [f for f in MEDIA_FIELDS if f in e]
      assert len(fields) == 1, (name, e['id'], fields)
      field = fields[0]
      modality = e['modality']
      assert (
          field
          == {'image': 'image', 'video': 'video', 'speech': 'voice', 'audio': 'voice'}[modality]
      )
      if not name == 'instruct_mixed':
        assert modality in name
      if field == 'image':
        assert isinstance(e['image'], str)
      elif field == 'video':
        assert isinstance(e['video'], list) and len(e['video']) == 8
      else:
        assert isinstance(e['voice'], list) and len(e['voice']) == 1
      turns = e['conversations']
      assert len(turns) >= 2 and len(turns) % 2 == 0
      assert [t['from'] for t in turns] == ['human', 'gpt'] * (len(turns) // 2)
      assert all(t['value'] for t in turns)
      text = ''.join(t['value'] for t in turns if t['from'] == 'human')
      # One placeholder per media item (a frame list is one video item), at the start.
      assert text.count(placeholders[field]) == (len(e['voice']) if field == 'voice' else 1)
      assert turns[0]['value'].startswith(placeholders[field] + '\n')
      for other in set(placeholders.values()) - {placeholders[field]}:
        assert other not in text
      assert all(t['from'] != 'gpt' or '<' not in t['value'] for t in turns)
  # Two-turn examples exist in instruction data, and only there.
  for split in SPLIT_SIZES:
    instruct = _manifest(data_dir, split, 'instruct_image')
    assert 0 < sum(len(e['conversations']) == 4 for e in instruct) < len(instruct)
    assert all(len(e['conversations']) == 2 for e in _manifest(data_dir, split, 'eval_image_open'))


def test_mixed_is_the_shuffled_union_of_instruct(data_dir):
  for split in SPLIT_SIZES:
    union = [
        e
        for m in ('image', 'video', 'speech', 'audio')
        for e in _manifest(data_dir, split, f'instruct_{m}')
    ]
    mixed = _manifest(data_dir, split, 'instruct_mixed')
    assert sorted(json.dumps(e, sort_keys=True) for e in mixed) == sorted(
        json.dumps(e, sort_keys=True) for e in union
    )
    assert [e['id'] for e in mixed] != [e['id'] for e in union]  # actually shuffled


def test_multiple_choice_answers_point_at_the_label(data_dir, info):
  for split, name, entries in _all_manifests(data_dir, info):
    if not name.endswith(('_mc', '_open')):
      continue
    categories = collections.Counter(e['category'] for e in entries)
    n = SPLIT_SIZES[split]
    assert set(categories.values()) == {n}, (name, categories)  # every item, every question
    for e in entries:
      answer_turn = e['conversations'][1]['value']
      assert answer_turn == e['answer']
      truth = e['labels'][e['category']]
      if name.endswith('_open'):
        assert e['answer'] == truth
        continue
      # The options: every class of the category, in its fixed order (the same list in every
      # question of the category).
      options = e['options']
      assert options == list(MC_OPTIONS[(e['modality'], e['category'])])
      assert options['ABCDEFGHIJKL'.index(e['answer'])] == truth == e['label']
      question = e['conversations'][0]['value']
      for letter, option in zip('ABCDEFGHIJKL', options):
        assert f'\n{letter}. {option}\n' in question


# ------------------------------------------------------------------------------------------
# Media decode with the project's loaders, and carry their labels.


POOL_FIELD = {'image': 'image', 'video': 'video', 'speech': 'voice', 'audio': 'voice'}


def _pool(data_dir, split, modality):
  """(paths, labels) of every item, from the instruct manifest (one entry per item, in order)."""
  entries = _manifest(data_dir, split, f'instruct_{modality}')
  return [(e[POOL_FIELD[modality]], e['labels']) for e in entries]


def _captioned_pool(data_dir, modality):
  """(file, labels, caption) of every one-file item of every split: the file's path relative to
  `data_dir` (a voice list's one file), its labels, and the answer of its align_<modality>
  record."""

  def one_file(value):
    return value if isinstance(value, str) else value[0]

  for split in SPLIT_SIZES:
    captions = {
        one_file(e[POOL_FIELD[modality]]): e['conversations'][1]['value']
        for e in _manifest(data_dir, split, f'align_{modality}')
    }
    for paths, labels in _pool(data_dir, split, modality):
      yield one_file(paths), labels, captions[one_file(paths)]


def _wave(data_dir, path):
  """The 16 kHz samples of data_dir/path as float64 [samples]."""
  return audio_lib.load_audio(os.path.join(data_dir, path)).astype(np.float64)


def test_every_referenced_media_file_exists_and_decodes(data_dir, info):
  referenced = set()
  for _, _, entries in _all_manifests(data_dir, info):
    for e in entries:
      for field in MEDIA_FIELDS:
        value = e.get(field)
        if value is not None:
          referenced.add((field, tuple(value) if isinstance(value, list) else value))
  for split, n in SPLIT_SIZES.items():  # every pool item is used (and nothing else)
    for modality in ('image', 'video', 'speech', 'audio'):
      assert len(os.listdir(os.path.join(data_dir, 'media', split, modality))) == n
  for field, value in sorted(referenced):
    paths = [value] if isinstance(value, str) else list(value)
    assert all(not os.path.isabs(p) for p in paths)
    paths = [os.path.join(data_dir, p) for p in paths]
    if field == 'image':
      image = image_lib.load_image(paths[0])
      assert image.size == (SIZE, SIZE)
    elif field == 'video':
      frames = video_lib.load_frame_list(paths, num_frames=None)
      assert frames.shape == (8, SIZE, SIZE, 3) and frames.dtype == np.uint8
    else:
      wave = audio_lib.load_audio(paths[0])
      assert wave.shape == (16000,) and np.abs(wave).max() <= 1.0


def _objects(pixels):
  """Connected components that differ from the background (the corner pixel)."""
  pixels = np.asarray(pixels).astype(int)
  mask = np.abs(pixels - pixels[0, 0]).max(-1) > 40
  labelled, count = ndimage.label(mask)
  return mask, [
      mask[s] & (labelled[s] == k + 1) for k, s in enumerate(ndimage.find_objects(labelled))
  ]


def _colour_name(rgb):
  """The colour word for a saturated RGB colour, by its hue."""
  hue, _, saturation = colorsys.rgb_to_hls(*(np.asarray(rgb) / 255.0))
  assert saturation > 0.4, rgb
  hue = hue * 360.0
  hue = hue - 360.0 if hue > 340.0 else hue
  names = [name for name, (lo, hi) in HUE_RANGES.items() if lo <= hue <= hi]
  assert len(names) == 1, (rgb, hue)
  return names[0]


def _shape_of(box):
  """Square fills its box; a triangle has a full bottom row and a point on top; a circle
  fills ~79% of its box, a cross ~56% (symmetric rows)."""
  fill, top, bottom = box.mean(), box[0].mean(), box[-1].mean()
  if fill == 1.0:
    return 'square'
  if bottom == 1.0 and top < 0.25:
    return 'triangle'
  if top == bottom and fill > 0.7:
    return 'circle'
  if top == bottom and fill < 0.65:
    return 'cross'
  return 'unknown'


def test_images_show_the_stated_colour_shape_and_count(data_dir):
  for path, labels, caption in _captioned_pool(data_dir, 'image'):
    pixels = np.asarray(image_lib.load_image(os.path.join(data_dir, path)))
    mask, objects = _objects(pixels)
    assert _colour_name(pixels[mask].mean(0)) == labels['colour'], path
    assert NUMBER_WORDS[len(objects)] == labels['count'], path
    assert {_shape_of(o) for o in objects} == {labels['shape']}, path
    shape = labels['shape'] if len(objects) == 1 else PLURALS[labels['shape']]
    article = 'a' if len(objects) == 1 else labels['count']
    assert caption == f"{article} {labels['colour']} {shape}"


def test_videos_move_in_the_stated_direction(data_dir):
  for split in SPLIT_SIZES:
    for paths, labels in _pool(data_dir, split, 'video'):
      frames = video_lib.load_frame_list([os.path.join(data_dir, p) for p in paths], None)
      centroids = []
      for frame in frames:
        mask, objects = _objects(frame)
        assert len(objects) == 1
        assert _colour_name(frame[mask].mean(0)) == labels['colour']
        assert _shape_of(objects[0]) == labels['shape']
        ys, xs = np.nonzero(mask)
        centroids.append((xs.mean(), ys.mean()))
      dx, dy = np.diff(np.asarray(centroids), axis=0).T
      expected_x, expected_y = MOTION[labels['direction']]
      along, across = (dx * expected_x, dy) if expected_x else (dy * expected_y, dx)
      assert np.all(along > 0) and along.sum() > 0.3 * SIZE, (paths[0], labels)
      assert np.all(np.abs(across) < 1e-9)
      assert labels['motion'] == ('horizontal' if expected_x else 'vertical')


def _active_runs(wave, rate=16000, frame_ms=5, threshold=0.05):
  """[start, stop) sample ranges where the 5 ms RMS exceeds `threshold` (noise is ~0.002)."""
  hop = rate * frame_ms // 1000
  rms = np.sqrt(np.mean(wave[: len(wave) // hop * hop].reshape(-1, hop) ** 2, axis=1))
  active = np.concatenate([[False], rms > threshold, [False]])
  edges = np.flatnonzero(np.diff(active.astype(int)))
  return [(a * hop, b * hop) for a, b in zip(edges[::2], edges[1::2])]


def _goertzel_power(segment, frequency, rate=16000):
  """Power of `segment` at `frequency` (the Goertzel recurrence, any frequency)."""
  coefficient = 2 * np.cos(2 * np.pi * frequency / rate)
  s_prev = s_prev2 = 0.0
  for sample in segment:
    s_prev, s_prev2 = sample + coefficient * s_prev - s_prev2, s_prev
  return s_prev2**2 + s_prev**2 - coefficient * s_prev * s_prev2


def _decode_dtmf(wave):
  digits = ''
  for start, stop in _active_runs(wave):
    assert 0.08 < (stop - start) / 16000 < 0.12  # 100 ms tones, separated by silences
    segment = wave[start:stop]
    rows = [_goertzel_power(segment, f) for f in (697, 770, 852, 941)]
    columns = [_goertzel_power(segment, f) for f in (1209, 1336, 1477, 1633)]
    # A real DTMF pair: one dominant tone per group.
    assert (
        sorted(rows)[-1] > 20 * sorted(rows)[-2] and sorted(columns)[-1] > 20 * sorted(columns)[-2]
    )
    pair = (
        (697, 770, 852, 941)[int(np.argmax(rows))],
        (1209, 1336, 1477, 1633)[int(np.argmax(columns))],
    )
    digits += {v: k for k, v in DTMF.items()}[pair]
  return digits


def test_dtmf_tones_decode_to_the_stated_digits(data_dir):
  for path, labels, transcript in _captioned_pool(data_dir, 'speech'):
    decoded = _decode_dtmf(_wave(data_dir, path))
    assert decoded == labels['digits'], path
    assert transcript == ' '.join(decoded)
    assert labels['length'] == NUMBER_WORDS[len(decoded)]
    assert labels['first'] == decoded[0]


def _peak_frequency(segment, rate=16000):
  """Frequency of the spectral peak, zero-padded to 0.25 Hz bins."""
  windowed = segment * np.hanning(len(segment))
  n_fft = 4 * rate
  spectrum = np.abs(np.fft.rfft(windowed, n=n_fft))
  return np.argmax(spectrum) * rate / n_fft


def test_chirps_sweep_the_stated_way_through_the_stated_note(data_dir):
  names, notes = zip(*NOTES_OCTAVE_4.items())
  notes = np.array(notes)
  for path, labels, caption in _captioned_pool(data_dir, 'audio'):
    wave = _wave(data_dir, path)
    runs = _active_runs(wave, threshold=0.1)
    assert len(runs) == 1, path
    start, stop = runs[0]
    assert 0.4 < (stop - start) / 16000 <= 1.0
    quarter = (stop - start) // 4
    early = _peak_frequency(wave[start : start + quarter])
    late = _peak_frequency(wave[stop - quarter : stop])
    middle = (start + stop) // 2
    centre = _peak_frequency(wave[middle - 512 : middle + 512])
    assert ('rising' if late > early else 'falling') == labels['sweep'], path
    assert abs(np.log2(late / early)) > 0.1  # audible: the whole chirp spans ~0.29 octave
    # Within a quarter tone of the note (the chirp passes through it at its midpoint).
    nearest = int(np.argmin(np.abs(np.log2(notes / centre))))
    assert names[nearest] == labels['pitch'], (path, centre)
    assert abs(12 * np.log2(notes[nearest] / centre)) < 0.25
    assert caption == f"a {labels['sweep']} tone, pitch {labels['pitch']}"


# ------------------------------------------------------------------------------------------
# Balance, chance levels, determinism.


def test_classes_are_balanced(data_dir):
  def spread(values):
    counts = collections.Counter(values)
    return max(counts.values()) - min(counts.values()), len(counts)

  for split in SPLIT_SIZES:
    pools = {
        m: [labels for _, labels in _pool(data_dir, split, m)]
        for m in ('image', 'video', 'speech', 'audio')
    }
    for modality, factor, classes in (
        ('image', 'colour', 6),
        ('image', 'shape', 4),
        ('image', 'count', 3),
        ('video', 'motion', 2),
        ('video', 'colour', 6),
        ('video', 'shape', 4),
        ('speech', 'length', 2),
        ('audio', 'sweep', 2),
        ('audio', 'pitch', 12),
    ):
      imbalance, num_classes = spread([labels[factor] for labels in pools[modality]])
      assert imbalance <= 1 and num_classes == classes, (split, modality, factor)
    if split == 'train':  # digits are drawn uniformly (not balanced): all ten show up in 84
      assert set(''.join(labels['digits'] for labels in pools['speech'])) == set('0123456789')
    for name in ('eval_image_mc', 'eval_video_mc', 'eval_speech_mc', 'eval_audio_mc'):
      entries = _manifest(data_dir, split, name)
      # Letters follow the labels: balanced wherever the labels are (not the first digit).
      for category in set(e['category'] for e in entries) - {'first'}:
        letters = [e['answer'] for e in entries if e['category'] == category]
        assert spread(letters)[0] <= 1, (split, name, category)
    first_questions = [e['categories'][0] for e in _manifest(data_dir, split, 'instruct_image')]
    assert spread(first_questions)[0] <= 1


def test_chance_baselines_are_reported(info):
  chance = info['splits']['validation']['chance']
  video_mc = chance['eval_video_mc']['per_category']
  assert video_mc['motion']['uniform_guess_accuracy'] == 0.5
  assert video_mc['colour']['uniform_guess_accuracy'] == 1 / 6
  assert chance['eval_video_open']['per_category']['motion']['best_constant_accuracy'] == 0.5
  assert chance['eval_audio_mc']['per_category']['sweep']['uniform_guess_accuracy'] == 0.5
  assert chance['eval_audio_mc']['per_category']['pitch']['uniform_guess_accuracy'] == 1 / 12
  speech_mc = chance['eval_speech_mc']['per_category']
  assert speech_mc['length']['best_constant_accuracy'] == 0.5
  assert 0.1 <= speech_mc['first']['best_constant_accuracy'] < 0.5
  assert chance['eval_audio_open']['per_category']['pitch']['num_classes'] == 12
  speech = chance['eval_speech_open']
  assert speech['empty_answer_wer'] == 1.0 and 0.7 < speech['best_constant_wer'] < 1.0
  assert speech['best_constant_transcript'].replace(' ', '').isdigit()


def test_speech_chance_wer_is_the_task_metric_of_a_constant(data_dir, info):
  """The chance WER is what the eval task's own metric (metrics.word_error_rate) gives a
  constant transcript, the best over every digit repeated 3 or 4 times."""
  speech = info['splits']['validation']['chance']['eval_speech_open']
  answers = [e['answer'] for e in _manifest(data_dir, 'validation', 'eval_speech_open')]

  def wer(guess):
    return metrics.word_error_rate(answers, [guess] * len(answers))['wer']

  guesses = [' '.join(d * k) for d in '0123456789' for k in (3, 4)]
  assert speech['best_constant_wer'] == min(wer(g) for g in guesses)
  assert speech['best_constant_wer'] == wer(speech['best_constant_transcript'])
  assert speech['empty_answer_wer'] == wer('') == 1.0


def _digest(root):
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_output_is_a_function_of_the_seed(tmp_path):
  kwargs = dict(num_train=6, num_validation=4, image_size=24)
  sample_data.make_sample_data(str(tmp_path / 'a'), seed=5, **kwargs)
  sample_data.make_sample_data(str(tmp_path / 'b'), seed=5, **kwargs)
  sample_data.make_sample_data(str(tmp_path / 'c'), seed=6, **kwargs)
  a, b, c = (_digest(tmp_path / k) for k in 'abc')
  assert a == b
  assert a.keys() == c.keys()
  differing = [k for k in a if a[k] != c[k]]
  assert len(differing) > 0.9 * len(a)  # every media file and manifest changes with the seed


def test_absolute_paths_option(tmp_path):
  sample_data.make_sample_data(str(tmp_path), num_train=2, num_validation=1, absolute_paths=True)
  entry = _manifest(str(tmp_path), 'validation', 'instruct_video')[0]
  assert all(os.path.isabs(p) and os.path.isfile(p) for p in entry['video'])


def test_text_warmup_describes_the_media(data_dir, info):
  """warmup_text repeats every align / instruct / eval conversation without media, its
  placeholder replaced by the item's labels in words, the answers unchanged."""
  for split in SPLIT_SIZES:
    warm = {e['id']: e for e in _manifest(data_dir, split, 'warmup_text')}
    sources = [
        e
        for name in info['splits'][split]['manifests']
        if name not in ('warmup_text', 'instruct_mixed')
        for e in _manifest(data_dir, split, name)
    ]
    assert len(warm) == len(sources)
    for source in sources:
      text = warm[source['id'] + '-text']
      assert not any(f in text for f in MEDIA_FIELDS)
      first = text['conversations'][0]['value']
      assert first.startswith('(') and '<' not in first, first
      labels = source['labels']
      described = {
          'image': (labels.get('colour'), labels.get('shape')),
          'video': (labels.get('colour'), labels.get('motion')),
          'speech': (labels.get('transcript'),),
          'audio': (labels.get('sweep'), labels.get('pitch')),
      }[source['modality']]
      head = first.split('\n')[0]
      assert all(str(d) in head for d in described), (head, labels)
      assert [t['value'] for t in text['conversations'][1:]] == [
          t['value'] for t in source['conversations'][1:]
      ]
