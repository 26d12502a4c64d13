"""Answers a question about optional media with a converted checkpoint.

    python -m unimoe_jax.generate --checkpoint /out/unimoe --image cat.jpg \
        --prompt "What is in the image?" --max_decode_steps 64

renders the Vicuna v1 prompt ("SYSTEM USER: <image>\nWhat is in the image? ASSISTANT:", see
unimoe_jax/serving/prompting.py), decodes greedily (default), by sampling (`--temperature` > 0,
with `--top_k` / `--top_p`) or by beam search (`--num_beams` > 1), and prints the answer text up
to EOS. `--speech` feeds the Whisper encoder, `--audio` BEATs; media flags repeat; a file longer
than 30 s is cut into chunks as official inference cuts it (speech: all, audio: up to 20, all at
its one placeholder; unimoe_jax/serving/prompting.py). Text-only
checkpoints (decoder params only, config.gin without MODEL_CONFIG) work the same way without
media. The vocabulary is `--vocab` or the checkpoint's `tokenizer.model`.

`--checkpoint` may also be a training MODEL_DIR (its latest step), its `checkpoints/` directory
or one `checkpoints/<step>` directory: the params are read from the train state and the model
from MODEL_DIR/config.gin, no export step needed; the tokenizer is then MODEL_DIR's or that of
the converted checkpoint the run started from (INITIAL_CHECKPOINT_PATH), else `--vocab`.

Every decoding flag is checked when parsed, naming the flag: `--temperature` >= 0 (0 greedy),
`--top_k` >= 0 (0 off) and at most the vocabulary, `--top_p` in (0, 1] (1 off), both only with
sampling; `--num_beams` >= 1 (> 1 only with greedy temperature 0); `--max_decode_steps` >= 1.
The prompt (media soft tokens included) plus `--max_decode_steps` must fit in `--max_length`
(default 2048, the LLaMA / Vicuna context): the decode buffer and cache are that long.

The command line over `unimoe_jax.serving.answering.answer`.
"""

import argparse
import sys
from typing import Optional, Sequence

from unimoe_jax.media import image as image_lib
from unimoe_jax.serving import answering
from unimoe_jax.serving import flags
from unimoe_jax.serving import prompting


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  flags.add_common_flags(parser)
  parser.add_argument('--prompt', required=True, help='the question (placeholders optional)')
  flags.add_media_flags(parser)
  flags.add_decoding_flags(parser)
  parser.add_argument(
      '--image_mode',
      default='crop',
      choices=image_lib.PREPROCESS_MODES,
      help="image preprocessing: CLIP's centre crop or LLaVA's expand-to-square",
  )
  args = parser.parse_args(argv)
  try:
    settings = flags.decoding_settings(args)
  except ValueError as e:
    parser.error(str(e))
  media = {m: getattr(args, m) for m in prompting.MODALITIES if getattr(args, m)}
  result = answering.answer(
      args.checkpoint,
      args.prompt,
      media,
      settings=settings,
      vocab_path=args.vocab,
      dtype=args.dtype,
      image_mode=args.image_mode,
  )
  print(result.text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
