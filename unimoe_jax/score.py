"""Scores a text under a converted checkpoint: the log-probability of each token.

    python -m unimoe_jax.score --checkpoint /out/vicuna --text "The cat sat on the mat."
    python -m unimoe_jax.score --checkpoint /out/unimoe --image cat.jpg --text "a cat"

prints one JSON line per token, `{"token": id, "piece": str, "logprob": float}`, where logprob
is `log p(token | the tokens before it)`; the first line is BOS, without a logprob. The
vocabulary is `--vocab` or the checkpoint's `tokenizer.model`. Computation is float32 unless
`--dtype` says otherwise.

With media (`--image`, `--video`, `--speech` to Whisper, `--audio` to BEATs; each repeatable)
the text is scored raw (no chat template) after the media: the text may hold placeholders
(`<image>` ...) where the media go, else one "<m>\n" line per file is put in front
(unimoe_jax/serving/prompting.py). Only text tokens get a line: each placeholder stands for
`num_soft_tokens(m)` soft tokens per item (a speech / audio file longer than 30 s is several
items, cut as official inference cuts it) that the model computes from the media, which are not
predicted and are not scored, but every text token after them is conditioned on them.
"""

import argparse
import json
import sys
from typing import Optional, Sequence

from unimoe_jax.serving import flags
from unimoe_jax.serving import scoring


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  flags.add_common_flags(parser)
  parser.add_argument('--text', required=True)
  flags.add_media_flags(parser)
  args = parser.parse_args(argv)
  media = {f: getattr(args, f) for f in flags.MEDIA_FLAGS if getattr(args, f)}
  for record in scoring.score_text(
      args.checkpoint, args.text, args.vocab, args.dtype, media, args.max_length
  ):
    print(json.dumps(record, ensure_ascii=False))
  return 0


if __name__ == '__main__':
  sys.exit(main())
