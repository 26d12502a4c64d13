"""Writes the sample data set: media, manifests, sample_data_info.json (`make_sample_data`) and
the demo's SentencePiece model (`train_tokenizer`)."""

import json
import os
from typing import Any, Dict, List

import numpy as np

from unimoe_jax.data import metrics
from unimoe_jax.media.audio import SAMPLE_RATE
from unimoe_jax.sample_data.catalogue import CLIP_SECONDS, NUM_FRAMES, SPEECH_LENGTHS
from unimoe_jax.sample_data.manifests import OFFICIAL_PLACEHOLDERS, build_manifests, text_warmup
from unimoe_jax.sample_data.media import make_media

# --------------------------------------------------------------------------------------------
# Chance-level baselines, measured on the manifests written.


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
      wers = {g: metrics.word_error_rate(answers, [g] * len(answers))['wer'] for g in guesses}
      best = min(wers, key=wers.get)
      stats.update(
          empty_answer_wer=metrics.word_error_rate(answers, [''] * len(answers))['wer'],
          best_constant_transcript=best,
          best_constant_wer=wers[best],
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
          text = turn['value']
          for placeholder in set(OFFICIAL_PLACEHOLDERS.values()):
            text = text.replace(placeholder, '')
          lines.append(text.strip())
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
