"""Batched greedy / temperature (top-k, top-p) sampling and beam search over a KV cache.

The loops follow the interface of t5x's decoding.py (written anew): a callback

    tokens_to_logits(token [batch, 1] int32, cache, step) -> (logits [batch, vocab] or
                                                             [batch, 1, vocab], new cache)

runs one cached step (e.g. `Decoder.apply(..., decode=True, mutable=['cache'])`); `step` is the
scalar loop counter. Every loop is one `lax.while_loop`, so the whole decode jits.

Buffer convention (the same for all functions):
  inputs `[batch, length]` int32 holds each row's prompt at its start; `length` is the prompt
  plus room for the new tokens (values past the prompt are ignored). `initial_index` `[batch]`
  is the index of each row's LAST prompt token (prompt length - 1; default 0). The cache must
  hold the keys/values of positions `< initial_index`, i.e. the prompt prefilled with
  `prefill_lengths=initial_index` (t5x's decoder-only `predict_batch_with_aux` does the same
  with `inputs_lengths`). The first call feeds `inputs[b, initial_index[b]]`; token `t` of a
  row is written at `initial_index + 1 + t`. Rows with different prompt lengths advance
  together, each at its own position (per-row prompt lengths, no left padding).

Finished rows (EOS emitted, `max_decode_steps` tokens produced, or the buffer full) stop:
they write nothing more and their remaining positions hold `pad_id`. The returned sequences
contain the prompt, then the generated tokens (EOS included), then `pad_id`.

Differences from t5x: sequences keep the prompt and have no leading BOS slot; no teacher
forcing past `initial_index`; log-probabilities are those of the unmodified model distribution
(`log_softmax(logits)`), not of the temperature-scaled / truncated one.
"""

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from unimoe_jax.decoder import Decoder
from unimoe_jax.network import UniMoE

NEG_INF = -1.0e10
TokensToLogits = Callable[[jax.Array, Any, jax.Array], Tuple[jax.Array, Any]]


def _step_logits(tokens_to_logits, token, cache, step):
  logits, cache = tokens_to_logits(token, cache, step)
  return logits.reshape(token.shape[0], -1).astype(jnp.float32), cache


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the `k` largest logits of each row `[batch, vocab]` (ties at the k-th kept)."""
  threshold = jax.lax.top_k(logits, k)[0][:, -1:]
  return jnp.where(logits < threshold, NEG_INF, logits)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus: keeps the smallest set of most likely tokens whose probability reaches `p`.

  logits `[batch, vocab]`; the most likely token always stays (p = 0 keeps only it).
  """
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < p
  keep = keep.at[:, 0].set(True)
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, NEG_INF, logits)


def _prepare(inputs, initial_index, max_decode_steps, pad_id):
  batch, length = inputs.shape
  if initial_index is None:
    initial_index = jnp.zeros((batch,), jnp.int32)
  initial_index = jnp.asarray(initial_index, jnp.int32)
  positions = jnp.arange(length)[None, :]
  sequences = jnp.where(positions <= initial_index[:, None], inputs, pad_id).astype(jnp.int32)
  limit = length - 1 if max_decode_steps is None else min(int(max_decode_steps), length - 1)
  return sequences, initial_index, limit


def temperature_sample(
    inputs: jax.Array,
    cache: Any,
    tokens_to_logits: TokensToLogits,
    eos_id: int,
    *,
    decode_rng: Optional[jax.Array] = None,
    temperature: float = 1.0,
    topk: int = 0,
    topp: float = 0.0,
    initial_index: Optional[jax.Array] = None,
    max_decode_steps: Optional[int] = None,
    pad_id: int = 0,
) -> Tuple[jax.Array, jax.Array]:
  """Samples `[batch, length]` sequences (see the module docstring for the buffer layout).

  temperature 0 is greedy (argmax; `decode_rng` unused). topk > 0 keeps the k most likely
  tokens and topp > 0 the nucleus of mass topp (both may be set: top-k first); both act on the
  temperature-scaled logits. `temperature`, `topk`, `topp`, `eos_id`, `max_decode_steps` and
  `pad_id` are static.
  Returns:
    sequences `[batch, length]` int32 and the float32 sum of the generated tokens'
    log-probabilities `[batch]` (EOS included).
  """
  sequences, index0, limit = _prepare(inputs, initial_index, max_decode_steps, pad_id)
  batch, length = sequences.shape
  greedy = temperature == 0
  if decode_rng is None:
    if not greedy:
      raise ValueError('temperature_sample: sampling needs decode_rng')
    decode_rng = jax.random.PRNGKey(0)

  def choose(logits, rng):
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if topk:
      scaled = top_k_mask(scaled, topk)
    if topp:
      scaled = top_p_mask(scaled, topp)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

  def cond(state):
    step, _, _, _, _, ended, _, _ = state
    return (step < limit) & ~jnp.all(ended)

  def body(state):
    step, index, seqs, cache, token, ended, rng, log_prob = state
    rng, sample_rng = jax.random.split(rng)
    logits, cache = _step_logits(tokens_to_logits, token, cache, step)
    nxt = choose(logits, sample_rng)
    token_lp = jnp.take_along_axis(jax.nn.log_softmax(logits), nxt[:, None], axis=-1)[:, 0]
    log_prob = log_prob + jnp.where(ended, 0.0, token_lp)
    write = index + 1
    nxt = jnp.where(ended, pad_id, nxt)
    seqs = seqs.at[jnp.arange(batch), jnp.where(ended, length, write)].set(nxt, mode='drop')
    ended = ended | (nxt == eos_id) | (write >= length - 1)
    return step + 1, write, seqs, cache, nxt[:, None], ended, rng, log_prob

  token0 = jnp.take_along_axis(sequences, index0[:, None], axis=1)
  state = (
      jnp.zeros((), jnp.int32),
      index0,
      sequences,
      cache,
      token0,
      index0 >= length - 1,
      decode_rng,
      jnp.zeros((batch,), jnp.float32),
  )
  state = jax.lax.while_loop(cond, body, state)
  return state[2], state[7]


def greedy_decode(
    inputs: jax.Array, cache: Any, tokens_to_logits: TokensToLogits, eos_id: int, **kwargs
) -> Tuple[jax.Array, jax.Array]:
  """`temperature_sample` at temperature 0."""
  return temperature_sample(inputs, cache, tokens_to_logits, eos_id, temperature=0.0, **kwargs)


def brevity_penalty(alpha: float, length: jax.Array) -> jax.Array:
  """t5x's / GNMT's length penalty `((5 + length) / 6) ** alpha`."""
  return jnp.power((5.0 + length.astype(jnp.float32)) / 6.0, alpha)


def _gather(tree, indices):
  """Per batch row, picks beams: leaves `[batch * beams, ...]`, indices `[batch, n]` ->
  leaves `[batch * n, ...]`."""
  batch, n = indices.shape

  def pick(x):
    x = x.reshape((batch, -1) + x.shape[1:])
    return jnp.take_along_axis(
        x, indices.reshape((batch, n) + (1,) * (x.ndim - 2)), axis=1
    ).reshape((batch * n,) + x.shape[2:])

  return jax.tree_util.tree_map(pick, tree)


def beam_search(
    inputs: jax.Array,
    cache: Any,
    tokens_to_logits: TokensToLogits,
    eos_id: int,
    *,
    num_beams: int,
    alpha: float = 0.6,
    initial_index: Optional[jax.Array] = None,
    max_decode_steps: Optional[int] = None,
    pad_id: int = 0,
) -> Tuple[jax.Array, jax.Array]:
  """Beam search (buffer layout in the module docstring).

  `cache` is the batch's cache `[batch, ...]`; it is repeated for the beams here, and
  `tokens_to_logits` then sees `[batch * num_beams, 1]` tokens. A hypothesis' score is the
  sum of its generated tokens' log-probabilities (EOS included) divided by
  `brevity_penalty(alpha, length)` (alpha >= 0), length counting the prompt (as t5x).
  Hypotheses end at EOS or when they reach `max_decode_steps` tokens / the buffer end; the
  search stops when no live beam can beat the finished ones.
  Returns:
    sequences `[batch, num_beams, length]` and scores `[batch, num_beams]`, sorted by score
    in increasing order (best LAST, as t5x's beam_search).
  """
  sequences, index0, limit = _prepare(inputs, initial_index, max_decode_steps, pad_id)
  batch, length = sequences.shape
  k = num_beams
  expand = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731
  cache = jax.tree_util.tree_map(expand, cache)
  # The row's last position that a token may occupy.
  last = jnp.minimum(index0 + limit, length - 1)
  max_penalty = brevity_penalty(alpha, last + 1)

  def cond(state):
    step, _, _, live_lp, _, fin_scores = state
    best_live = live_lp[:, 0] / max_penalty
    # alpha >= 0: a live beam's score can only drop or be divided by at most max_penalty.
    done = jnp.all(jnp.min(fin_scores, axis=1) >= best_live)
    return (step < limit) & ~done & jnp.any(index0 + step < last)

  def body(state):
    step, live_seqs, cache, live_lp, fin_seqs, fin_scores = state
    write = index0 + step + 1  # [batch]
    tokens = jnp.take_along_axis(live_seqs, (write - 1)[:, None, None], axis=2)
    logits, cache = _step_logits(tokens_to_logits, tokens.reshape(batch * k, 1), cache, step)
    log_probs = jax.nn.log_softmax(logits).reshape(batch, k, -1)
    vocab = log_probs.shape[-1]
    cand = (live_lp[:, :, None] + log_probs).reshape(batch, k * vocab)
    cand_lp, cand_idx = jax.lax.top_k(cand, 2 * k)
    cand_beam, cand_tok = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(live_seqs, cand_beam[:, :, None], axis=1)
    cand_seqs = jax.vmap(lambda s, t, w: s.at[:, w].set(t))(cand_seqs, cand_tok, write)
    active = (write <= last)[:, None]  # [batch, 1]
    is_eos = cand_tok == eos_id
    # Finished: EOS, or the row's last position reached; inactive rows add nothing.
    ends = (is_eos | (write >= last)[:, None]) & active
    new_scores = jnp.where(ends, cand_lp / brevity_penalty(alpha, write + 1)[:, None], NEG_INF)
    all_seqs = jnp.concatenate([fin_seqs, cand_seqs], axis=1)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
    fin_scores, top = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(all_seqs, top[:, :, None], axis=1)
    # Live: the best k candidates that did not end; inactive rows keep their beams.
    live_cand = jnp.where(is_eos, NEG_INF, cand_lp)
    new_live_lp, pick = jax.lax.top_k(live_cand, k)
    beam_of_pick = jnp.take_along_axis(cand_beam, pick, axis=1)
    new_live_seqs = jnp.take_along_axis(cand_seqs, pick[:, :, None], axis=1)
    live_seqs = jnp.where(active[:, :, None], new_live_seqs, live_seqs)
    live_lp = jnp.where(active, new_live_lp, live_lp)
    cache = _gather(cache, jnp.where(active, beam_of_pick, jnp.arange(k)[None, :]))
    return step + 1, live_seqs, cache, live_lp, fin_seqs, fin_scores

  live_seqs = jnp.repeat(sequences[:, None], k, axis=1)
  # Only the first beam is live at first, so the k beams do not start as copies.
  live_lp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  fin_scores = jnp.full((batch, k), NEG_INF, jnp.float32)
  state = (jnp.zeros((), jnp.int32), live_seqs, cache, live_lp, live_seqs, fin_scores)
  _, live_seqs, _, live_lp, fin_seqs, fin_scores = jax.lax.while_loop(cond, body, state)
  del live_seqs, live_lp  # Live beams that reached `last` were already moved to finished.
  order = jnp.argsort(fin_scores, axis=1)
  return (
      jnp.take_along_axis(fin_seqs, order[:, :, None], axis=1),
      jnp.take_along_axis(fin_scores, order, axis=1),
  )


def decoder_tokens_to_logits(decoder, params) -> TokensToLogits:
  """The `tokens_to_logits` callback of a `Decoder` with params (unboxed 'params' tree)."""

  def tokens_to_logits(token, cache, step):
    del step  # The cache holds each row's position.
    (logits, _), variables = decoder.apply(
        {'params': params, 'cache': cache}, token, decode=True, mutable=['cache']
    )
    return logits[:, 0], variables['cache']

  return tokens_to_logits


def prefill_cache(
    decoder,
    params,
    prompt: Optional[jax.Array],
    prompt_lengths: jax.Array,
    max_length: int,
    embeddings: Optional[jax.Array] = None,
) -> Tuple[Any, jax.Array]:
  """Fills a fresh cache with all but the last token of each row's prompt.

  Args:
    decoder, params: a `Decoder` and its unboxed params.
    prompt: `[batch, prompt_len]` right-padded prompt tokens, or None with `embeddings`
      `[batch, prompt_len, embed]` (media spliced in).
    prompt_lengths: `[batch]` int, >= 1.
    max_length: the cache length (the decode buffer's length).
  Returns:
    the cache and `initial_index` `[batch]` (= prompt_lengths - 1) for the decoding loops.
  """
  batch = (prompt if prompt is not None else embeddings).shape[0]
  initial_index = jnp.asarray(prompt_lengths, jnp.int32) - 1
  cache = decoder.init_cache(batch, max_length)
  _, variables = decoder.apply(
      {'params': params, 'cache': cache},
      prompt,
      embeddings=embeddings,
      prefill=True,
      prefill_lengths=initial_index,
      mutable=['cache'],
  )
  return variables['cache'], initial_index


# ----------------------------------------------------------------------------------------------
# The multimodal model: media soft tokens spliced into the prompt, then the decoder's cache.

GENERATE_METHODS = ('greedy', 'sample', 'beam')


def prefill_multimodal(
    model, params, batch, prompt_lengths: jax.Array, max_length: int
) -> Tuple[Any, jax.Array]:
  """Embeds a multimodal prompt (media spliced in) and prefills the decoder's cache with it.

  Args:
    model: a `UniMoE` (unimoe_jax.network).
    params: its unboxed params (`{'decoder': ..., 'vision_tower': ..., ...}`).
    batch: the project's batch format: `decoder_input_tokens` `[batch, length]` holds each
      row's prompt (placeholders expanded to `num_soft_tokens(m)` ids) right-padded, plus
      `<m>_features` / `<m>_mask` of its media.
    prompt_lengths: `[batch]` int, >= 1. The last prompt token of each row is fed as the first
      decoding step through the token embedding, so it must be a text token, not a
      placeholder (a Vicuna prompt ends with "ASSISTANT:").
    max_length: the cache length, >= length (the decode buffer's length).
  Returns:
    the decoder cache and `initial_index` `[batch]` (= prompt_lengths - 1).
  """
  length = batch['decoder_input_tokens'].shape[1]
  if max_length < length:
    raise ValueError(
        f'prefill_multimodal: max_length={max_length} is shorter than the '
        f'prompt buffer ({length})'
    )
  embeddings = model.apply({'params': params}, batch, method=UniMoE.embed)
  return prefill_cache(
      Decoder(model.config.decoder),
      params['decoder'],
      None,
      prompt_lengths,
      max_length,
      embeddings=embeddings,
  )


def generate(
    model,
    params,
    batch,
    prompt_lengths: jax.Array,
    *,
    max_decode_steps: int,
    eos_id: int,
    pad_id: int = 0,
    method: str = 'greedy',
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 4,
    alpha: float = 0.6,
    rng: Optional[jax.Array] = None,
    all_beams: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """Decodes continuations of multimodal prompts with a `UniMoE`.

  `batch['decoder_input_tokens']` `[batch, length]` is the decode buffer: each row's prompt
  (see `prefill_multimodal`) at its start, room for the new tokens after it; at most
  `max_decode_steps` tokens (and never past `length`) are produced per row. Every argument
  but `params`, `batch`, `prompt_lengths` and `rng` is static, so
  `jax.jit(functools.partial(generate, model, **static))` compiles once per batch shape.

  Args:
    method: 'greedy'; 'sample' (temperature, then top_k > 0 and top_p < 1 truncation; needs
      `rng`); 'beam' (num_beams, brevity penalty alpha).
  Returns:
    sequences `[batch, length]` int32 (prompt, generated tokens up to and including EOS, then
    `pad_id`) and scores `[batch]` float32: the summed log-probabilities of the generated
    tokens (greedy / sample), or the best beam's length-normalised score (beam). With
    `all_beams` (beam search only) every beam: `[batch, num_beams, length]` and
    `[batch, num_beams]`, in increasing order of score (the best last).
  """
  if method not in GENERATE_METHODS:
    raise ValueError(f'generate: method must be one of {GENERATE_METHODS}, got {method!r}')
  if max_decode_steps < 1:
    raise ValueError(f'generate: max_decode_steps must be >= 1, got {max_decode_steps}')
  if method == 'beam' and num_beams < 1:
    raise ValueError(f'generate: num_beams must be >= 1, got {num_beams}')
  if method == 'sample':
    vocab_size = model.config.decoder.vocab_size
    if not 0 <= top_k <= vocab_size:
      raise ValueError(f'generate: top_k must be in [0, {vocab_size}] (0: off), got {top_k}')
    if not 0 < top_p <= 1:
      raise ValueError(f'generate: top_p must be in (0, 1] (1: off), got {top_p}')
  inputs = jnp.asarray(batch['decoder_input_tokens'], jnp.int32)
  cache, initial_index = prefill_multimodal(model, params, batch, prompt_lengths, inputs.shape[1])
  tokens_to_logits = decoder_tokens_to_logits(Decoder(model.config.decoder), params['decoder'])
  common = dict(initial_index=initial_index, max_decode_steps=max_decode_steps, pad_id=pad_id)
  if method == 'beam':
    seqs, scores = beam_search(
        inputs, cache, tokens_to_logits, eos_id, num_beams=num_beams, alpha=alpha, **common
    )
    return (seqs, scores) if all_beams else (seqs[:, -1], scores[:, -1])
  if all_beams:
    raise ValueError(f"generate: all_beams needs method='beam', got {method!r}")
  if method == 'greedy':
    return greedy_decode(inputs, cache, tokens_to_logits, eos_id, **common)
  if temperature <= 0:
    raise ValueError(f"generate: method='sample' needs temperature > 0, got {temperature}")
  if rng is None:
    raise ValueError("generate: method='sample' needs rng")
  return temperature_sample(
      inputs,
      cache,
      tokens_to_logits,
      eos_id,
      decode_rng=rng,
      temperature=temperature,
      topk=top_k,
      topp=top_p if top_p < 1.0 else 0.0,
      **common,
  )
