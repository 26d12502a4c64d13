"""The media of the sample data: shapes drawn on a dark background (images), a shape moving
across frames (video), DTMF digit sequences (speech) and chirps through a note (audio), written
as one pool of files per modality and split (`make_media`)."""

import os
from typing import Any, Dict, List, Tuple

import numpy as np

from unimoe_jax.media.audio import SAMPLE_RATE
from unimoe_jax.sample_data.catalogue import (
    CHIRP_SECONDS,
    CHIRP_SPAN,
    CLIP_SECONDS,
    COLOURS,
    COLOUR_NAMES,
    COUNTS,
    DIRECTIONS,
    DIRECTION_STEPS,
    DTMF_COLUMNS,
    DTMF_DIGITS,
    DTMF_GAP_SECONDS,
    DTMF_ROWS,
    DTMF_TONE_SECONDS,
    MOTIONS,
    MOTION_OF,
    NUMBER_WORDS,
    NUM_FRAMES,
    PITCH_CLASSES,
    SHAPES,
    SPEECH_LENGTHS,
    SPLITS,
    SWEEPS,
    balanced_labels,
    note_frequency,
    rng_of_item,
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
      rng = rng_of_item(seed, split, modality, i)
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
    item_rng = rng_of_item(seed, split, 'video', i)
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
