"""Writes the embedded synthetic multimodal data set (`unimoe_jax.sample_data`) and its
SentencePiece model; docs/sample_data.md describes what is written.

  python tools/make_sample_data.py --output /tmp/unimoe_sample
  python tools/make_sample_data.py --output DIR --train 512 --validation 128 --seed 0 \
      --image_size 32
"""

import argparse
import inspect
import sys
import time
from typing import Optional, Sequence

from unimoe_jax import sample_data


def _defaults(fn):
  """The keyword defaults of `fn`: the flags' defaults are the library's, written there once."""
  return {name: p.default for name, p in inspect.signature(fn).parameters.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
  data, tokenizer = _defaults(sample_data.make_sample_data), _defaults(sample_data.train_tokenizer)
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--output', required=True, help='directory to write (created)')
  parser.add_argument(
      '--train', type=int, default=data['num_train'], help='items per modality, train split'
  )
  parser.add_argument(
      '--validation',
      type=int,
      default=data['num_validation'],
      help='items per modality, validation split',
  )
  parser.add_argument('--seed', type=int, default=data['seed'])
  parser.add_argument('--image_size', type=int, default=data['image_size'])
  parser.add_argument('--num_frames', type=int, default=data['num_frames'])
  parser.add_argument(
      '--absolute_paths',
      action='store_true',
      help='write absolute media paths instead of paths relative to --output',
  )
  parser.add_argument(
      '--vocab_size',
      type=int,
      default=tokenizer['vocab_size'],
      help='upper bound of the SentencePiece model written as tokenizer.model (0: none)',
  )
  args = parser.parse_args(argv)
  started = time.time()
  info = sample_data.make_sample_data(
      args.output,
      num_train=args.train,
      num_validation=args.validation,
      seed=args.seed,
      image_size=args.image_size,
      num_frames=args.num_frames,
      absolute_paths=args.absolute_paths,
  )
  if args.vocab_size:
    sample_data.train_tokenizer(args.output, args.vocab_size)
  files = sum(len(s['manifests']) for s in info['splits'].values())
  print(
      f'wrote {files} manifests and media for {args.train} train / {args.validation} '
      f'validation items per modality to {args.output} in {time.time() - started:.1f} s'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
