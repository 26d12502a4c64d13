"""KV-cache decoding: greedy parity with transformers' generate, cache vs recompute, sampling
masks, beam search scores, EOS."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax import decoding
from unimoe_jax.config import MoEConfig
from unimoe_jax.convert import hf as convert_hf
from unimoe_jax.decoder import Decoder

import hf_reference
from tiny_models import random_params

NEW_TOKENS = 20
NO_EOS = 10_000  # An id outside the vocabulary: nothing ends early.


def _ours(hf_model, hf_config, **overrides):
  cfg = convert_hf.config_from_hf(hf_config.to_dict(), dtype='float32', **overrides)
  params = convert_hf.decoder_params_from_hf(hf_reference.state_dict_numpy(hf_model), cfg)
  return Decoder(cfg), jax.tree_util.tree_map(jnp.asarray, params)


@functools.lru_cache(maxsize=None)
def _llama():
  hf_model, hf_config = hf_reference.tiny_llama()
  return (hf_model,) + _ours(hf_model, hf_config)


def _prompts(lengths=(7, 4), vocab=97, seed=3):
  rng = np.random.RandomState(seed)
  return [rng.randint(3, vocab, size=n).astype(np.int32) for n in lengths]


def _buffer(prompts, new_tokens=NEW_TOKENS):
  length = max(len(p) for p in prompts) + new_tokens
  buf = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    buf[i, : len(p)] = p
  return jnp.asarray(buf), jnp.asarray([len(p) for p in prompts], jnp.int32)


def _cached_decode(
    model, params, prompts, fn=decoding.greedy_decode, new_tokens=NEW_TOKENS, **kwargs
):
  inputs, lengths = _buffer(prompts, new_tokens)
  prompt = inputs[:, : max(len(p) for p in prompts)]

  @jax.jit
  def run(params, inputs, prompt, lengths):
    cache, index = decoding.prefill_cache(model, params, prompt, lengths, inputs.shape[1])
    return fn(
        inputs,
        cache,
        decoding.decoder_tokens_to_logits(model, params),
        initial_index=index,
        max_decode_steps=new_tokens,
        **kwargs,
    )

  return run(params, inputs, prompt, lengths)


def _greedy_without_cache(model, params, prompt, steps):
  """Recomputes the whole sequence each step (no cache). The sequence sits right-padded in a
  fixed-length buffer so that one compiled forward serves every step (causal: the padding
  after position n - 1 does not change its logits)."""
  forward = _forward(model)
  buf = np.zeros((1, len(prompt) + steps), np.int32)
  buf[0, : len(prompt)] = prompt
  for n in range(len(prompt), len(prompt) + steps):
    buf[0, n] = int(jnp.argmax(forward(params, jnp.asarray(buf))[0, n - 1]))
  return buf[0].tolist()


def _row(seq, prompt_len, steps):
  return [int(t) for t in np.asarray(seq)[: prompt_len + steps]]


def test_greedy_matches_transformers_generate_and_no_cache():
  torch, _ = hf_reference.torch_and_transformers()
  hf_model, model, params = _llama()
  prompts = _prompts()
  seqs, _ = _cached_decode(model, params, prompts, eos_id=NO_EOS)
  for i, p in enumerate(prompts):
    with torch.no_grad():
      hf = hf_model.generate(
          torch.tensor(p[None], dtype=torch.long),
          do_sample=False,
          max_new_tokens=NEW_TOKENS,
          min_new_tokens=NEW_TOKENS,
          eos_token_id=None,
          pad_token_id=0,
      )[0].tolist()
    assert len(hf) == len(p) + NEW_TOKENS
    ours = _row(seqs[i], len(p), NEW_TOKENS)
    assert ours == hf, (i, ours, hf)
    assert ours == _greedy_without_cache(model, params, p, NEW_TOKENS)
  # The two rows really decoded different continuations (per-row positions matter).
  assert _row(seqs[0], 7, 5)[7:] != _row(seqs[1], 4, 5)[4:]


def test_prefill_then_one_step_equals_full_forward():
  _, model, params = _llama()
  tokens = jnp.asarray(np.stack([np.concatenate([p, p[:3]]) for p in _prompts((9, 9))]))
  # Each apply jitted: op by op they compiled ~210 small programs.
  full = _forward(model)(params, tokens)
  cache = model.init_cache(2, 16)
  # Row 1 prefills 5 real tokens of 8 (the rest is padding that must be ignored).
  lengths = jnp.asarray([8, 5], jnp.int32)
  prefix = tokens[:, :8].at[1, 5:].set(0)
  (pre, _), v = jax.jit(
      lambda p, c, x, n: model.apply(
          {'params': p, 'cache': c}, x, prefill=True, prefill_lengths=n, mutable=['cache']
      )
  )(params, cache, prefix, lengths)
  np.testing.assert_allclose(pre[0], full[0, :8], atol=1e-5, rtol=0)
  step_tokens = jnp.stack([tokens[0, 8], tokens[1, 5]])[:, None]
  (step, _), _ = jax.jit(
      lambda p, c, x: model.apply({'params': p, 'cache': c}, x, decode=True, mutable=['cache'])
  )(params, v['cache'], step_tokens)
  np.testing.assert_allclose(step[0, 0], full[0, 8], atol=1e-5, rtol=0)
  np.testing.assert_allclose(step[1, 0], full[1, 5], atol=1e-5, rtol=0)
  assert float(jnp.abs(full[1, 5] - full[1, 8]).max()) > 1e-2  # Positions are distinguishable.


@pytest.mark.slow
def test_prefill_accepts_embeddings():
  _, model, params = _llama()
  prompts = _prompts()
  inputs, lengths = _buffer(prompts, 4)
  prompt = inputs[:, :7]
  emb = model.apply({'params': params}, prompt, method=Decoder.embed)
  fn = decoding.decoder_tokens_to_logits(model, params)
  outs = []
  for kwargs in ({'prompt': prompt}, {'prompt': None, 'embeddings': emb}):
    cache, index = decoding.prefill_cache(
        model, params, prompt_lengths=lengths, max_length=inputs.shape[1], **kwargs
    )
    outs.append(decoding.greedy_decode(inputs, cache, fn, NO_EOS, initial_index=index)[0])
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0][:, 7:], 0)


@pytest.mark.slow
def test_mixtral_cached_decode_equals_recompute():
  hf_model, hf_config = hf_reference.tiny_mixtral()
  model, params = _ours(
      hf_model, hf_config, moe=MoEConfig(num_experts=4, num_experts_per_tok=2, dispatch='dropless')
  )
  prompts = _prompts((6, 3))
  seqs, _ = _cached_decode(model, params, prompts, new_tokens=8, eos_id=NO_EOS)
  for i, p in enumerate(prompts):
    assert _row(seqs[i], len(p), 8) == _greedy_without_cache(model, params, p, 8)


def test_sampling_top_k_1_equals_greedy():
  _, model, params = _llama()
  prompts = _prompts()
  greedy, _ = _cached_decode(model, params, prompts, eos_id=NO_EOS, new_tokens=8)
  sample = functools.partial(
      _cached_decode,
      model,
      params,
      prompts,
      fn=decoding.temperature_sample,
      eos_id=NO_EOS,
      new_tokens=8,
      decode_rng=jax.random.PRNGKey(7),
  )
  sampled, _ = sample(topk=1, temperature=1.5)
  np.testing.assert_array_equal(greedy, sampled)
  free, _ = sample(temperature=3.0)
  assert not np.array_equal(free, greedy)  # Without top-k the sampler does sample.


def test_top_p_keeps_the_smallest_nucleus():
  probs = np.array([[0.05, 0.4, 0.1, 0.3, 0.15]])
  logits = jnp.log(jnp.asarray(probs))
  kept = lambda p: np.asarray(decoding.top_p_mask(logits, p)[0] > decoding.NEG_INF / 2)  # noqa
  np.testing.assert_array_equal(kept(0.39), [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(kept(0.5), [0, 1, 0, 1, 0])
  np.testing.assert_array_equal(kept(0.7), [0, 1, 0, 1, 0])
  np.testing.assert_array_equal(kept(0.71), [0, 1, 0, 1, 1])
  np.testing.assert_array_equal(kept(0.9), [0, 1, 1, 1, 1])
  np.testing.assert_array_equal(kept(0.0), [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(
      np.asarray(decoding.top_k_mask(logits, 2)[0] > -1e9), [0, 1, 0, 1, 0]
  )


def test_beam_1_equals_greedy():
  _, model, params = _llama()
  prompts = _prompts()
  greedy, _ = _cached_decode(model, params, prompts, eos_id=NO_EOS, new_tokens=10)
  beams, _ = _cached_decode(
      model, params, prompts, fn=decoding.beam_search, eos_id=NO_EOS, new_tokens=10, num_beams=1
  )
  np.testing.assert_array_equal(beams[:, 0], greedy)


def _sequence_log_prob(model, params, seq, prompt_len, eos_id):
  """Sum of the generated tokens' log-probs (up to and including EOS) by a full forward of
  the whole (fixed-length, so compiled once) sequence; causal, so tokens after EOS do not
  matter."""
  seq = [int(t) for t in seq]
  end = len(seq)
  for j in range(prompt_len, len(seq)):
    if seq[j] == eos_id:
      end = j + 1
      break
  lp = jax.nn.log_softmax(_forward(model)(params, jnp.asarray([seq], jnp.int32))[0])
  return sum(float(lp[j - 1, seq[j]]) for j in range(prompt_len, end)), end


@functools.lru_cache(maxsize=None)
def _forward(model):
  return jax.jit(lambda p, t: model.apply({'params': p}, t)[0])


@pytest.mark.slow
def test_beam_4_scores_are_sorted_and_recomputable():
  _, model, params = _llama()
  prompts = _prompts()
  new, alpha = 6, 0.6
  # An EOS id that beams actually produce, so that some hypotheses end early.
  greedy, _ = _cached_decode(model, params, prompts, eos_id=NO_EOS, new_tokens=new)
  eos = int(greedy[1, len(prompts[1]) + 2])
  seqs, scores = _cached_decode(
      model,
      params,
      prompts,
      fn=decoding.beam_search,
      eos_id=eos,
      new_tokens=new,
      num_beams=4,
      alpha=alpha,
  )
  assert seqs.shape == (2, 4, greedy.shape[1])
  assert bool(jnp.all(jnp.diff(scores, axis=1) >= 0)), scores
  saw_early_end = False
  for i, p in enumerate(prompts):
    for b in range(4):
      lp, end = _sequence_log_prob(model, params, seqs[i, b, : len(p) + new], len(p), eos)
      saw_early_end |= end < len(p) + new
      expected = lp / float(decoding.brevity_penalty(alpha, jnp.asarray(end)))
      np.testing.assert_allclose(float(scores[i, b]), expected, atol=1e-4, rtol=1e-5)
      assert np.all(np.asarray(seqs[i, b, end:]) == 0)  # Padded after EOS.
    assert len({tuple(np.asarray(s).tolist()) for s in seqs[i]}) == 4  # Distinct beams.
  assert saw_early_end
  # The best beam is at least as good as greedy under the same score.
  for i, p in enumerate(prompts):
    glp, gend = _sequence_log_prob(model, params, greedy[i, : len(p) + new], len(p), eos)
    gscore = glp / float(decoding.brevity_penalty(alpha, jnp.asarray(gend)))
    assert float(scores[i, -1]) >= gscore - 1e-5


def test_eos_stops_a_row():
  _, model, params = _llama()
  prompts = _prompts()
  free, _ = _cached_decode(model, params, prompts, eos_id=NO_EOS, new_tokens=10)
  eos = int(free[0, len(prompts[0]) + 3])  # Row 0's 4th new token.
  seqs, _ = _cached_decode(model, params, prompts, eos_id=eos, new_tokens=10)
  cut = len(prompts[0]) + 4
  np.testing.assert_array_equal(seqs[0, :cut], free[0, :cut])
  assert np.all(np.asarray(seqs[0, cut:]) == 0)
  # Row 1 runs until its own EOS (or the end) and is unaffected before it.
  row1 = np.asarray(free[1])
  hits = [j for j in range(len(prompts[1]), len(prompts[1]) + 10) if row1[j] == eos]
  stop = (hits[0] + 1) if hits else len(prompts[1]) + 10
  np.testing.assert_array_equal(seqs[1, :stop], free[1, :stop])
  assert np.all(np.asarray(seqs[1, stop:]) == 0)


def test_remat_config_decodes_the_same():
  import dataclasses

  hf_model, model, params = _llama()
  remat = Decoder(dataclasses.replace(model.config, remat='full'))
  prompts = _prompts()
  a, _ = _cached_decode(model, params, prompts, eos_id=NO_EOS, new_tokens=4)
  b, _ = _cached_decode(remat, params, prompts, eos_id=NO_EOS, new_tokens=4)
  np.testing.assert_array_equal(a, b)


def test_decode_rejects_positions():
  _, model, params = _llama()
  cache = model.init_cache(1, 8)
  with pytest.raises(ValueError, match='positions'):
    model.apply(
        {'params': params, 'cache': cache},
        jnp.zeros((1, 1), jnp.int32),
        decode=True,
        positions=jnp.zeros((1, 1), jnp.int32),
        mutable=['cache'],
    )


# ---------------------------------------------------------------------------------------------
# The multimodal model: generate() over a UniMoE with an image tower.

MM_STEPS = 8


@functools.lru_cache(maxsize=None)
def _tiny_unimoe():
  from generate_test import tiny_unimoe_config  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoE  # pylint: disable=g-import-not-at-top

  cfg = tiny_unimoe_config()  # A 2-layer decoder and a 2-layer CLIP tower on 32 px images.
  model = UniMoE(cfg)
  batch = _mm_batch(cfg, [[5, 6], [7]], np.random.RandomState(0))
  # Drawn, not initialised (an init run op by op compiled ~190 small programs); larger than the
  # init's, so that logits (and greedy choices) are far apart.
  params = random_params(model, batch, scale=0.15, seed=2)
  return model, jax.tree_util.tree_map(jnp.asarray, params)


def _mm_batch(cfg, texts_after, rng, steps=MM_STEPS):
  """Rows of BOS, 3 text ids, the image's placeholders, then `texts_after`; one image each."""
  n = cfg.num_soft_tokens('image')
  prompts = [[1, 11, 12, 13] + [cfg.image_token_id] * n + list(t) for t in texts_after]
  length = max(map(len, prompts)) + steps
  tokens = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  size = cfg.vision.image_size
  return {
      'decoder_input_tokens': jnp.asarray(tokens),
      'image_features': jnp.asarray(rng.randn(len(prompts), 1, size, size, 3), jnp.float32),
      'image_mask': jnp.ones((len(prompts), 1), bool),
      'prompt_lengths': jnp.asarray([len(p) for p in prompts], jnp.int32),
  }


def _mm_generate(model, params, batch, rng=None, **kwargs):
  lengths = batch['prompt_lengths']
  batch = {k: v for k, v in batch.items() if k != 'prompt_lengths'}
  return _jitted_generate(model, tuple(sorted(kwargs.items())))(params, batch, lengths, rng)


@functools.lru_cache(maxsize=None)
def _jitted_generate(model, kwargs):
  return jax.jit(lambda p, b, n, rng: decoding.generate(model, p, b, n, rng=rng, **dict(kwargs)))


def test_generate_multimodal_greedy_equals_argmax_loop_without_cache():
  model, params = _tiny_unimoe()
  batch = _mm_batch(model.config, [[21, 22], [23]], np.random.RandomState(5))
  seqs, scores = _mm_generate(model, params, batch, max_decode_steps=MM_STEPS, eos_id=NO_EOS)
  forward = jax.jit(lambda p, b: model.apply({'params': p}, b)[0])
  media = {k: v for k, v in batch.items() if k.startswith('image_')}
  expected = np.array(batch['decoder_input_tokens'])
  lengths = np.asarray(batch['prompt_lengths'])
  log_probs = np.zeros(len(lengths))
  for step in range(MM_STEPS):
    logits = forward(params, {'decoder_input_tokens': jnp.asarray(expected), **media})
    for row, n in enumerate(lengths):
      row_logits = logits[row, n + step - 1]
      expected[row, n + step] = int(jnp.argmax(row_logits))
      log_probs[row] += float(jax.nn.log_softmax(row_logits)[expected[row, n + step]])
  np.testing.assert_array_equal(np.asarray(seqs), expected)
  np.testing.assert_allclose(np.asarray(scores), log_probs, atol=1e-4, rtol=1e-5)
  # Non-trivial continuations: not one token repeated.
  assert len(set(expected[0, lengths[0] :].tolist())) > 1
  # The image matters: another image changes the logits at the prompt's last position and
  # the first generated tokens of at least one row.
  other = dict(batch, image_features=batch['image_features'][::-1])
  other_logits = forward(
      params,
      {
          'decoder_input_tokens': batch['decoder_input_tokens'],
          'image_features': other['image_features'],
          'image_mask': batch['image_mask'],
      },
  )
  first = forward(params, {'decoder_input_tokens': batch['decoder_input_tokens'], **media})
  rows = np.arange(len(lengths))
  diff = np.abs(np.asarray(first[rows, lengths - 1] - other_logits[rows, lengths - 1])).max()
  assert diff > 1e-2, diff
  other_seqs, _ = _mm_generate(model, params, other, max_decode_steps=MM_STEPS, eos_id=NO_EOS)
  assert not np.array_equal(np.asarray(other_seqs), np.asarray(seqs))


@pytest.mark.slow
def test_generate_multimodal_beam_and_sample():
  model, params = _tiny_unimoe()
  batch = _mm_batch(model.config, [[21, 22], [23]], np.random.RandomState(5), steps=4)
  greedy, _ = _mm_generate(model, params, batch, max_decode_steps=4, eos_id=NO_EOS)
  beam1, _ = _mm_generate(
      model, params, batch, max_decode_steps=4, eos_id=NO_EOS, method='beam', num_beams=1
  )
  np.testing.assert_array_equal(np.asarray(beam1), np.asarray(greedy))
  top1, _ = _mm_generate(
      model,
      params,
      batch,
      max_decode_steps=4,
      eos_id=NO_EOS,
      method='sample',
      top_k=1,
      temperature=2.0,
      rng=jax.random.PRNGKey(3),
  )
  np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
  beam4, scores = _mm_generate(
      model, params, batch, max_decode_steps=4, eos_id=NO_EOS, method='beam', num_beams=4
  )
  assert beam4.shape == greedy.shape and scores.shape == (2,)
  with pytest.raises(ValueError, match='rng'):
    _mm_generate(model, params, batch, max_decode_steps=4, eos_id=NO_EOS, method='sample')
