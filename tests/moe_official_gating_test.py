"""The official Uni-MoE routing variants against numpy references written from their code.

- 8 experts (`Uni_MoE_8e`, DeepSpeed 0.14 `sharded_moe.top2gating` with
  `top2_2nd_expert_sampling=True`): sampled second expert, `l_aux = mean(me * ce) * E * E`,
  capacity drops with the weights renormalised over the kept choices.
- 4 experts (`model/moe/moe.py` `MoeLayer`): the gate Linear in bfloat16.
- MoE layer patterns 'even' / 'odd', and the expert LoRA A initialisation.
Everything float32 unless the test says otherwise.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax import config as config_lib
from unimoe_jax.config import LoRAConfig, MoEConfig
from unimoe_jax.decoder import Decoder
from unimoe_jax.moe import dispatch as dispatch_lib
from unimoe_jax.moe import routing
from unimoe_jax.moe.layer import ExpertWeights, MoEFeedForward

E, D, F = 8, 16, 24


# ---- numpy references ----------------------------------------------------------------------


def _np_softmax(v):
  z = np.exp(v - v.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def np_top2gating(logits, gumbel=None, capacity_factor=None, min_capacity=4):
  """DeepSpeed 0.14 `top2gating` (float32), returning (l_aux, combine [S, E], idx1, idx2).

  `gumbel` None: no second-expert sampling. `capacity_factor` None: `drop_tokens=False`
  (the 8e model); else capacity ceil(S / E * capacity_factor * 2), bounded below by
  min_capacity, slots taken first choices first, in token order.
  """
  logits = np.asarray(logits, np.float32)
  s, e = logits.shape
  gates = _np_softmax(logits)
  idx1 = np.argmax(gates, axis=1)
  mask1 = np.eye(e, dtype=np.int64)[idx1]
  noisy = logits + (0 if gumbel is None else np.asarray(gumbel, np.float32))
  noisy = np.where(mask1.astype(bool), -np.inf, noisy)
  idx2 = np.argmax(noisy, axis=1)
  mask2 = np.eye(e, dtype=np.int64)[idx2]
  loc1 = np.cumsum(mask1, axis=0) - 1
  loc2 = np.cumsum(mask2, axis=0) - 1 + mask1.sum(axis=0, keepdims=True)
  me = gates.mean(axis=0)
  ce = mask1.astype(np.float32).mean(axis=0)
  l_aux = np.mean(me * ce) * e * e
  if capacity_factor is not None:
    cap = max(int(np.ceil(s / e * capacity_factor * 2)), min_capacity)
    mask1 = mask1 * (loc1 < cap)
    mask2 = mask2 * (loc2 < cap)
  g1 = (gates * mask1).sum(axis=1)
  g2 = (gates * mask2).sum(axis=1)
  denom = np.maximum(g1 + g2, np.finfo(np.float32).eps)
  combine = (g1 / denom)[:, None] * mask1 + (g2 / denom)[:, None] * mask2
  return np.float32(l_aux), combine.astype(np.float32), idx1, idx2


def np_l_aux_grad(logits):
  """d l_aux / d logits of top2gating, by hand: ce is a constant (one-hot of the argmax), and
  l_aux = E * sum_e me_e ce_e with me = mean_t softmax(logits)_t, so
  dL/dlogits[t, j] = (E / S) p_tj (ce_j - sum_e p_te ce_e)."""
  logits = np.asarray(logits, np.float64)
  s, e = logits.shape
  p = _np_softmax(logits)
  ce = np.eye(e)[np.argmax(p, axis=1)].mean(axis=0)
  return e / s * p * (ce[None, :] - (p * ce[None, :]).sum(axis=1, keepdims=True))


def _np_expert(p, e, x):
  silu = lambda v: v / (1.0 + np.exp(-v))
  h = silu(x @ np.asarray(p['wi_0']['kernel'][e])) * (x @ np.asarray(p['wi_1']['kernel'][e]))
  return h @ np.asarray(p['wo']['kernel'][e])


def _np_moe(params, x, combine):
  """x `[S, D]`, combine `[S, E]` -> `[S, D]`: sum_e combine[s, e] * expert_e(x_s)."""
  x = np.asarray(x, np.float64)
  return sum(combine[:, e : e + 1] * _np_expert(params, e, x) for e in range(combine.shape[1]))


# ---- helpers -------------------------------------------------------------------------------


class _RouterKeyProbe(nn.Module):
  """The first key `make_rng('router')` gives a root module: what the MoE layer draws from."""

  @nn.compact
  def __call__(self):
    return self.make_rng('router')


def _router_key(rng):
  return _RouterKeyProbe().apply({}, rngs={'router': rng})


def _logits(s=64, seed=0, scale=1.0):
  # Scale 1: close logits, so the Gumbel draw often changes the second expert.
  return jax.random.normal(jax.random.PRNGKey(seed), (s, E), jnp.float32) * scale


def _moe(**kw):
  kw.setdefault('num_experts', E)
  kw.setdefault('num_experts_per_tok', 2)
  kw.setdefault('dispatch', 'dense')
  return MoEConfig(**kw)


def _layer_params(cfg, x, router_scale=1.0):
  params = nn.meta.unbox(MoEFeedForward(cfg, mlp_dim=F).init(jax.random.PRNGKey(3), x))['params']
  params['router'] = params['router'] * router_scale
  return params


def _x(b=1, l=48, seed=5):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, l, D), jnp.float32)


# ---- the routing rule ----------------------------------------------------------------------


def test_sampled_gate_equals_deepspeed_top2gating_with_the_same_draws():
  logits = _logits()
  gumbel = routing.gumbel_noise(jax.random.PRNGKey(7), logits.shape)
  weights, idx = routing.top2_sampled_routing(logits, gumbel)
  l_aux, combine, idx1, idx2 = np_top2gating(logits, gumbel)
  np.testing.assert_array_equal(idx[:, 0], idx1)
  np.testing.assert_array_equal(idx[:, 1], idx2)
  ours = np.zeros((logits.shape[0], E), np.float32)
  np.put_along_axis(ours, np.asarray(idx), np.asarray(weights), axis=1)
  np.testing.assert_allclose(ours, combine, atol=1e-6, rtol=0)
  aux = routing.router_aux(logits, idx, jnp.ones(idx.shape, bool), load_balance_loss_form='top1')
  np.testing.assert_allclose(aux['load_balance_loss'], l_aux, atol=1e-6, rtol=0)
  # The draw matters: some second experts differ from the deterministic top-2.
  _, det = routing.top_k_routing(logits, 2)
  changed = int(np.sum(np.asarray(idx[:, 1]) != np.asarray(det[:, 1])))
  assert changed >= 10, changed
  np.testing.assert_array_equal(idx[:, 0], det[:, 0])


def test_without_sampling_equals_deterministic_top2():
  logits = _logits(seed=1, scale=3.0)
  weights, idx = routing.top2_sampled_routing(logits, None)
  det_w, det_idx = routing.top_k_routing(logits, 2)
  np.testing.assert_array_equal(idx, det_idx)
  np.testing.assert_allclose(weights, det_w, atol=1e-6, rtol=0)
  _, combine, idx1, idx2 = np_top2gating(logits, None)
  np.testing.assert_array_equal(np.stack([idx1, idx2], 1), det_idx)
  ours = np.zeros_like(combine)
  np.put_along_axis(ours, np.asarray(det_idx), np.asarray(det_w), axis=1)
  np.testing.assert_allclose(ours, combine, atol=1e-6, rtol=0)


def test_top1_loss_form_is_deepspeed_l_aux_value_and_gradient():
  logits = _logits(s=96, seed=2, scale=2.0)
  mask = jnp.concatenate([jnp.ones(80), jnp.zeros(16)])

  def ours(lg, form, m=None):
    _, idx = routing.top_k_routing(lg, 2)
    return routing.router_aux(lg, idx, jnp.ones(idx.shape, bool), m, form)['load_balance_loss']

  l_aux, _, _, _ = np_top2gating(logits)
  np.testing.assert_allclose(ours(logits, 'top1'), l_aux, atol=1e-6, rtol=0)
  grad = jax.grad(lambda lg: ours(lg, 'top1'))(logits)
  np.testing.assert_allclose(grad, np_l_aux_grad(logits), atol=1e-6, rtol=0)
  # Directly through load_balance_loss with the first choices only.
  _, idx = routing.top_k_routing(logits, 2)
  np.testing.assert_allclose(
      routing.load_balance_loss(jax.nn.softmax(logits), idx[:, :1]), l_aux, atol=1e-6, rtol=0
  )
  # Padding excluded: the masked loss is DeepSpeed's over the real tokens only.
  l_aux_real, _, _, _ = np_top2gating(logits[:80])
  np.testing.assert_allclose(ours(logits, 'top1', mask), l_aux_real, atol=1e-6, rtol=0)
  grad = jax.grad(lambda lg: ours(lg, 'top1', mask))(logits)
  np.testing.assert_allclose(grad[:80], np_l_aux_grad(logits[:80]), atol=1e-6, rtol=0)
  np.testing.assert_array_equal(grad[80:], 0.0)
  # 'topk' (our default) counts both choices and differs.
  assert abs(float(ours(logits, 'topk')) - float(l_aux)) > 1e-3


def test_renormalize_kept():
  w = jnp.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
  kept = jnp.array([[True, False], [True, True], [False, False]])
  np.testing.assert_allclose(
      routing.renormalize_kept(w, kept), [[1.0, 0.0], [0.6, 0.4], [0.0, 0.0]], atol=1e-7
  )


# ---- the MoE layer -------------------------------------------------------------------------


def test_layer_with_sampling_equals_numpy_top2gating_and_is_seeded():
  cfg = _moe(second_expert_sampling=True, load_balance_loss_form='top1')
  x = _x()
  params = _layer_params(cfg, x)
  layer = MoEFeedForward(cfg, mlp_dim=F)
  rng = jax.random.PRNGKey(11)
  y, aux = layer.apply({'params': params}, x, rngs={'router': rng})
  xt = np.asarray(x[0])
  logits = xt @ np.asarray(params['router'])
  gumbel = routing.gumbel_noise(_router_key(rng), logits.shape)
  l_aux, combine, _, idx2 = np_top2gating(logits, gumbel)
  np.testing.assert_allclose(y[0], _np_moe(params, xt, combine), atol=1e-5, rtol=0)
  np.testing.assert_allclose(aux['load_balance_loss'], l_aux, atol=1e-6, rtol=0)
  # Same seed, same result; another seed draws other second experts.
  y_again, _ = layer.apply({'params': params}, x, rngs={'router': rng})
  np.testing.assert_array_equal(y, y_again)
  _, _, _, idx2_other = np_top2gating(
      logits, routing.gumbel_noise(_router_key(jax.random.PRNGKey(12)), logits.shape)
  )
  assert np.any(idx2 != idx2_other)
  y_other, _ = layer.apply({'params': params}, x, rngs={'router': jax.random.PRNGKey(12)})
  assert float(jnp.max(jnp.abs(y_other - y))) > 1e-3
  # No 'router' rng (evaluation, decoding): noise keyed by the logits, deterministic.
  y_plain, _ = layer.apply({'params': params}, x)
  np.testing.assert_array_equal(y_plain, layer.apply({'params': params}, x)[0])
  # The noise hashes the logits' bits: compute them with the layer's own op.
  jax_logits = jnp.einsum('bld,de->ble', x, params['router'], preferred_element_type=jnp.float32)[0]
  _, combine_plain, _, _ = np_top2gating(logits, routing.content_gumbel_noise(jax_logits))
  np.testing.assert_allclose(y_plain[0], _np_moe(params, xt, combine_plain), atol=1e-5, rtol=0)
  # Sampling off: the deterministic top-2.
  det_cfg = _moe(load_balance_loss_form='top1')
  y_det, aux_det = MoEFeedForward(det_cfg, mlp_dim=F).apply({'params': params}, x)
  _, combine_det, _, _ = np_top2gating(logits, None)
  np.testing.assert_allclose(y_det[0], _np_moe(params, xt, combine_det), atol=1e-5, rtol=0)
  np.testing.assert_allclose(aux_det['load_balance_loss'], l_aux, atol=1e-6, rtol=0)


def test_content_noise_is_per_token():
  logits = _logits(s=6, seed=4)
  noise = routing.content_gumbel_noise(jnp.concatenate([logits, logits[:2]]))
  np.testing.assert_array_equal(noise[6:], noise[:2])  # The same token, the same draw.
  assert len({tuple(np.asarray(r).round(6)) for r in noise[:6]}) == 6
  # Roughly standard Gumbel (mean ~0.577) over many tokens.
  many = routing.content_gumbel_noise(_logits(s=4096, seed=5))
  assert abs(float(jnp.mean(many)) - 0.5772) < 0.03


def test_capacity_renormalisation_equals_deepspeed_drops():
  cf = 0.5  # Tight: many choices dropped.
  cfg = _moe(
      dispatch='capacity',
      capacity_factor=cf,
      min_capacity=1,
      second_expert_sampling=True,
      renormalize_after_drops=True,
  )
  x = _x(l=40, seed=6)
  params = _layer_params(cfg, x, router_scale=3.0)
  rng = jax.random.PRNGKey(13)
  y, aux = MoEFeedForward(cfg, mlp_dim=F).apply({'params': params}, x, rngs={'router': rng})
  xt = np.asarray(x[0])
  logits = xt @ np.asarray(params['router'])
  gumbel = routing.gumbel_noise(_router_key(rng), logits.shape)
  _, combine, _, _ = np_top2gating(logits, gumbel, capacity_factor=cf, min_capacity=1)
  assert float(aux['drop_fraction']) > 0.2, aux['drop_fraction']
  # Some tokens keep exactly one choice, now with weight 1.
  assert np.any(np.isclose(combine.max(1), 1.0) & (combine.sum(1) > 0))
  np.testing.assert_allclose(y[0], _np_moe(params, xt, combine), atol=1e-5, rtol=0)
  # Without renormalisation the kept choices keep their pre-drop weights.
  plain = _moe(dispatch='capacity', capacity_factor=cf, min_capacity=1, second_expert_sampling=True)
  y_plain, _ = MoEFeedForward(plain, mlp_dim=F).apply({'params': params}, x, rngs={'router': rng})
  _, full, _, _ = np_top2gating(logits, gumbel)
  np.testing.assert_allclose(
      y_plain[0], _np_moe(params, xt, full * (combine > 0)), atol=1e-5, rtol=0
  )


def test_capacity_dispatch_renormalize_option():
  x = _x(b=2, l=8, seed=8)
  experts = nn.meta.unbox(
      MoEFeedForward(_moe(num_experts=4), mlp_dim=F).init(jax.random.PRNGKey(0), x)
  )['params']
  experts = {n: experts[n] for n in ('wi_0', 'wi_1', 'wo')}
  # Every token's 1st choice is expert 0 (4 slots: tokens 4-7 lose it); 2nd choices go to
  # experts 1 (tokens 0-3) and 2 (tokens 4-7), all kept.
  second = jnp.where(jnp.arange(8) < 4, 1, 2)
  idx = jnp.stack([jnp.zeros(8, jnp.int32), second], -1)[None].repeat(2, 0)
  w = jnp.broadcast_to(jnp.array([0.75, 0.25]), (2, 8, 2))
  assert dispatch_lib.expert_capacity(8, 2, 4, 1.0, 1) == 4
  xt = np.asarray(x)
  for renormalize in (False, True):
    y, kept = dispatch_lib.capacity(
        x, w, idx, experts, capacity_factor=1.0, min_capacity=1, renormalize=renormalize
    )
    kept = np.asarray(kept)
    np.testing.assert_array_equal(kept[0, :, 0], np.arange(8) < 4)
    np.testing.assert_array_equal(kept[..., 1], True)
    for b in range(2):
      for t in range(8):
        if t < 4:
          ref = 0.75 * _np_expert(experts, 0, xt[b, t]) + 0.25 * _np_expert(experts, 1, xt[b, t])
        else:  # Only the 2nd choice kept: weight 1 renormalised, else its own 0.25.
          ref = (1.0 if renormalize else 0.25) * _np_expert(experts, 2, xt[b, t])
        np.testing.assert_allclose(y[b, t], ref, atol=1e-5, rtol=0)


def test_router_dtype_bfloat16_rounds_logits_and_weights():
  x = _x(l=32, seed=9)
  cfg = _moe(num_experts=4, router_dtype='bfloat16')
  params = _layer_params(cfg, x)
  y16, aux16 = MoEFeedForward(cfg, mlp_dim=F).apply({'params': params}, x)
  y32, _ = MoEFeedForward(_moe(num_experts=4), mlp_dim=F).apply({'params': params}, x)
  # Reference: the official gate Linear in bf16, top-k, softmax in fp32, cast back to bf16.
  bf = jnp.bfloat16
  logits = jnp.einsum(
      'td,de->te', x[0].astype(bf), params['router'].astype(bf), preferred_element_type=jnp.float32
  ).astype(bf)
  top, idx = jax.lax.top_k(logits, 2)
  w = jax.nn.softmax(top.astype(jnp.float32), -1).astype(bf).astype(jnp.float32)
  combine = np.zeros((32, 4), np.float32)
  np.put_along_axis(combine, np.asarray(idx), np.asarray(w), axis=1)
  np.testing.assert_allclose(y16[0], _np_moe(params, np.asarray(x[0]), combine), atol=1e-5, rtol=0)
  assert float(jnp.max(jnp.abs(y16 - y32))) > 1e-4  # The float32 router differs.
  for v in jax.tree_util.tree_leaves(aux16):
    assert v.dtype == jnp.float32


# ---- configuration -------------------------------------------------------------------------


def test_layer_patterns():
  def indices(layers, n=6):
    return config_lib.named('tiny', num_layers=n, moe=MoEConfig(layers=layers)).moe_layer_indices()

  assert indices('even') == (0, 2, 4)
  assert indices('odd') == (1, 3, 5)
  assert indices('every_other') == indices('odd')
  assert indices('all') == tuple(range(6))
  assert indices([0, 5]) == (0, 5)
  # The official Uni_MoE_audio / speech_dp: MoE on layers 0, 2, ..., 30 of 32.
  assert indices('even', 32) == tuple(range(0, 32, 2))
  cfg = config_lib.named('tiny', num_layers=4, scan_layers=True, moe=MoEConfig(layers='even'))
  assert cfg.scan_period() == 2 and cfg.layer_kinds() == (True, False, True, False)
  with pytest.raises(ValueError, match='layers'):
    MoEConfig(layers='first')


def test_config_validation():
  with pytest.raises(ValueError, match='load_balance_loss_form'):
    MoEConfig(load_balance_loss_form='top2')
  with pytest.raises(ValueError, match='router_dtype'):
    MoEConfig(router_dtype='int32')
  with pytest.raises(ValueError, match='router_dtype'):
    MoEConfig(router_dtype='float33')
  with pytest.raises(ValueError, match='num_experts_per_tok=2'):
    MoEConfig(num_experts_per_tok=1, second_expert_sampling=True)
  cfg = MoEConfig()
  assert (
      cfg.load_balance_loss_form,
      cfg.router_dtype,
      cfg.second_expert_sampling,
      cfg.renormalize_after_drops,
  ) == ('topk', 'float32', False, False)


@pytest.mark.parametrize('scan', [False, True])
def test_decoder_even_layers_layout(scan):
  cfg = config_lib.named(
      'tiny',
      num_layers=4,
      scan_layers=scan,
      moe=_moe(num_experts=4, layers='even', second_expert_sampling=True),
  )
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(1), tokens))['params']
  if scan:
    assert set(params['stacked_layers']) == {'offset_0', 'offset_1'}
    assert 'moe' in params['stacked_layers']['offset_0']
    assert 'mlp' in params['stacked_layers']['offset_1']
  else:
    assert [('moe' in params[f'layers_{i}']) for i in range(4)] == [True, False, True, False]


@pytest.mark.slow
def test_scanned_layers_draw_their_own_router_noise(monkeypatch):
  """Under nn.scan the 'router' stream must be in the decoder's split_rngs: unlisted, it does
  not reach the scanned layers at all (they fall back to logit-keyed noise and the first
  check below fails); listed, each scanned MoE layer draws from its own key."""
  moe = _moe(num_experts=E, layers='all', second_expert_sampling=True)
  cfg = config_lib.named('tiny', num_layers=2, scan_layers=True, moe=moe)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, cfg.vocab_size)
  decoder = Decoder(cfg)
  # Jitted throughout: op by op, the init and the forward compiled ~150 small programs.
  params = jax.jit(lambda k: nn.meta.unbox(decoder.init(k, tokens))['params'])(
      jax.random.PRNGKey(1)
  )
  run = jax.jit(lambda p, r: decoder.apply({'params': p}, tokens, rngs={'router': r}))
  # Sampling is seeded: the same key, the same logits; another key, other logits.
  logits, _ = run(params, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(logits, run(params, jax.random.PRNGKey(2))[0])
  assert float(jnp.max(jnp.abs(run(params, jax.random.PRNGKey(3))[0] - logits))) > 0
  run_plain = jax.jit(lambda p: decoder.apply({'params': p}, tokens))
  plain, _ = run_plain(params)  # No rngs: keyed by the logits.
  np.testing.assert_array_equal(plain, run_plain(params)[0])

  # Make the key visible: zero routers put every 1st choice on expert 0, and a noise that
  # is one huge spike at an expert drawn from the key sets every token's 2nd choice.
  def spike(key, shape):
    return 1e3 * jax.nn.one_hot(jax.random.randint(key, (), 1, shape[-1]), shape[-1]) + jnp.zeros(
        shape
    )

  monkeypatch.setattr(routing, 'gumbel_noise', spike)
  router = params['stacked_layers']['offset_0']['moe']['router']
  params['stacked_layers']['offset_0']['moe']['router'] = jnp.zeros_like(router)
  run = jax.jit(lambda p, r: decoder.apply({'params': p}, tokens, rngs={'router': r}))
  second = []
  for seed in range(4):
    fraction = np.asarray(run(params, jax.random.PRNGKey(seed))[1]['expert_fraction'])
    np.testing.assert_allclose(fraction[:, 0], 0.5)
    second.append(tuple(np.argmax(fraction[:, 1:], axis=1) + 1))  # Per layer.
  assert any(a != b for a, b in second), second


@pytest.mark.slow
def test_model_training_eval_and_decoding_with_sampling():
  """models.py: loss_fn folds a 'router' key from the dropout key (seeded sampling);
  evaluation and greedy decoding pass no rngs and run deterministically."""
  from unimoe_jax.network import UniMoEConfig  # pylint: disable=g-import-not-at-top
  from unimoe_jax.models import UniMoEModel  # pylint: disable=g-import-not-at-top

  moe = _moe(
      num_experts=4,
      layers='even',
      second_expert_sampling=True,
      load_balance_loss_form='top1',
      load_balance_loss_coef=0.01,
  )
  model = UniMoEModel(UniMoEConfig(decoder=config_lib.named('tiny', moe=moe)), max_decode_steps=4)
  b, l = 2, 12
  rng = np.random.RandomState(0)
  targets = rng.randint(3, 512, size=(b, l)).astype(np.int32)
  weights = np.zeros((b, l), np.float32)
  weights[:, 6:] = 1.0
  batch = {
      'decoder_input_tokens': jnp.asarray(
          np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1)
      ),
      'decoder_target_tokens': jnp.asarray(targets),
      'decoder_loss_weights': jnp.asarray(weights),
  }
  # Jitted: op by op, the init and the decoding loop's prefill compiled ~320 small programs.
  shapes = {k: v.shape for k, v in batch.items()}
  params = jax.jit(lambda rng: nn.meta.unbox(model.get_initial_variables(rng, shapes))['params'])(
      jax.random.PRNGKey(0)
  )
  train = jax.jit(lambda p, r: model.loss_fn(p, batch, r)[0])
  loss = train(params, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(loss, train(params, jax.random.PRNGKey(1)))
  assert float(loss) != float(train(params, jax.random.PRNGKey(2)))
  evaluate = jax.jit(lambda p: model.eval_fn(p, batch)[0])
  np.testing.assert_array_equal(evaluate(params), evaluate(params))
  predict = jax.jit(model.predict_batch)
  decodes = predict(params, batch)
  assert decodes.shape == (b, l)
  np.testing.assert_array_equal(decodes, predict(params, batch))


def test_expert_lora_a_bound_is_one_over_sqrt_in():
  e, i, r = 8, 256, 8
  a = ExpertWeights(e, i, 32, ('embed', 'mlp'), lora=LoRAConfig(rank=r)).init(
      jax.random.PRNGKey(0)
  )['params']['lora_a']
  a = np.asarray(nn.meta.unbox(a))
  bound = 1.0 / np.sqrt(i)
  assert a.shape == (e, i, r)
  assert np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.99 * bound  # Was 1/sqrt(E * in) = bound / sqrt(8).
  # Uniform: variance bound^2 / 3.
  np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.05)
