"""Token log-probabilities of a text under a checkpoint, with or without media.

`score_text` returns one record per token, `{"token": id, "piece": str, "logprob": float}`,
where logprob is `log p(token | the tokens before it)`; the first record is BOS, without a
logprob. The vocabulary is `vocab_path` or the checkpoint's `tokenizer.model`. Computation is
float32 unless `dtype` says otherwise.

With media (modality -> paths: `image`, `video`, `speech` to Whisper, `audio` to BEATs) the text
is scored raw (no chat template) after the media: the text may hold placeholders (`<image>` ...)
where the media go, else one "<m>\n" line per file is put in front (`serving/prompting.py`).
Only text tokens get a record: each placeholder stands for `num_soft_tokens(m)` soft tokens per
item (a speech / audio file longer than 30 s is several items, cut as official inference cuts
it) that the model computes from the media, which are not predicted and are not scored, but
every text token after them is conditioned on them. Errors name the command-line flag
(`python -m unimoe_jax.score`) of the argument at fault.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import checkpoints
from unimoe_jax import layer_stacking
from unimoe_jax.config import DecoderConfig
from unimoe_jax.decoder import Decoder
from unimoe_jax.network import UniMoE, UniMoEConfig

# Compute dtypes --dtype accepts.
DTYPES = ('float32', 'bfloat16', 'float16')
# The longest sequence (prompt, media soft tokens included, + generated tokens) --max_length
# allows by default: the 2048-token context of the LLaMA / Vicuna decoders the released
# checkpoints start from (their model_max_length). The decode buffer and its key/value cache
# are allocated at this length, so it bounds memory.
DEFAULT_MAX_LENGTH = 2048


def check_dtype(dtype: str) -> None:
  """Refuses a compute dtype outside `DTYPES`, naming --dtype."""
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {DTYPES}, got {dtype!r}')


def check_max_length(length: int, max_length: int, what: str) -> None:
  """Refuses a sequence longer than `max_length`, naming --max_length."""
  if length > max_length:
    raise ValueError(
        f'{what} is {length} tokens, more than --max_length={max_length}; shorten '
        'it or raise --max_length (memory grows with it)'
    )


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
  from unimoe_jax.serving import prompting  # pylint: disable=g-import-not-at-top

  gin_text = checkpoints.checkpoint_gin_text(checkpoint_dir)
  vocab_path = checkpoints.find_vocab(checkpoint_dir, vocab_path, gin_text=gin_text)
  cfg = checkpoints.with_dtype(checkpoints.model_config_from_gin(gin_text), dtype)
  tokenizer = prompting.PromptTokenizer(vocab_path, cfg)
  prompt = prompting.build_prompt(text, media, cfg, tokenizer, template=False)
  check_max_length(prompt.length, max_length, 'the text with its media soft tokens')
  cfg, params = checkpoints.restore_model(checkpoint_dir, dtype)
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
  check_dtype(dtype)
  if max_length < 1:
    raise ValueError(f'--max_length must be >= 1, got {max_length}')
  if media and any(media.values()):
    return score_multimodal(checkpoint_dir, text, media, vocab_path, dtype, max_length)
  gin_text = checkpoints.checkpoint_gin_text(checkpoint_dir)
  cfg = checkpoints.decoder_with_dtype(checkpoints.decoder_config_from_gin(gin_text), dtype)
  vocab_path = checkpoints.find_vocab(checkpoint_dir, vocab_path, gin_text=gin_text)
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
  params, _ = checkpoints.read_checkpoint(checkpoint_dir)
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
