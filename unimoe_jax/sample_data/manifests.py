"""The manifests of the sample data, in the official Uni-MoE JSON format: align_* (captions),
instruct_* (question answering, some two-turn), instruct_mixed, eval_*_mc / eval_*_open, and the
text-only warm-up (`build_manifests`, `text_warmup`)."""

import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from unimoe_jax.modalities import MODALITIES, PLACEHOLDERS
from unimoe_jax.sample_data.catalogue import (
    COLOUR_NAMES,
    COUNTS,
    MOTIONS,
    NUMBER_WORDS,
    PITCH_CLASSES,
    SHAPES,
    SHAPE_PLURALS,
    SPLITS,
    SWEEPS,
    balanced_labels,
)

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
# Official manifests write "<audio>" for speech too (its file is a `voice`, MEDIA_FIELDS).
OFFICIAL_PLACEHOLDERS = {**PLACEHOLDERS, 'speech': PLACEHOLDERS['audio']}
MEDIA_FIELDS = {'image': 'image', 'video': 'video', 'speech': 'voice', 'audio': 'voice'}


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
      question = f'{OFFICIAL_PLACEHOLDERS[modality]}\n{question}'
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
          OFFICIAL_PLACEHOLDERS[modality], f'({text})', 1
      )
      out.append({'id': f"{entry['id']}-text", 'conversations': conversations, 'modality': 'text'})
  return out
