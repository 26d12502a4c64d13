r"""Scores a text under a converted checkpoint: the log-probability of each token.

    python -m unimoe_jax.score --checkpoint /out/vicuna --text "The cat sat on the mat."
    python -m unimoe_jax.score --checkpoint /out/unimoe --image cat.jpg --text "a cat"

prints one JSON line per token, `{"token": id, "piece": str, "logprob": float}`, where logprob
is `log p(token | the tokens before it)`; the first line is BOS, without a logprob. The
vocabulary is `--vocab` or the checkpoint's `tokenizer.model`. Computation is float32 unless
`--dtype` says otherwise.

With media (`--image`, `--video`, `--speech` to Whisper, `--audio` to BEATs; each repeatable)
the text is scored raw (no chat template) after the media: the text may hold placeholders
(`<image>` ...) where the media go, else one "<m>\n" line per file is put in front
(unimoe_jax/prompting.py). Only text tokens get a line: each placeholder stands for
`num_soft_tokens(m)` soft tokens per item (a speech / audio file longer than 30 s is several
items, cut as official inference cuts it) that the model computes from the media, which are not
predicted and are not scored, but every text token after them is conditioned on them.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import gin
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import checkpoint
from unimoe_jax import layer_stacking
from unimoe_jax.config import DecoderConfig
from unimoe_jax.decoder import Decoder
from unimoe_jax.model import UniMoE, UniMoEConfig

_MEDIA_FLAGS = ('image', 'audio', 'speech', 'video')

# Compute dtypes --dtype accepts.
DTYPES = ('float32', 'bfloat16', 'float16')
# The longest sequence (prompt, media soft tokens included, + generated tokens) --max_length
# allows by default: the 2048-token context of the LLaMA / Vicuna decoders the released
# checkpoints start from (their model_max_length). The decode buffer and its key/value cache
# are allocated at this length, so it bounds memory.
DEFAULT_MAX_LENGTH = 2048


@gin.configurable('unimoe_score_decoder_config')
def _decoder_config(decoder: DecoderConfig = gin.REQUIRED) -> DecoderConfig:
  return decoder


@gin.configurable('unimoe_score_model_config')
def _model_config(model: UniMoEConfig = gin.REQUIRED) -> UniMoEConfig:
  return model


def decoder_config_from_gin(gin_text: str) -> DecoderConfig:
  """The `DECODER_CONFIG` a checkpoint's config.gin binds.

  Gin's global config is used and cleared afterwards: bindings such as `LoRAConfig` must not
  leak into configs built later in the same process.
  """
  gin.clear_config()
  try:
    gin.parse_config(gin_text + '\nunimoe_score_decoder_config.decoder = %DECODER_CONFIG\n')
    return _decoder_config()  # pylint: disable=no-value-for-parameter
  finally:
    gin.clear_config()


def model_config_from_gin(gin_text: str) -> UniMoEConfig:
  """The `UniMoEConfig` of a checkpoint's config.gin: its `MODEL_CONFIG` when it binds one
  (multimodal checkpoints), else a text-only model around its `DECODER_CONFIG`.

  Like `decoder_config_from_gin`, gin's global config is cleared afterwards.
  """
  gin.clear_config()
  try:
    gin.parse_config(gin_text)
    try:
      gin.query_parameter('%MODEL_CONFIG')
    except ValueError:
      bound = False
    else:
      bound = True
    if bound:
      gin.parse_config('unimoe_score_model_config.model = %MODEL_CONFIG')
      return _model_config()  # pylint: disable=no-value-for-parameter
    gin.parse_config('unimoe_score_decoder_config.decoder = %DECODER_CONFIG')
    return UniMoEConfig(decoder=_decoder_config())  # pylint: disable=no-value-for-parameter
  finally:
    gin.clear_config()


def with_dtype(config: UniMoEConfig, dtype: str) -> UniMoEConfig:
  """`config` computing (and holding weights) in `dtype` everywhere (see `decoder_with_dtype`)."""
  return dataclasses.replace(config, decoder=decoder_with_dtype(config.decoder, dtype))


def decoder_with_dtype(decoder: DecoderConfig, dtype: str) -> DecoderConfig:
  """`decoder` computing and holding weights in `dtype`.

  A router that ran in the model's compute dtype (`MoEConfig.router_dtype` equal to the
  decoder's `dtype`: the official 4-expert gate is a model-dtype Linear) follows it; a router
  pinned to another dtype (float32: ours, and the official 8e gate) keeps it.
  """
  moe = decoder.moe
  if moe is not None and jnp.dtype(moe.router_dtype) == jnp.dtype(decoder.dtype):
    moe = dataclasses.replace(moe, router_dtype=dtype)
  return dataclasses.replace(decoder, dtype=dtype, param_dtype=dtype, moe=moe)


# ---- checkpoint directories -----------------------------------------------------------------
def _checkpoints_lib():
  from unimoe_jax.training import checkpoints  # pylint: disable=g-import-not-at-top

  return checkpoints


def locate_checkpoint(path: str, flag: str = '--checkpoint') -> Tuple[str, Optional[int]]:
  """(directory holding the params, training step or None) of what `flag` names: a converted /
  exported checkpoint (`params/` + `config.gin`), a training MODEL_DIR (its latest step), its
  `checkpoints/` directory or one step directory (training/checkpoints.py `locate`). Errors
  name `flag`: a path that does not exist, is not a directory, or holds no checkpoint."""
  if not path:
    raise FileNotFoundError(
        f'{flag} is empty: name a converted checkpoint or a training ' 'MODEL_DIR'
    )
  if not os.path.exists(path):
    raise FileNotFoundError(f'{flag}={path} does not exist')
  if not os.path.isdir(path):
    raise NotADirectoryError(f'{flag}={path} is not a directory (a checkpoint is a directory)')
  return _checkpoints_lib().locate(path, flag)


def _run_dir(directory: str) -> str:
  """MODEL_DIR of a training step directory MODEL_DIR/checkpoints/<step>."""
  return os.path.dirname(os.path.dirname(os.path.abspath(directory)))


def checkpoint_gin_text(path: str, flag: str = '--checkpoint') -> str:
  """The config.gin of the checkpoint `flag` names (MODEL_DIR/config.gin for a training run),
  read without any array."""
  directory, step = locate_checkpoint(path, flag)
  converted = os.path.isdir(os.path.join(directory, checkpoint.PARAMS_DIR))
  gin_path = os.path.join(directory if converted else _run_dir(directory), checkpoint.GIN_FILE)
  if not os.path.exists(gin_path):
    what = 'checkpoint' if converted else f'training run (step {step})'
    raise FileNotFoundError(
        f'{flag}={path}: the {what} has no {gin_path} (the model ' 'configuration it needs)'
    )
  with open(gin_path) as f:
    return f.read()


def read_checkpoint(path: str, flag: str = '--checkpoint') -> Tuple[Dict[str, Any], str]:
  """(params as numpy, gin text) of a converted checkpoint or a training run (`locate_checkpoint`).
  A training step's params are the TrainState's: no export step is needed."""
  gin_text = checkpoint_gin_text(path, flag)
  params, _ = _checkpoints_lib().read_params(path, flag)
  return params, gin_text


def find_vocab(
    path: str,
    vocab_path: Optional[str] = None,
    flag: str = '--checkpoint',
    gin_text: Optional[str] = None,
) -> str:
  """`--vocab` when given (it must exist), else the checkpoint's tokenizer.model: beside the
  params of a converted checkpoint; for a training run in MODEL_DIR or in the converted
  checkpoint its config.gin names as INITIAL_CHECKPOINT_PATH (where training started)."""
  if vocab_path:
    if not os.path.isfile(vocab_path):
      raise FileNotFoundError(f'--vocab={vocab_path} does not exist or is not a file')
    return vocab_path
  directory, _ = locate_checkpoint(path, flag)
  candidates = [directory]
  if not os.path.isdir(os.path.join(directory, checkpoint.PARAMS_DIR)):
    candidates.append(_run_dir(directory))
    # gin.config_str() may break a long value onto the next line after '= \'.
    match = re.search(
        r"^INITIAL_CHECKPOINT_PATH\s*=\s*(?:\\\s*)?['\"]([^'\"]+)['\"]",
        gin_text or '',
        re.MULTILINE,
    )
    if match:
      candidates.append(match.group(1))
  for candidate in candidates:
    found = checkpoint.tokenizer_path(candidate)
    if found:
      return found
  raise FileNotFoundError(
      f'{flag}={path} has no {checkpoint.TOKENIZER_FILE} (looked in '
      f'{", ".join(candidates)}); pass --vocab'
  )


def check_max_length(length: int, max_length: int, what: str) -> None:
  """Refuses a sequence longer than `max_length`, naming --max_length."""
  if length > max_length:
    raise ValueError(
        f'{what} is {length} tokens, more than --max_length={max_length}; shorten '
        'it or raise --max_length (memory grows with it)'
    )


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


def restore_model(
    checkpoint_dir: str, dtype: str = 'float32'
) -> Tuple[UniMoEConfig, Dict[str, Any]]:
  """(model config, params as jax arrays in `dtype`) of a checkpoint directory; a text-only
  checkpoint's params (decoder only, with or without the 'decoder' level) come back as
  `{'decoder': ...}`, the tree `UniMoE(config)` expects. `checkpoint_dir` may be a training run
  (`read_checkpoint`)."""
  params, gin_text = read_checkpoint(checkpoint_dir)
  cfg = with_dtype(model_config_from_gin(gin_text), dtype)
  if 'decoder' not in params:
    params = {'decoder': params}
  params = layer_stacking.to_config_layout(params, cfg.decoder)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, cfg.decoder.weight_dtype), params)
  return cfg, params


def token_logprobs(params: Dict[str, Any], cfg: DecoderConfig, tokens: Sequence[int]) -> np.ndarray:
  """tokens `[length]` -> float32 `[length - 1]`: log p(tokens[i + 1] | tokens[:i + 1])."""
  ids = jnp.asarray(np.asarray(tokens, np.int32)[None])
  logits, _ = Decoder(cfg).apply({'params': params}, ids)
  logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
  return np.asarray(jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1)[:, 0])


def multimodal_token_logprobs(
    params: Dict[str, Any], cfg: UniMoEConfig, batch: Mapping[str, Any]
) -> np.ndarray:
  """A one-row batch -> float32 `[length - 1]`: log p(token[i + 1] | everything before it),
  media spliced in (entries at placeholder positions are meaningless: not scored)."""
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  logits, _ = UniMoE(cfg).apply({'params': params}, batch)
  ids = batch['decoder_input_tokens']
  logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
  targets = jnp.clip(ids[0, 1:], 0, cfg.decoder.vocab_size - 1)
  return np.asarray(jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0])


def score_multimodal(
    checkpoint_dir: str,
    text: str,
    media: Mapping[str, Sequence[str]],
    vocab_path: Optional[str] = None,
    dtype: str = 'float32',
    max_length: int = DEFAULT_MAX_LENGTH,
) -> List[Dict[str, Any]]:
  """Records of BOS and every text token of `text` after `media` (module docstring)."""
  from unimoe_jax import prompting  # pylint: disable=g-import-not-at-top

  gin_text = checkpoint_gin_text(checkpoint_dir)
  vocab_path = find_vocab(checkpoint_dir, vocab_path, gin_text=gin_text)
  cfg = with_dtype(model_config_from_gin(gin_text), dtype)
  tokenizer = prompting.PromptTokenizer(vocab_path, cfg)
  prompt = prompting.build_prompt(text, media, cfg, tokenizer, template=False)
  check_max_length(prompt.length, max_length, 'the text with its media soft tokens')
  cfg, params = restore_model(checkpoint_dir, dtype)
  logprobs = multimodal_token_logprobs(params, cfg, prompt.batch)
  ids = [int(t) for t in prompt.batch['decoder_input_tokens'][0]]
  records = [{'token': ids[0], 'piece': tokenizer.piece(ids[0])}]
  for i in prompting.text_positions(ids, tokenizer)[1:]:
    records.append(
        {'token': ids[i], 'piece': tokenizer.piece(ids[i]), 'logprob': float(logprobs[i - 1])}
    )
  return records


def score_text(
    checkpoint_dir: str,
    text: str,
    vocab_path: Optional[str] = None,
    dtype: str = 'float32',
    media: Optional[Mapping[str, Sequence[str]]] = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> List[Dict[str, Any]]:
  """One record per token of BOS + `text` (see the module docstring); with `media`
  (modality -> paths) those of `score_multimodal`. `checkpoint_dir` may be a training run
  (`locate_checkpoint`); more than `max_length` tokens are refused before params are read."""
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {DTYPES}, got {dtype!r}')
  if max_length < 1:
    raise ValueError(f'--max_length must be >= 1, got {max_length}')
  if media and any(media.values()):
    return score_multimodal(checkpoint_dir, text, media, vocab_path, dtype, max_length)
  gin_text = checkpoint_gin_text(checkpoint_dir)
  cfg = decoder_with_dtype(decoder_config_from_gin(gin_text), dtype)
  vocab_path = find_vocab(checkpoint_dir, vocab_path, gin_text=gin_text)
  from unimoe_jax.data.vocabulary import get_vocabulary  # pylint: disable=g-import-not-at-top

  vocab = get_vocabulary(vocab_path)
  sp = vocab.sentencepiece.tokenizer
  tokens = [vocab.bos_id] + [int(t) for t in vocab.encode(text)]
  bad = [t for t in tokens if not 0 <= t < cfg.vocab_size]
  if bad:
    raise ValueError(
        f'token ids {bad} fall outside the model vocabulary ({cfg.vocab_size}); '
        'media placeholders need the media flags'
    )
  check_max_length(len(tokens), max_length, '--text (with BOS)')
  params, _ = read_checkpoint(checkpoint_dir)
  params = layer_stacking.to_config_layout(params, cfg)
  decoder_params = params['decoder'] if 'decoder' in params else params
  decoder_params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(x, cfg.weight_dtype), decoder_params
  )
  logprobs = token_logprobs(decoder_params, cfg, tokens)
  records = [{'token': tokens[0], 'piece': sp.id_to_piece(tokens[0])}]
  for token, logprob in zip(tokens[1:], logprobs):
    records.append({'token': token, 'piece': sp.id_to_piece(token), 'logprob': float(logprob)})
  return records


def add_media_flags(parser: argparse.ArgumentParser) -> None:
  """--image / --video / --speech (Whisper) / --audio (BEATs), each repeatable."""
  helps = {
      'image': 'image file',
      'video': 'video file',
      'speech': 'speech audio file (Whisper ' 'encoder)',
      'audio': 'audio file (BEATs encoder)',
  }
  for flag in _MEDIA_FLAGS:
    parser.add_argument(
        f'--{flag}', action='append', default=None, help=f'{helps[flag]}; repeat for several'
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  add_common_flags(parser)
  parser.add_argument('--text', required=True)
  add_media_flags(parser)
  args = parser.parse_args(argv)
  media = {f: getattr(args, f) for f in _MEDIA_FLAGS if getattr(args, f)}
  for record in score_text(
      args.checkpoint, args.text, args.vocab, args.dtype, media, args.max_length
  ):
    print(json.dumps(record, ensure_ascii=False))
  return 0


if __name__ == '__main__':
  sys.exit(main())
