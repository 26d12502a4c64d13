"""What the data tests share: a LLaMA-like tiny tokenizer, official-style records, media files
and records of them, writing a manifest, and a small `ManifestConfig` (16 px images, 2 video
frames, 64 BEATs frames)."""

import json
import os

import numpy as np
from PIL import Image
import soundfile

from unimoe_jax.data import conversation as conv_lib
from unimoe_jax.data import manifest as manifest_lib
from unimoe_jax.data import vocabulary as vocab_lib

SIZE, FRAMES, AUDIO_FRAMES = 16, 2, 64


def turns(question, answer='A red square.'):
  """One human question and one gpt answer, as the official manifests hold them."""
  return [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]


# Official-style records of the files `write_media` writes, shared by the manifest tests.
VIDEO_WITH_VOICE = {
    'id': 'vid',
    'video': ['frames/0.png', 'frames/1.png', 'frames/2.png'],
    'voice': ['sounds/tone.wav'],
    'conversations': turns('<audio>\n<video>\nDescribe the sound and the video.'),
}
SHORT_AUDIO = {
    'id': 'aud',
    'audio': 'sounds/short.wav',
    'conversations': turns('<audio> What is it?'),
}
TEXT_ONLY = {'id': 'txt', 'conversations': turns('What is this?', 'Text only.')}


def write_manifest(root, name, records, jsonl=True) -> str:
  """`records` written to root/name as JSONL (or one JSON list); returns the path."""
  path = str(root / name)
  with open(path, 'w') as f:
    if jsonl:
      f.write('\n'.join(json.dumps(r) for r in records) + '\n')
    else:
      json.dump(records, f)
  return path


def small_config(path, vocab_path, soft_tokens, **overrides) -> manifest_lib.ManifestConfig:
  """A ManifestConfig of the small sizes above; `soft_tokens`: modality -> count per item."""
  kwargs = dict(
      path=path,
      vocab_path=vocab_path,
      image_size=SIZE,
      video_frames=FRAMES,
      audio_frames=AUDIO_FRAMES,
      voice_modality='speech',
      **{f'{m}_soft_tokens': n for m, n in soft_tokens.items()},
  )
  kwargs.update(overrides)
  return manifest_lib.ManifestConfig(**kwargs)


def manifest_tokenizer(directory, more_text, vocab_size) -> str:
  """directory/tokenizer.model: a tiny SentencePiece model with the library's settings
  (`vocabulary.train_sentencepiece`) trained on the system prompt, a first turn ('USER: What is
  this? ASSISTANT: A red square.') and `more_text` (the rest of a test's text), x 20."""
  corpus = [conv_lib.SYSTEM, 'USER: What is this? ASSISTANT: A red square.', more_text]
  return vocab_lib.train_sentencepiece(corpus * 20, str(directory / 'tokenizer.model'), vocab_size)


def llama_like_tokenizer(directory, corpus) -> str:
  """directory/tokenizer.model: a tiny SentencePiece model with LLaMA's settings (BPE, byte
  fallback, unk 0, <s> 1, </s> 2, no pad, identity normalisation, dummy prefix, digits split)
  trained on `corpus` x 20."""
  return vocab_lib.train_sentencepiece(
      corpus * 20,
      str(directory / 'tokenizer.model'),
      vocab_size=400,
      add_dummy_prefix=True,
      split_digits=True,
      allow_whitespace_only_pieces=True,
  )


def write_media(root, image_sizes) -> None:
  """Random images pics/<name> of `image_sizes` (name -> (height, width)), three video frames
  frames/{0,1,2}.png, sounds/tone.wav (1 s, 440 Hz) and sounds/short.wav (0.3 s, 880 Hz), and
  pics/broken.png, which is not an image. Seeded: the same files every time."""
  rng = np.random.default_rng(0)
  for folder in ('pics', 'frames', 'sounds'):
    os.makedirs(root / folder)
  for name, (height, width) in image_sizes.items():
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        root / 'pics' / name
    )
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
        root / f'frames/{i}.png'
    )
  t = np.arange(16000) / 16000
  soundfile.write(root / 'sounds/tone.wav', 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
  soundfile.write(root / 'sounds/short.wav', 0.3 * np.sin(2 * np.pi * 880 * t[:4800]), 16000)
  with open(root / 'pics/broken.png', 'wb') as f:
    f.write(b'this is not a png file at all')
