"""What the manifest tests share: official-style records, writing a manifest, and a small
`ManifestConfig` (16 px images, 2 video frames, 64 BEATs frames)."""

import json

from unimoe_jax.data import manifest as manifest_lib

SIZE, FRAMES, AUDIO_FRAMES = 16, 2, 64


def turns(question, answer='A red square.'):
  """One human question and one gpt answer, as the official manifests hold them."""
  return [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]


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
