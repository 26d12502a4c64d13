"""What the sample data is made of: the classes of each modality's labels, the DTMF keypad,
the media's timings and sizes, and the seeded draws every item and label comes from."""

from typing import Any, List, Sequence

import numpy as np

from unimoe_jax.modalities import MODALITIES

SPLITS = ('train', 'validation')  # The sample data's splits; tasks/sample.py registers them.

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

CLIP_SECONDS = 1.0
CHIRP_SECONDS = (0.5, 1.0)
# The chirp sweeps note_hz * (1 -+ span) linearly, about 1.7 semitones either side: wide enough
# to hear the direction, narrow enough that the pitch class stays well defined.
CHIRP_SPAN = 0.1
NUM_FRAMES = 8


def note_frequency(pitch_class: str, octave: int = 4) -> float:
  """Equal temperament, A4 = 440 Hz."""
  midi = 12 * (octave + 1) + PITCH_CLASSES.index(pitch_class)
  return 440.0 * 2.0 ** ((midi - 69) / 12.0)


def balanced_labels(rng: np.random.Generator, classes: Sequence[Any], n: int) -> List[Any]:
  """`n` labels in which every class appears floor(n / k) or ceil(n / k) times, shuffled."""
  order = rng.permutation(len(classes))  # which classes get the extra item when k does not divide n
  tiled = np.concatenate([np.arange(len(classes))] * (n // len(classes) + 1))[:n]
  return [classes[int(order[i])] for i in rng.permutation(tiled)]


def rng_of_item(seed: int, split: str, modality: str, index: int) -> np.random.Generator:
  return np.random.default_rng(
      np.random.SeedSequence([seed, SPLITS.index(split), MODALITIES.index(modality), index])
  )
