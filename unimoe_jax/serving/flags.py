"""The command-line flags `python -m unimoe_jax.score` and `python -m unimoe_jax.generate`
share, and the decoding flags of `generate`. Types check the form of a value and name the flag;
the library checks ranges (`answering.DecodingSettings`)."""

import argparse
import dataclasses

from unimoe_jax.serving import answering
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
  """argparse type: `kind(text)`, the error naming `flag` (ranges: `answering.DecodingSettings`)."""

  def parse(text):
    try:
      return kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f'{flag} must be {"an integer" if kind is int else "a number"}, got {text!r}'
      ) from None

  return parse


# Help of the decoding flags of `generate`, one per field of `answering.DecodingSettings`
# (--max_length is a common flag); their types and defaults are the fields'.
_DECODING_HELP = {
    'max_decode_steps': 'most new tokens (prompt + these <= --max_length)',
    'temperature': '0: greedy; > 0: sampling',
    'top_k': 'sampling: keep the k most likely (0: off)',
    'top_p': 'sampling: nucleus mass in (0, 1] (1: off)',
    'num_beams': '> 1: beam search',
    'seed': 'sampling seed',
}


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
  """A flag for each field of `answering.DecodingSettings` but max_length (a common flag)."""
  for field in dataclasses.fields(answering.DecodingSettings):
    if field.name != 'max_length':
      flag = f'--{field.name}'
      parser.add_argument(
          flag,
          type=typed(flag, field.type),
          default=field.default,
          help=f'{_DECODING_HELP[field.name]}; default {field.default}',
      )


def decoding_settings(args: argparse.Namespace) -> answering.DecodingSettings:
  """The `DecodingSettings` of parsed flags (a bad value raises ValueError naming its flag)."""
  return answering.DecodingSettings(
      **{
          field.name: getattr(args, field.name)
          for field in dataclasses.fields(answering.DecodingSettings)
      }
  )
