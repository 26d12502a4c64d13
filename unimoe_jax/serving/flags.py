"""The command-line flags `python -m unimoe_jax.score` and `python -m unimoe_jax.generate`
share, and the decoding flags of `generate`. Types check the form of a value and name the flag;
the library functions check ranges (`answering.check_decoding`)."""

import argparse

from unimoe_jax.serving.scoring import DEFAULT_MAX_LENGTH, DTYPES

MEDIA_FLAGS = ('image', 'audio', 'speech', 'video')


def positive_int(flag: str):
  """An argparse type: an int >= 1; the error names `flag`."""

  def parse(text):
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'{flag} must be an integer, got {text!r}') from None
    if value < 1:
      raise argparse.ArgumentTypeError(f'{flag} must be >= 1, got {value}')
    return value

  return parse


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  """--checkpoint, --vocab, --dtype, --max_length (shared by score and generate)."""
  parser.add_argument(
      '--checkpoint',
      required=True,
      help='a converted checkpoint (tools/convert_checkpoint.py), a training '
      'MODEL_DIR (its latest step) or one of its checkpoints/<step> directories',
  )
  parser.add_argument(
      '--vocab',
      default=None,
      help='SentencePiece model; default the '
      "checkpoint's tokenizer.model (for a training run: MODEL_DIR's or its "
      "INITIAL_CHECKPOINT_PATH's)",
  )
  parser.add_argument('--dtype', default='float32', choices=DTYPES, help='compute dtype')
  parser.add_argument(
      '--max_length',
      type=positive_int('--max_length'),
      default=DEFAULT_MAX_LENGTH,
      help='longest sequence (prompt with media soft tokens, plus generated '
      f'tokens); default {DEFAULT_MAX_LENGTH}',
  )


def add_media_flags(parser: argparse.ArgumentParser) -> None:
  """--image / --video / --speech (Whisper) / --audio (BEATs), each repeatable."""
  helps = {
      'image': 'image file',
      'video': 'video file',
      'speech': 'speech audio file (Whisper ' 'encoder)',
      'audio': 'audio file (BEATs encoder)',
  }
  for flag in MEDIA_FLAGS:
    parser.add_argument(
        f'--{flag}', action='append', default=None, help=f'{helps[flag]}; repeat for several'
    )


def typed(flag: str, kind):
  """argparse type: `kind(text)`, the error naming `flag` (ranges: `answering.check_decoding`)."""

  def parse(text):
    try:
      return kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f'{flag} must be {"an integer" if kind is int else "a number"}, got {text!r}'
      ) from None

  return parse


# The decoding flags: (flag, type, default, help). Each value is checked by
# `answering.check_decoding`.
DECODING_FLAGS = (
    ('--max_decode_steps', int, 128, 'most new tokens (prompt + these <= --max_length)'),
    ('--temperature', float, 0.0, '0: greedy; > 0: sampling'),
    ('--top_k', int, 0, 'sampling: keep the k most likely (0: off)'),
    ('--top_p', float, 1.0, 'sampling: nucleus mass in (0, 1] (1: off)'),
    ('--num_beams', int, 1, '> 1: beam search'),
    ('--seed', int, 0, 'sampling seed'),
)
