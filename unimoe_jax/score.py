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


def restore_model(checkpoint_dir: str, dtype: str = 'float32'
                  ) -> Tuple[UniMoEConfig, Dict[str, Any]]:
  """(model config, params as jax arrays in `dtype`) of a checkpoint directory; a text-only
  checkpoint's params (decoder only, with or without the 'decoder' level) come back as
  `{'decoder': ...}`, the tree `UniMoE(config)` expects."""
  params, gin_text = checkpoint.restore(checkpoint_dir)
  cfg = with_dtype(model_config_from_gin(gin_text), dtype)
  if 'decoder' not in params:
    params = {'decoder': params}
  params = layer_stacking.to_config_layout(params, cfg.decoder)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, cfg.decoder.weight_dtype), params)
  return cfg, params


def token_logprobs(params: Dict[str, Any], cfg: DecoderConfig, tokens: Sequence[int]
                   ) -> np.ndarray:
  """tokens `[length]` -> float32 `[length - 1]`: log p(tokens[i + 1] | tokens[:i + 1])."""
  ids = jnp.asarray(np.asarray(tokens, np.int32)[None])
  logits, _ = Decoder(cfg).apply({'params': params}, ids)
  logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
  return np.asarray(jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1)[:, 0])


def multimodal_token_logprobs(params: Dict[str, Any], cfg: UniMoEConfig,
                              batch: Mapping[str, Any]) -> np.ndarray:
  """A one-row batch -> float32 `[length - 1]`: log p(token[i + 1] | everything before it),
  media spliced in (entries at placeholder positions are meaningless: not scored)."""
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  logits, _ = UniMoE(cfg).apply({'params': params}, batch)
  ids = batch['decoder_input_tokens']
  logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
  targets = jnp.clip(ids[0, 1:], 0, cfg.decoder.vocab_size - 1)
  return np.asarray(jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0])


def score_multimodal(checkpoint_dir: str, text: str, media: Mapping[str, Sequence[str]],
                     vocab_path: Optional[str] = None, dtype: str = 'float32'
                     ) -> List[Dict[str, Any]]:
  """Records of BOS and every text token of `text` after `media` (module docstring)."""
  from unimoe_jax import prompting  # pylint: disable=g-import-not-at-top
  cfg, params = restore_model(checkpoint_dir, dtype)
  vocab_path = vocab_path or checkpoint.tokenizer_path(checkpoint_dir)
  if vocab_path is None:
    raise FileNotFoundError(f'{checkpoint_dir} has no {checkpoint.TOKENIZER_FILE}; pass --vocab')
  tokenizer = prompting.PromptTokenizer(vocab_path, cfg)
  prompt = prompting.build_prompt(text, media, cfg, tokenizer, template=False)
  logprobs = multimodal_token_logprobs(params, cfg, prompt.batch)
  ids = [int(t) for t in prompt.batch['decoder_input_tokens'][0]]
  records = [{'token': ids[0], 'piece': tokenizer.piece(ids[0])}]
  for i in prompting.text_positions(ids, tokenizer)[1:]:
    records.append({'token': ids[i], 'piece': tokenizer.piece(ids[i]),
                    'logprob': float(logprobs[i - 1])})
  return records


def score_text(checkpoint_dir: str, text: str, vocab_path: Optional[str] = None,
               dtype: str = 'float32', media: Optional[Mapping[str, Sequence[str]]] = None
               ) -> List[Dict[str, Any]]:
  """One record per token of BOS + `text` (see the module docstring); with `media`
  (modality -> paths) those of `score_multimodal`."""
  if media and any(media.values()):
    return score_multimodal(checkpoint_dir, text, media, vocab_path, dtype)
  from unimoe_jax.data.vocabulary import get_vocabulary  # pylint: disable=g-import-not-at-top
  params, gin_text = checkpoint.restore(checkpoint_dir)
  cfg = decoder_with_dtype(decoder_config_from_gin(gin_text), dtype)
  params = layer_stacking.to_config_layout(params, cfg)
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


def add_media_flags(parser: argparse.ArgumentParser) -> None:
  """--image / --video / --speech (Whisper) / --audio (BEATs), each repeatable."""
  helps = {'image': 'image file', 'video': 'video file', 'speech': 'speech audio file (Whisper '
           'encoder)', 'audio': 'audio file (BEATs encoder)'}
  for flag in _MEDIA_FLAGS:
    parser.add_argument(f'--{flag}', action='append', default=None,
                        help=f'{helps[flag]}; repeat for several')


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='directory written by '
                      'tools/convert_checkpoint.py')
  parser.add_argument('--text', required=True)
  parser.add_argument('--vocab', default=None, help="SentencePiece model; default the "
                      "checkpoint's tokenizer.model")
  parser.add_argument('--dtype', default='float32', help='compute dtype')
  add_media_flags(parser)
  args = parser.parse_args(argv)
  media = {f: getattr(args, f) for f in _MEDIA_FLAGS if getattr(args, f)}
  for record in score_text(args.checkpoint, args.text, args.vocab, args.dtype, media):
    print(json.dumps(record, ensure_ascii=False))
  return 0


if __name__ == '__main__':
  sys.exit(main())
