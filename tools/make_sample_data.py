"""Writes the embedded synthetic multimodal data set: small, learnable on a CPU, no download.

  python tools/make_sample_data.py --output /tmp/unimoe_sample
  python tools/make_sample_data.py --output DIR --train 512 --validation 128 --seed 0 \
      --image_size 32

Four media pools per split (one item per index, shared by every manifest of that modality):

  image   coloured shapes on a dark background: colour (6), shape (4), count (1-3)
  video   8 PNG frames of one shape moving left / right / up / down (the official video format
          is a list of frame image files); asked: its colour, shape and axis of motion
          (horizontal / vertical), which the official frame average keeps
  speech  DTMF digit sequences (3-4 digits, 100 ms tones, 50 ms gaps) to transcribe, "3 1 4"
  audio   one linear chirp (0.5-1 s), rising or falling, through a note of octave 4 (12 classes)

and, per split, manifests in the official Uni-MoE JSON format (a list of {id, image | video |
voice, conversations}) under DIR/<split>/: align_* (stage 1 captions), instruct_* (stage 2/3
question answering, some two-turn), instruct_mixed (their shuffled union), eval_*_mc (multiple
choice, answer letter) and eval_*_open (one-word answers; speech: transcription for WER). Media
paths are relative to DIR (`--absolute_paths` writes absolute ones). DIR/sample_data_info.json
lists every manifest with its purpose, modality, metric and the chance-level baselines measured on
the data written. docs/sample_data.md describes it all.

Everything is a function of --seed: labels are balanced per split (each class count within one
of the others) and drawn from a split-level generator; nuisance parameters (size, position,
colour jitter, timing, noise) from a per-item generator.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

SPLITS = ('train', 'validation')
MODALITIES = ('image', 'video', 'speech', 'audio')

COLOURS = {  # name -> RGB; far apart from each other and from the dark background.
    'red': (220, 40, 40),
    'green': (40, 180, 60),
    'blue': (50, 80, 230),
    'yellow': (235, 215, 40),
    'purple': (160, 60, 210),
    'cyan': (40, 205, 215),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ('circle', 'square', 'triangle', 'cross')
SHAPE_PLURALS = {
    'circle': 'circles',
    'square': 'squares',
    'triangle': 'triangles',
    'cross': 'crosses',
}
COUNTS = (1, 2, 3)
NUMBER_WORDS = {1: 'one', 2: 'two', 3: 'three', 4: 'four'}
DIRECTIONS = ('left', 'right', 'up', 'down')
DIRECTION_STEPS = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}  # (dx, dy)
# What the questions ask about a video's motion: its axis, not its direction. Uni-MoE averages
# the frames' tokens (see VIDEO_QUESTIONS), which keeps the trail a moving shape leaves (its
# axis, seen in no single frame) but not the order of the frames (left and right leave the
# same trail).
MOTIONS = ('horizontal', 'vertical')
MOTION_OF = {'left': 'horizontal', 'right': 'horizontal', 'up': 'vertical', 'down': 'vertical'}
PITCH_CLASSES = ('C', 'C#', 'D', 'D#', 'E', 'F', 'F#', 'G', 'G#', 'A', 'A#', 'B')
SWEEPS = ('rising', 'falling')

# DTMF (ITU-T Q.23): each digit is the sum of one low (row) and one high (column) tone.
DTMF_ROWS = (697.0, 770.0, 852.0, 941.0)
DTMF_COLUMNS = (1209.0, 1336.0, 1477.0)
# The telephone keypad: a digit's (row, column) there picks its two tones.
DTMF_KEYPAD = ('123', '456', '789', '*0#')
DTMF_DIGITS = {
    key: (row, column)
    for row, keys in enumerate(DTMF_KEYPAD)
    for column, key in enumerate(keys)
    if key.isdigit()
}
DTMF_TONE_SECONDS = 0.1
DTMF_GAP_SECONDS = 0.05
SPEECH_LENGTHS = (3, 4)

SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0
CHIRP_SECONDS = (0.5, 1.0)
# The chirp sweeps note_hz * (1 -+ span) linearly, about 1.7 semitones either side: wide enough
# to hear the direction, narrow enough that the pitch class stays well defined.
CHIRP_SPAN = 0.1
NUM_FRAMES = 8

MC_LETTERS = 'ABCDEFGHIJKL'  # enough for the largest class list (pitch: 12)
MC_SUFFIX = "Answer with the option's letter from the given choices directly."

IMAGE_QUESTIONS = {
    'colour': 'What colour are the shapes?',
    'shape': 'What shape are they?',
    'count': 'How many shapes are there?',
}
# Uni-MoE averages the tokens of a video's frames, so the questions ask nothing that depends on
# the frames' order (MOTIONS).
VIDEO_QUESTIONS = {
    'motion': 'Does the shape move horizontally or vertically?',
    'colour': 'What colour is the moving shape?',
    'shape': 'What shape is moving?',
}
SPEECH_QUESTIONS = {
    'transcript': 'What digits are spoken?',
    'length': 'How many digits are spoken?',
    'first': 'What is the first digit?',
}
AUDIO_QUESTIONS = {
    'sweep': 'Is the tone rising or falling?',
    'pitch': 'Which pitch class is the tone?',
}
ALIGN_PROMPTS = {
    'image': 'Describe the image briefly.',
    'speech': 'Transcribe the speech.',
    'audio': 'Describe the sound briefly.',
}
PLACEHOLDERS = {'image': '<image>', 'video': '<video>', 'speech': '<audio>', 'audio': '<audio>'}
MEDIA_FIELDS = {'image': 'image', 'video': 'video', 'speech': 'voice', 'audio': 'voice'}


def note_frequency(pitch_class: str, octave: int = 4) -> float:
  """Equal temperament, A4 = 440 Hz."""
  midi = 12 * (octave + 1) + PITCH_CLASSES.index(pitch_class)
  return 440.0 * 2.0 ** ((midi - 69) / 12.0)


def balanced_labels(rng: np.random.Generator, classes: Sequence[Any], n: int) -> List[Any]:
  """`n` labels in which every class appears floor(n / k) or ceil(n / k) times, shuffled."""
  order = rng.permutation(len(classes))  # which classes get the extra item when k does not divide n
  tiled = np.concatenate([np.arange(len(classes))] * (n // len(classes) + 1))[:n]
  return [classes[int(order[i])] for i in rng.permutation(tiled)]


def _item_rng(seed: int, split: str, modality: str, index: int) -> np.random.Generator:
  return np.random.default_rng(
      np.random.SeedSequence([seed, SPLITS.index(split), MODALITIES.index(modality), index])
  )


# --------------------------------------------------------------------------------------------
# Media rendering.


def _jitter_colour(rng: np.random.Generator, colour: str) -> Tuple[int, int, int]:
  base = np.array(COLOURS[colour])
  return tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, size=3), 0, 255))


def _draw_shape(draw, shape: str, x0: int, y0: int, size: int, fill) -> None:
  """One filled shape in the box [x0, x0 + size) x [y0, y0 + size), no anti-aliasing (flat
  colour, so a PNG stores exactly the label's colour)."""
  x1, y1 = x0 + size - 1, y0 + size - 1
  if shape == 'circle':
    draw.ellipse([x0, y0, x1, y1], fill=fill)
  elif shape == 'square':
    draw.rectangle([x0, y0, x1, y1], fill=fill)
  elif shape == 'triangle':
    draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2.0, y0)], fill=fill)
  elif shape == 'cross':
    bar = max(2, int(round(size / 3.0)))
    lo = x0 + (size - bar) // 2
    top = y0 + (size - bar) // 2
    draw.rectangle([lo, y0, lo + bar - 1, y1], fill=fill)
    draw.rectangle([x0, top, x1, top + bar - 1], fill=fill)
  else:
    raise ValueError(f'unknown shape {shape!r}')


def render_shapes(
    rng: np.random.Generator, colour: str, shape: str, count: int, image_size: int = 32
):
  """`count` shapes of one colour, each in its own cell of a 2x2 grid, on a dark grey background.

  Returns:
    RGB `PIL.Image.Image` of `image_size` x `image_size`.
  """
  from PIL import Image, ImageDraw

  if not 1 <= count <= 4:
    raise ValueError(f'count must be in [1, 4], got {count}')
  background = int(rng.integers(10, 50))
  image = Image.new('RGB', (image_size, image_size), (background,) * 3)
  draw = ImageDraw.Draw(image)
  fill = _jitter_colour(rng, colour)
  cell = image_size // 2
  for cell_index in rng.choice(4, size=count, replace=False):
    size = int(round(cell * rng.uniform(0.55, 0.8)))
    room = cell - size  # >= 2 for image_size >= 16: shapes never touch each other or the edge
    x0 = (cell_index % 2) * cell + int(rng.integers(1, room))
    y0 = (cell_index // 2) * cell + int(rng.integers(1, room))
    _draw_shape(draw, shape, x0, y0, size, fill)
  return image


def render_moving_shape(
    rng: np.random.Generator,
    colour: str,
    shape: str,
    direction: str,
    image_size: int = 32,
    num_frames: int = NUM_FRAMES,
) -> list:
  """One shape crossing about half the frame in `direction`, at constant speed.

  Returns:
    `num_frames` RGB `PIL.Image.Image`s.
  """
  from PIL import Image, ImageDraw

  background = int(rng.integers(10, 50))
  fill = _jitter_colour(rng, colour)
  size = int(round(image_size * rng.uniform(0.25, 0.35)))
  travel = int(round(image_size * 0.45))
  dx, dy = DIRECTION_STEPS[direction]
  # Start so that the whole path stays one pixel inside the frame.
  along = int(rng.integers(1, image_size - size - travel))
  across = int(rng.integers(1, image_size - size))
  start_x, start_y = (along, across) if dx else (across, along)
  if dx < 0:
    start_x += travel
  if dy < 0:
    start_y += travel
  frames = []
  for k in range(num_frames):
    offset = int(round(travel * k / max(num_frames - 1, 1)))
    frame = Image.new('RGB', (image_size, image_size), (background,) * 3)
    _draw_shape(
        ImageDraw.Draw(frame), shape, start_x + dx * offset, start_y + dy * offset, size, fill
    )
    frames.append(frame)
  return frames


def _ramp(num_samples: int, ramp_samples: int) -> np.ndarray:
  """Raised-cosine fade in and out, so tone edges do not click (broadband energy)."""
  envelope = np.ones(num_samples)
  ramp_samples = min(ramp_samples, num_samples // 2)
  if ramp_samples > 0:
    fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp_samples) / ramp_samples)
    envelope[:ramp_samples] = fade
    envelope[-ramp_samples:] = fade[::-1]
  return envelope


def dtmf_wave(
    rng: np.random.Generator,
    digits: str,
    sample_rate: int = SAMPLE_RATE,
    clip_seconds: float = CLIP_SECONDS,
) -> np.ndarray:
  """DTMF tones for `digits` (100 ms each, 50 ms apart) after 50-250 ms of silence, plus a
  little white noise.

  Returns:
    `[clip_seconds * sample_rate]` float64 in [-1, 1].
  """
  num_samples = int(round(clip_seconds * sample_rate))
  wave = np.zeros(num_samples)
  tone = int(round(DTMF_TONE_SECONDS * sample_rate))
  step = tone + int(round(DTMF_GAP_SECONDS * sample_rate))
  start = int(round(rng.uniform(0.05, 0.25) * sample_rate))
  if start + step * (len(digits) - 1) + tone > num_samples:
    raise ValueError(f'{len(digits)} digits do not fit in {clip_seconds} s')
  t = np.arange(tone) / sample_rate
  envelope = _ramp(tone, int(0.005 * sample_rate))
  for i, digit in enumerate(digits):
    row, column = DTMF_DIGITS[digit]
    amplitude = rng.uniform(0.25, 0.45)
    phases = rng.uniform(0, 2 * np.pi, size=2)
    pair = np.sin(2 * np.pi * DTMF_ROWS[row] * t + phases[0]) + np.sin(
        2 * np.pi * DTMF_COLUMNS[column] * t + phases[1]
    )
    wave[start + i * step : start + i * step + tone] += amplitude * envelope * pair
  wave += rng.normal(0.0, 0.002, size=num_samples)
  return np.clip(wave, -1.0, 1.0)


def chirp_wave(
    rng: np.random.Generator,
    pitch_class: str,
    sweep: str,
    sample_rate: int = SAMPLE_RATE,
    clip_seconds: float = CLIP_SECONDS,
) -> np.ndarray:
  """A linear chirp of 0.5-1 s through the octave-4 note `pitch_class` at its midpoint, from
  note * (1 - CHIRP_SPAN) to note * (1 + CHIRP_SPAN) ('rising') or the reverse ('falling'), at a
  random offset in the clip, plus a little white noise.

  Returns:
    `[clip_seconds * sample_rate]` float64 in [-1, 1].
  """
  if sweep not in SWEEPS:
    raise ValueError(f'sweep must be one of {SWEEPS}, got {sweep!r}')
  num_samples = int(round(clip_seconds * sample_rate))
  duration = int(round(rng.uniform(*CHIRP_SECONDS) * sample_rate))
  duration = min(duration, num_samples)
  start = int(rng.integers(0, num_samples - duration + 1))
  centre = note_frequency(pitch_class)
  sign = 1.0 if sweep == 'rising' else -1.0
  f_start, f_end = centre * (1 - sign * CHIRP_SPAN), centre * (1 + sign * CHIRP_SPAN)
  t = np.arange(duration) / sample_rate
  seconds = duration / sample_rate
  phase = 2 * np.pi * (f_start * t + 0.5 * (f_end - f_start) / seconds * t**2)
  chirp = (
      rng.uniform(0.3, 0.6)
      * _ramp(duration, int(0.02 * sample_rate))
      * np.sin(phase + rng.uniform(0, 2 * np.pi))
  )
  wave = np.zeros(num_samples)
  wave[start : start + duration] = chirp
  wave += rng.normal(0.0, 0.002, size=num_samples)
  return np.clip(wave, -1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Media pools: labels and files of one split.


def make_media(
    root: str,
    split: str,
    n: int,
    seed: int,
    image_size: int = 32,
    num_frames: int = NUM_FRAMES,
    sample_rate: int = SAMPLE_RATE,
) -> Dict[str, List[Dict[str, Any]]]:
  """Writes `n` items per modality under root/media/<split>/ and returns their records:
  {'path' (relative to root; a list of frame paths for video), 'labels': {...}}."""
  import soundfile

  label_rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), 99]))
  pools = {}

  def write_pool(modality, ext, classes, write):
    """pools[modality]: `n` items labelled by balanced draws from each of `classes` in turn.
    Item i is the file media/<split>/<modality>/<i:05d><ext>: `write(rng, path, *labels)` (the
    item's own rng, its path under root, its label from each draw) writes it and returns the
    labels of its record."""
    os.makedirs(os.path.join(root, 'media', split, modality), exist_ok=True)
    labels = [balanced_labels(label_rng, c, n) for c in classes]
    pools[modality] = []
    for i, item_labels in enumerate(zip(*labels)):
      rel = os.path.join('media', split, modality, f'{i:05d}{ext}')
      rng = _item_rng(seed, split, modality, i)
      record = {'path': rel, 'labels': write(rng, os.path.join(root, rel), *item_labels)}
      pools[modality].append(record)

  def write_image(rng, path, colour, shape, count):
    render_shapes(rng, colour, shape, count, image_size).save(path)
    return {'colour': colour, 'shape': shape, 'count': NUMBER_WORDS[count]}

  def write_speech(rng, path, length):
    digits = ''.join(str(d) for d in rng.integers(0, 10, size=length))
    soundfile.write(path, dtmf_wave(rng, digits, sample_rate), sample_rate, subtype='PCM_16')
    return {
        'digits': digits,
        'transcript': ' '.join(digits),
        'length': NUMBER_WORDS[len(digits)],
        'first': digits[0],
    }

  def write_audio(rng, path, sweep, pitch):
    wave = chirp_wave(rng, pitch, sweep, sample_rate)
    soundfile.write(path, wave, sample_rate, subtype='PCM_16')
    return {'sweep': sweep, 'pitch': pitch}

  write_pool('image', '.png', (COLOUR_NAMES, SHAPES, COUNTS), write_image)

  colours = balanced_labels(label_rng, COLOUR_NAMES, n)
  shapes = balanced_labels(label_rng, SHAPES, n)
  motions = balanced_labels(label_rng, MOTIONS, n)
  pools['video'] = []
  for i in range(n):
    item_rng = _item_rng(seed, split, 'video', i)
    direction = [d for d in DIRECTIONS if MOTION_OF[d] == motions[i]][int(item_rng.integers(2))]
    rel_dir = os.path.join('media', split, 'video', f'{i:05d}')
    os.makedirs(os.path.join(root, rel_dir), exist_ok=True)
    frames = render_moving_shape(item_rng, colours[i], shapes[i], direction, image_size, num_frames)
    paths = []
    for k, frame in enumerate(frames):
      rel = os.path.join(rel_dir, f'frame_{k:03d}.png')
      frame.save(os.path.join(root, rel))
      paths.append(rel)
    pools['video'].append(
        {
            'path': paths,
            'labels': {
                'direction': direction,
                'motion': motions[i],
                'colour': colours[i],
                'shape': shapes[i],
            },
        }
    )

  write_pool('speech', '.wav', (SPEECH_LENGTHS,), write_speech)
  write_pool('audio', '.wav', (SWEEPS, PITCH_CLASSES), write_audio)
  return pools


# --------------------------------------------------------------------------------------------
# Manifests.


def image_caption(labels: Dict[str, str]) -> str:
  """'a red circle' / 'two blue squares'."""
  if labels['count'] == 'one':
    return f"a {labels['colour']} {labels['shape']}"
  return f"{labels['count']} {labels['colour']} {SHAPE_PLURALS[labels['shape']]}"


def audio_caption(labels: Dict[str, str]) -> str:
  """'a rising tone, pitch A'."""
  return f"a {labels['sweep']} tone, pitch {labels['pitch']}"


QUESTIONS = {
    'image': IMAGE_QUESTIONS,
    'video': VIDEO_QUESTIONS,
    'speech': SPEECH_QUESTIONS,
    'audio': AUDIO_QUESTIONS,
}
# Answer vocabularies of each question (for multiple-choice distractors and chance baselines).
ANSWER_CLASSES = {
    ('image', 'colour'): COLOUR_NAMES,
    ('image', 'shape'): SHAPES,
    ('image', 'count'): tuple(NUMBER_WORDS[c] for c in COUNTS),
    ('video', 'motion'): MOTIONS,
    ('video', 'colour'): COLOUR_NAMES,
    ('video', 'shape'): SHAPES,
    ('speech', 'length'): ('three', 'four'),
    ('speech', 'first'): tuple('0123456789'),
    ('audio', 'sweep'): SWEEPS,
    ('audio', 'pitch'): PITCH_CLASSES,
}
# The open evaluation questions of each modality (speech: the transcript, scored by WER) ...
EVAL_CATEGORIES = {
    'image': ('colour', 'shape', 'count'),
    'video': ('motion', 'colour', 'shape'),
    'speech': ('transcript',),
    'audio': ('sweep', 'pitch'),
}
# ... and the multiple-choice ones: questions with a closed set of answers (a transcript has
# none, so speech asks its length and first digit).
MC_CATEGORIES = {
    'image': ('colour', 'shape', 'count'),
    'video': ('motion', 'colour', 'shape'),
    'speech': ('length', 'first'),
    'audio': ('sweep', 'pitch'),
}


def _example(
    example_id: str,
    modality: str,
    item: Dict[str, Any],
    turns: Sequence[Tuple[str, str]],
    root: str,
    absolute_paths: bool,
    **extra,
) -> Dict[str, Any]:
  """One manifest entry; the placeholder goes before the first question, as the official data."""
  path = item['path']
  if absolute_paths:
    path = (
        [os.path.abspath(os.path.join(root, p)) for p in path]
        if isinstance(path, list)
        else os.path.abspath(os.path.join(root, path))
    )
  example = {'id': example_id}
  example[MEDIA_FIELDS[modality]] = [path] if modality in ('speech', 'audio') else path
  conversations = []
  for j, (question, answer) in enumerate(turns):
    if j == 0:
      question = f'{PLACEHOLDERS[modality]}\n{question}'
    conversations += [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]
  example['conversations'] = conversations
  example['modality'] = modality  # an extension: tells speech from audio `voice` items
  example['labels'] = dict(item['labels'])
  example.update(extra)
  return example


def _multiple_choice(modality: str, category: str) -> List[str]:
  """The options of a multiple-choice question: every class of its category, in the category's
  fixed order (ANSWER_CLASSES), so an option's letter names the same class in every question.

  Why fixed, not shuffled: with shuffled options the answer letter is an in-context lookup
  (find the option that matches what the media shows, copy the letter before it), which the
  demo's 2-layer decoder did not learn within its budget in any layout, curriculum or size
  tried (docs/sample_data.md, "Multiple-choice questions"); with the classes in a fixed order
  the question tests what the model perceives and answers with a letter, as benchmarks with a
  fixed answer list do (yes/no, emotion or scene classes).
  """
  return list(ANSWER_CLASSES[(modality, category)])


def build_manifests(
    pools: Dict[str, List[Dict[str, Any]]],
    split: str,
    seed: int,
    root: str,
    absolute_paths: bool = False,
) -> Dict[str, List[Dict[str, Any]]]:
  """Every manifest of one split, by name (align_*, instruct_*, instruct_mixed, eval_*)."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), 7]))
  manifests = {}

  for modality in ('image', 'speech', 'audio'):
    entries = []
    for i, item in enumerate(pools[modality]):
      labels = item['labels']
      answer = {
          'image': image_caption,
          'audio': audio_caption,
          'speech': lambda l: l['transcript'],
      }[modality](labels)
      entries.append(
          _example(
              f'{split}-align_{modality}-{i:05d}',
              modality,
              item,
              [(ALIGN_PROMPTS[modality], answer)],
              root,
              absolute_paths,
          )
      )
    manifests[f'align_{modality}'] = entries

  for modality in MODALITIES:
    questions = QUESTIONS[modality]
    categories = tuple(questions)
    first = balanced_labels(rng, categories, len(pools[modality]))
    entries = []
    for i, item in enumerate(pools[modality]):
      asked = [first[i]]
      if rng.random() < 0.5:  # about half the examples get a second turn on another question
        others = [c for c in categories if c != first[i]]
        asked.append(others[int(rng.integers(len(others)))])
      turns = [(questions[c], item['labels'][c]) for c in asked]
      entries.append(
          _example(
              f'{split}-instruct_{modality}-{i:05d}',
              modality,
              item,
              turns,
              root,
              absolute_paths,
              categories=asked,
          )
      )
    manifests[f'instruct_{modality}'] = entries

  mixed = [e for m in MODALITIES for e in manifests[f'instruct_{m}']]
  manifests['instruct_mixed'] = [mixed[j] for j in rng.permutation(len(mixed))]

  # Every item is asked every evaluation question of its modality, so each category's labels
  # (and, with the options in a fixed order, its answer letters) are exactly as balanced as the
  # pool's: a constant letter scores chance.
  for modality in MODALITIES:
    questions = QUESTIONS[modality]
    mc, open_ = [], []
    for category in MC_CATEGORIES[modality]:
      options = _multiple_choice(modality, category)
      listed = '\n'.join(f'{MC_LETTERS[j]}. {o}' for j, o in enumerate(options))
      question = f'{questions[category]}\nOptions:\n{listed}\n{MC_SUFFIX}'
      for i, item in enumerate(pools[modality]):
        answer = item['labels'][category]
        letter = MC_LETTERS[options.index(answer)]
        mc.append(
            _example(
                f'{split}-eval_{modality}_mc-{category}-{i:05d}',
                modality,
                item,
                [(question, letter)],
                root,
                absolute_paths,
                answer=letter,
                options=options,
                label=answer,
                category=category,
            )
        )
    for category in EVAL_CATEGORIES[modality]:
      for i, item in enumerate(pools[modality]):
        answer = item['labels'][category]
        open_.append(
            _example(
                f'{split}-eval_{modality}_open-{category}-{i:05d}',
                modality,
                item,
                [(questions[category], answer)],
                root,
                absolute_paths,
                answer=answer,
                category=category,
            )
        )
    manifests[f'eval_{modality}_mc'] = mc
    manifests[f'eval_{modality}_open'] = open_
  return manifests


def media_description(modality: str, labels: Dict[str, str]) -> str:
  """What a perfect connector would tell the LLM: 'a red circle', 'a blue cross moving
  horizontally',
  'spoken digits 2 6 3', 'a rising tone, pitch A'."""
  if modality == 'image':
    return image_caption(labels)
  if modality == 'video':
    return f"a {labels['colour']} {labels['shape']} moving {labels['motion']}ly"
  if modality == 'speech':
    return f"spoken digits {labels['transcript']}"
  return audio_caption(labels)


def text_warmup(manifests: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
  """The demo's stand-in for a pretrained LLM's reading skill: every align / instruct /
  benchmark-style conversation with its media replaced by a text description of the item, in
  the placeholder's place (no media field). A decoder warm-started on these answers questions
  about what is written where the media goes; stage 1 then teaches connectors to write it."""
  out = []
  for name, entries in manifests.items():
    if name == 'instruct_mixed':
      continue
    for entry in entries:
      modality = entry['modality']
      text = media_description(modality, entry['labels'])
      conversations = [dict(turn) for turn in entry['conversations']]
      conversations[0]['value'] = conversations[0]['value'].replace(
          PLACEHOLDERS[modality], f'({text})', 1
      )
      out.append({'id': f"{entry['id']}-text", 'conversations': conversations, 'modality': 'text'})
  return out


# --------------------------------------------------------------------------------------------
# Chance-level baselines, measured on the manifests written.


def word_edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
  """Levenshtein distance over words (substitutions + deletions + insertions)."""
  previous = list(range(len(hypothesis) + 1))
  for i, ref_word in enumerate(reference, 1):
    current = [i]
    for j, hyp_word in enumerate(hypothesis, 1):
      current.append(
          min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
      )
    previous = current
  return previous[-1]


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
  """Total word edits / total reference words (jiwer's corpus-level WER)."""
  edits = sum(word_edit_distance(r.split(), h.split()) for r, h in zip(references, hypotheses))
  return edits / max(1, sum(len(r.split()) for r in references))


def chance_baselines(manifests: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
  """For each eval manifest: accuracy of a uniformly random option / the best constant answer
  (MC: one letter; open: one string), per category and overall; for speech_open the WER of an
  empty answer and of the best constant digit string."""
  out = {}
  for name, entries in manifests.items():
    if not name.startswith('eval_'):
      continue
    answers = [e['answer'] for e in entries]
    values, counts = np.unique(answers, return_counts=True)
    stats = {
        'num_examples': len(entries),
        'best_constant_answer': str(values[np.argmax(counts)]),
        'best_constant_accuracy': float(counts.max() / len(entries)),
    }
    if name.endswith('_mc'):
      stats['uniform_guess_accuracy'] = float(np.mean([1.0 / len(e['options']) for e in entries]))
    per_category = {}
    for category in sorted(set(e['category'] for e in entries)):
      members = [e for e in entries if e['category'] == category]
      _, c = np.unique([e['answer'] for e in members], return_counts=True)
      per_category[category] = {
          'num_examples': len(members),
          'best_constant_accuracy': float(c.max() / len(members)),
      }
      if name.endswith('_mc'):
        per_category[category]['uniform_guess_accuracy'] = 1.0 / len(members[0]['options'])
      else:
        per_category[category]['num_classes'] = int(c.size)
    stats['per_category'] = per_category
    if name == 'eval_speech_open':
      guesses = [' '.join(d * k) for d in '0123456789' for k in SPEECH_LENGTHS]
      wers = {g: corpus_wer(answers, [g] * len(answers)) for g in guesses}
      best = min(wers, key=wers.get)
      stats.update(
          empty_answer_wer=1.0, best_constant_transcript=best, best_constant_wer=wers[best]
      )
    out[name] = stats
  return out


MANIFEST_PURPOSE = {
    'align': ('stage 1 (connector alignment): one-turn caption / transcription pairs', None),
    'instruct': ('stage 2/3 instruction tuning: question answering, about half two-turn', None),
    'mc': ('evaluation: multiple choice, answer = option letter', 'accuracy of the letter'),
    'open': ('evaluation: open answer', 'exact-match accuracy'),
}


def _describe(name: str) -> Dict[str, Any]:
  if name == 'warmup_text':
    return {
        'purpose': 'demo warm start of the decoder (text only): every align / instruct / '
        'eval-style conversation, the media replaced by its description',
        'modality': 'text',
        'metric': None,
    }
  if name == 'instruct_mixed':
    return {
        'purpose': 'stage 3: shuffled union of the four instruct_* manifests (each entry '
        "carries 'modality' to tell speech from audio voice items)",
        'modality': 'mixed',
        'metric': None,
    }
  kind, modality = name.split('_')[0], name.split('_')[1]
  key = name.split('_')[-1] if kind == 'eval' else kind
  purpose, metric = MANIFEST_PURPOSE[key]
  if name == 'eval_speech_open':
    metric = 'word error rate of the transcript (digits as words)'
  return {'purpose': purpose, 'modality': modality, 'metric': metric}


def make_sample_data(
    output: str,
    num_train: int = 512,
    num_validation: int = 128,
    seed: int = 0,
    image_size: int = 32,
    num_frames: int = NUM_FRAMES,
    sample_rate: int = SAMPLE_RATE,
    absolute_paths: bool = False,
) -> Dict[str, Any]:
  """Writes media, manifests (output/<split>/<name>.json) and output/sample_data_info.json.

  Returns:
    the info dict written to sample_data_info.json.
  """
  if image_size < 16:
    raise ValueError(f'image_size must be >= 16, got {image_size}')
  if num_frames < 2:
    raise ValueError(f'num_frames must be >= 2, got {num_frames}')
  for name, n in (('num_train', num_train), ('num_validation', num_validation)):
    if n < 1:
      raise ValueError(f'{name} must be positive, got {n}')
  os.makedirs(output, exist_ok=True)
  info = {
      'seed': seed,
      'image_size': image_size,
      'num_frames': num_frames,
      'sample_rate': sample_rate,
      'clip_seconds': CLIP_SECONDS,
      'media_paths': 'absolute' if absolute_paths else 'relative to this directory',
      'voice_encoder': {'speech': 'Whisper (speech task)', 'audio': 'BEATs (audio task)'},
      'splits': {},
  }
  for split, n in (('train', num_train), ('validation', num_validation)):
    pools = make_media(output, split, n, seed, image_size, num_frames, sample_rate)
    manifests = build_manifests(pools, split, seed, output, absolute_paths)
    manifests['warmup_text'] = text_warmup(manifests)
    os.makedirs(os.path.join(output, split), exist_ok=True)
    listed = {}
    for name, entries in manifests.items():
      rel = os.path.join(split, f'{name}.json')
      with open(os.path.join(output, rel), 'w') as f:
        json.dump(entries, f, indent=1)
      listed[name] = dict(_describe(name), file=rel, num_examples=len(entries))
    info['splits'][split] = {
        'num_items_per_modality': n,
        'manifests': listed,
        'chance': chance_baselines(manifests),
    }
  with open(os.path.join(output, 'sample_data_info.json'), 'w') as f:
    json.dump(info, f, indent=1)
  return info


def train_tokenizer(output: str, vocab_size: int = 512) -> str:
  """Trains DIR/tokenizer.model on the train manifests' text, with LLaMA's SentencePiece
  settings (BPE, byte fallback, unk 0, <s> 1, </s> 2, no pad, digits split).

  The demo has no pretrained LLaMA tokenizer to download; this one covers the sample data's
  words (and anything else through byte fallback). `hard_vocab_limit=False` lets the tiny
  corpus stop below `vocab_size`; the model's vocab_size must be at least the result.
  """
  from unimoe_jax.data import conversation  # pylint: disable=g-import-not-at-top
  from unimoe_jax.data import sentencepiece_files  # pylint: disable=g-import-not-at-top

  lines = [conversation.SYSTEM]
  train = os.path.join(output, 'train')
  for name in sorted(os.listdir(train)):
    with open(os.path.join(train, name)) as f:
      for entry in json.load(f):
        for turn in entry['conversations']:
          lines.append(
              turn['value']
              .replace('<image>', '')
              .replace('<video>', '')
              .replace('<audio>', '')
              .strip()
          )
  lines += ['USER: ASSISTANT:'] * 100
  return sentencepiece_files.train_sentencepiece(
      lines,
      os.path.join(output, 'tokenizer.model'),
      vocab_size,
      hard_vocab_limit=False,
      add_dummy_prefix=True,
      split_digits=True,
      allow_whitespace_only_pieces=True,
  )


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--output', required=True, help='directory to write (created)')
  parser.add_argument('--train', type=int, default=512, help='items per modality, train split')
  parser.add_argument(
      '--validation', type=int, default=128, help='items per modality, validation split'
  )
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--num_frames', type=int, default=NUM_FRAMES)
  parser.add_argument(
      '--absolute_paths',
      action='store_true',
      help='write absolute media paths instead of paths relative to --output',
  )
  parser.add_argument(
      '--vocab_size',
      type=int,
      default=512,
      help='upper bound of the SentencePiece model written as tokenizer.model ' '(0: none)',
  )
  args = parser.parse_args(argv)
  started = time.time()
  info = make_sample_data(
      args.output,
      args.train,
      args.validation,
      args.seed,
      args.image_size,
      args.num_frames,
      absolute_paths=args.absolute_paths,
  )
  if args.vocab_size:
    train_tokenizer(args.output, args.vocab_size)
  files = sum(len(s['manifests']) for s in info['splits'].values())
  print(
      f'wrote {files} manifests and media for {args.train} train / {args.validation} '
      f'validation items per modality to {args.output} in {time.time() - started:.1f} s'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
