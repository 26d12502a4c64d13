r"""Scores a text under a converted checkpoint: the log-probability of each token.

    python -m unimoe_jax.score --checkpoint /out/vicuna --text "The cat sat on the mat."

prints one JSON line per token, `{"token": id, "piece": str, "logprob": float}`, where logprob
is `log p(token | the tokens before it)`; the first line is BOS, without a logprob. The
vocabulary is `--vocab` or the checkpoint's `tokenizer.model`. Computation is float32 unless
`--dtype` says otherwise.
"""

import argparse
import dataclasses
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import checkpoint
from unimoe_jax.config import DecoderConfig
from unimoe_jax.decoder import Decoder

_MEDIA_FLAGS = ('image', 'audio', 'speech', 'video')


@gin.configurable('unimoe_score_decoder_config')
def _decoder_config(decoder: DecoderConfig = gin.REQUIRED) -> DecoderConfig:
  return decoder


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


def token_logprobs(params: Dict[str, Any], cfg: DecoderConfig, tokens: Sequence[int]
                   ) -> np.ndarray:
  """tokens `[length]` -> float32 `[length - 1]`: log p(tokens[i + 1] | tokens[:i + 1])."""
  ids = jnp.asarray(np.asarray(tokens, np.int32)[None])
  logits, _ = Decoder(cfg).apply({'params': params}, ids)
  logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
  return np.asarray(jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1)[:, 0])


def score_text(checkpoint_dir: str, text: str, vocab_path: Optional[str] = None,
               dtype: str = 'float32') -> List[Dict[str, Any]]:
  """One record per token of BOS + `text` (see the module docstring)."""
  from unimoe_jax.data.vocabulary import get_vocabulary  # pylint: disable=g-import-not-at-top
  params, gin_text = checkpoint.restore(checkpoint_dir)
  cfg = dataclasses.replace(decoder_config_from_gin(gin_text), dtype=dtype, param_dtype=dtype)
  vocab_path = vocab_path or checkpoint.tokenizer_path(checkpoint_dir)
  if vocab_path is None:
    raise FileNotFoundError(f'{checkpoint_dir} has no {checkpoint.TOKENIZER_FILE}; pass --vocab')
  vocab = get_vocabulary(vocab_path)
  sp = vocab.sentencepiece.tokenizer
  tokens = [vocab.bos_id] + [int(t) for t in vocab.encode(text)]
  bad = [t for t in tokens if not 0 <= t < cfg.vocab_size]
  if bad:
    raise ValueError(f'token ids {bad} fall outside the model vocabulary ({cfg.vocab_size}); '
                     'media placeholders need the media flags')
  decoder_params = params['decoder'] if 'decoder' in params else params
  decoder_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, cfg.weight_dtype),
                                          decoder_params)
  logprobs = token_logprobs(decoder_params, cfg, tokens)
  records = [{'token': tokens[0], 'piece': sp.id_to_piece(tokens[0])}]
  for token, logprob in zip(tokens[1:], logprobs):
    records.append({'token': token, 'piece': sp.id_to_piece(token), 'logprob': float(logprob)})
  return records


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='directory written by '
                      'tools/convert_checkpoint.py')
  parser.add_argument('--text', required=True)
  parser.add_argument('--vocab', default=None, help="SentencePiece model; default the "
                      "checkpoint's tokenizer.model")
  parser.add_argument('--dtype', default='float32', help='compute dtype')
  for flag in _MEDIA_FLAGS:
    parser.add_argument(f'--{flag}', default=None, help=f'{flag} file (not supported yet)')
  args = parser.parse_args(argv)
  media = [f'--{f}' for f in _MEDIA_FLAGS if getattr(args, f)]
  if media:
    raise NotImplementedError(f'score: {", ".join(media)} not supported yet: only text is '
                              'scored for now (media need the encoders and the preprocessing '
                              'of unimoe_jax.media wired in)')
  for record in score_text(args.checkpoint, args.text, args.vocab, args.dtype):
    print(json.dumps(record, ensure_ascii=False))
  return 0


if __name__ == '__main__':
  sys.exit(main())
