"""BEATs encoder and official-checkpoint loader.

No reference implementation is importable, so the forward pass is checked against a float64
numpy re-derivation written here from the official model's equations (patch conv, weight-normed
grouped positional conv, bucketed relative bias with the GRU-style gate, deep-norm post-LN or
pre-LN), on official-layout state dicts with random values.
"""

import math

import official_audio_reference as ref

import flax.linen as nn
import jax
import numpy as np
import pytest

from unimoe_jax.convert import beats as convert_beats
from unimoe_jax.encoders import beats

TINY_CFG = {  # An official-style cfg dict, with the training keys real checkpoints carry.
    'encoder_layers': 2,
    'encoder_embed_dim': 32,
    'encoder_ffn_embed_dim': 48,
    'encoder_attention_heads': 4,
    'activation_fn': 'gelu',
    'dropout': 0.0,
    'attention_dropout': 0.0,
    'activation_dropout': 0.0,
    'encoder_layerdrop': 0.05,
    'dropout_input': 0.0,
    'layer_norm_first': False,
    'conv_bias': False,
    'conv_pos': 8,
    'conv_pos_groups': 4,
    'relative_position_embedding': True,
    'num_buckets': 32,
    'max_distance': 64,
    'gru_rel_pos': True,
    'deep_norm': True,
    'input_patch_size': 16,
    'layer_wise_gradient_decay_ratio': 0.6,
    'embed_dim': 24,
    'finetuned_model': False,
    'predictor_dropout': 0.0,
    'predictor_class': 527,
}

# Pre-LN, no relative bias, no projection (embed_dim == width), biased patches, odd kernel,
# tanh GELU: the branches the BEATs checkpoint does not take.
PRE_LN_CFG = dict(
    TINY_CFG,
    layer_norm_first=True,
    deep_norm=False,
    relative_position_embedding=False,
    gru_rel_pos=False,
    embed_dim=32,
    conv_bias=True,
    conv_pos=5,
    activation_fn='gelu_accurate',
)


def official_state_dict(cfg, seed=0):
  """Random tensors under the official names and shapes (as `BEATs(cfg).state_dict()` has)."""
  rng = np.random.default_rng(seed)
  h = cfg['encoder_attention_heads']
  shapes = ref.beats_state_dict_shapes(cfg)
  sd = {}
  for name, shape in shapes.items():
    scale = 1.0 / math.sqrt(shape[-1]) if name.endswith('weight') and len(shape) == 2 else 0.2
    value = rng.normal(0.0, scale, shape)
    if name.endswith(('norm.weight', 'grep_a')):
      value = 1.0 + 0.3 * value  # Around the identity, far from it enough to matter.
    sd[name] = value.astype(np.float32)
  sd['patch_embedding.weight'] *= 0.3  # 256 inputs per patch.
  if cfg['relative_position_embedding']:
    table = rng.normal(0.0, 1.0, (cfg['num_buckets'], h)).astype(np.float32)
    for i in range(cfg['encoder_layers']):  # The tied table repeats under every layer.
      sd[f'encoder.layers.{i}.self_attn.relative_attention_bias.weight'] = table
  return sd


# ---------------------------------------------------------------------------------------------
# The numpy re-derivation (float64).


def _ln(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _gelu(x, tanh=False):
  if tanh:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _bucket(rel, num_buckets, max_distance):
  """The relative bucket of one offset, straight from the formula (python floats)."""
  half = num_buckets // 2
  exact = half // 2
  base = half if rel > 0 else 0
  dist = abs(rel)
  if dist < exact:
    return base + dist
  return base + min(
      half - 1,
      exact + int(math.log(dist / exact) / math.log(max_distance / exact) * (half - exact)),
  )


def _reduce_mask(mask, n):
  per = mask.shape[1] // n
  return np.stack([mask[:, j * per : (j + 1) * per].all(1) for j in range(n)], 1)


def numpy_beats(sd, cfg, fbank, padding_mask=None):
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  fbank = fbank.astype(np.float64)
  b, t, m = fbank.shape
  p = cfg['input_patch_size']
  tp, mp = t // p, m // p
  w = sd['patch_embedding.weight'][:, 0]
  feat = np.zeros((b, w.shape[0], tp, mp))  # The conv output [batch, channels, time, mel].
  for i in range(tp):
    for j in range(mp):
      feat[:, :, i, j] = np.einsum(
          'euv,buv->be', w, fbank[:, i * p : (i + 1) * p, j * p : (j + 1) * p]
      )
  if cfg['conv_bias']:
    feat += sd['patch_embedding.bias'][None, :, None, None]
  x = feat.reshape(b, -1, tp * mp).transpose(0, 2, 1)
  x = _ln(x, sd['layer_norm.weight'], sd['layer_norm.bias'])
  if 'post_extract_proj.weight' in sd:
    x = x @ sd['post_extract_proj.weight'].T + sd['post_extract_proj.bias']
  n, d = x.shape[1], x.shape[2]
  mask = None
  if padding_mask is not None:
    mask = _reduce_mask(_reduce_mask(padding_mask, t), n)
    x = np.where(mask[..., None], 0.0, x)

  # Weight-normed grouped conv, zero padded by k // 2 each side, last output dropped if k even.
  k, g = cfg['conv_pos'], cfg['conv_pos_groups']
  v, gain = sd['encoder.pos_conv.0.weight_v'], sd['encoder.pos_conv.0.weight_g']
  cw = gain * v / np.sqrt((v**2).sum(axis=(0, 1), keepdims=True))
  xp = np.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)))
  out_len = n + 2 * (k // 2) - k + 1
  conv = np.zeros((b, out_len, d)) + sd['encoder.pos_conv.0.bias']
  cg = d // g
  for o in range(d):
    grp = o // cg
    for tap in range(k):
      conv[:, :, o] += xp[:, tap : tap + out_len, grp * cg : (grp + 1) * cg] @ cw[o, :, tap]
  x = x + _gelu(conv[:, :n])

  pre_ln = cfg['layer_norm_first']
  if not pre_ln:
    x = _ln(x, sd['encoder.layer_norm.weight'], sd['encoder.layer_norm.bias'])
  h = cfg['encoder_attention_heads']
  hd = d // h
  rel_bias = None
  if cfg['relative_position_embedding']:
    table = sd['encoder.layers.0.self_attn.relative_attention_bias.weight']
    idx = np.array(
        [
            [_bucket(kk - qq, cfg['num_buckets'], cfg['max_distance']) for kk in range(n)]
            for qq in range(n)
        ]
    )
    rel_bias = table[idx].transpose(2, 0, 1)  # [heads, query, key]
  alpha = (2 * cfg['encoder_layers']) ** 0.25 if cfg['deep_norm'] else 1.0
  tanh = cfg['activation_fn'] == 'gelu_accurate'

  def attention(x, pre):
    lin = lambda name, y: y @ sd[f'{pre}.{name}.weight'].T + sd[f'{pre}.{name}.bias']
    q = lin('q_proj', x).reshape(b, n, h, hd)
    kk = lin('k_proj', x).reshape(b, n, h, hd)
    vv = lin('v_proj', x).reshape(b, n, h, hd)
    out = np.zeros((b, n, h, hd))
    for head in range(h):
      logits = np.einsum('bqc,bkc->bqk', q[:, :, head] / math.sqrt(hd), kk[:, :, head])
      if rel_bias is not None:
        bias = np.broadcast_to(rel_bias[head], (b, n, n))
        if cfg['gru_rel_pos']:
          gl = q[:, :, head] @ sd[f'{pre}.grep_linear.weight'].T + sd[f'{pre}.grep_linear.bias']
          sig = lambda z: 1 / (1 + np.exp(-z))
          gate_a, gate_b = sig(gl[..., :4].sum(-1)), sig(gl[..., 4:].sum(-1))
          scale = gate_a * (gate_b * sd[f'{pre}.grep_a'][0, head, 0, 0] - 1) + 2
          bias = scale[..., None] * bias
        logits = logits + bias
      if mask is not None:
        logits = np.where(mask[:, None, :], -np.inf, logits)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[:, :, head] = probs @ vv[:, :, head]
    return lin('out_proj', out.reshape(b, n, d))

  for i in range(cfg['encoder_layers']):
    pre = f'encoder.layers.{i}'
    ln = lambda name, y: _ln(y, sd[f'{pre}.{name}.weight'], sd[f'{pre}.{name}.bias'])
    mlp = lambda y: (
        _gelu(y @ sd[f'{pre}.fc1.weight'].T + sd[f'{pre}.fc1.bias'], tanh)
        @ sd[f'{pre}.fc2.weight'].T
        + sd[f'{pre}.fc2.bias']
    )
    if pre_ln:
      x = x + attention(ln('self_attn_layer_norm', x), f'{pre}.self_attn')
      x = x + mlp(ln('final_layer_norm', x))
    else:
      x = ln('self_attn_layer_norm', alpha * x + attention(x, f'{pre}.self_attn'))
      x = ln('final_layer_norm', alpha * x + mlp(x))
  if pre_ln:
    x = _ln(x, sd['encoder.layer_norm.weight'], sd['encoder.layer_norm.bias'])
  return x, mask


# ---------------------------------------------------------------------------------------------


def _run(config, params, fbank, padding_mask=None):
  return beats.BEATs(config).apply({'params': params}, fbank, padding_mask)


def _fbank(batch, frames, seed=1):
  return np.random.default_rng(seed).normal(0.0, 1.0, (batch, frames, 128)).astype(np.float32)


def test_relative_position_bucket_hand_values():
  # num_buckets 32 -> 16 per direction (positive offsets from 16), exact below 8, then
  # 8 + int(log(|r| / 8) / log(64 / 8) * 8), clipped to 15 (+16).
  cases = {
      0: 0,
      -1: 1,
      1: 17,
      -7: 7,
      7: 23,
      -8: 8,
      8: 24,
      -12: 9,  # log(1.5) / log(8) * 8 = 1.56
      -16: 10,  # log(2) / log(8) * 8 = 2.67
      -32: 13,  # 5.33
      -63: 15,  # 7.94
      -64: 15,
      64: 31,
      -1000: 15,
      1000: 31,
      20: 27,
  }  # 20: 16 + 8 + int(3.52)
  rel = np.array(list(cases))
  got = beats.relative_position_bucket(rel, 32, 64)
  assert dict(zip(cases, got.tolist())) == cases
  # The iter3 sizes: every offset a 1496-token (30 s) input produces, against the formula.
  rel = np.arange(-1500, 1501)
  got = beats.relative_position_bucket(rel, 320, 800)
  assert got.tolist() == [_bucket(int(r), 320, 800) for r in rel]
  assert got.min() == 0 and got.max() == 319


def test_config_from_official():
  cfg = beats.config_from_official(TINY_CFG)
  assert cfg == beats.BEATS_SIZES['tiny']
  assert cfg.deep_norm_alpha == pytest.approx(4**0.25)
  iter3 = dict(
      TINY_CFG,
      encoder_layers=12,
      encoder_embed_dim=768,
      encoder_ffn_embed_dim=3072,
      encoder_attention_heads=12,
      conv_pos=128,
      conv_pos_groups=16,
      num_buckets=320,
      max_distance=800,
      embed_dim=512,
  )
  assert beats.BEATsConfig.from_official(iter3) == beats.BEATS_SIZES['iter3']
  # Missing keys take the official class defaults (e.g. no relative bias), not ours.
  sparse = beats.config_from_official({'input_patch_size': 16})
  assert not sparse.relative_position_embedding and sparse.max_distance == 1280
  with pytest.raises(ValueError, match='expand_attention_head_size'):
    beats.config_from_official(dict(TINY_CFG, expand_attention_head_size=64))
  with pytest.raises(ValueError, match='activation_fn'):
    beats.config_from_official(dict(TINY_CFG, activation_fn='glu'))
  with pytest.raises(ValueError, match='deep_norm'):
    beats.config_from_official(dict(TINY_CFG, layer_norm_first=True))
  assert beats.config_from_official(TINY_CFG).num_tokens(2998) == 1496


@pytest.mark.parametrize('cfg_dict', [TINY_CFG, PRE_LN_CFG], ids=['post_ln_deep_norm', 'pre_ln'])
def test_forward_matches_numpy_derivation(cfg_dict):
  config = beats.config_from_official(cfg_dict)
  sd = official_state_dict(cfg_dict)
  params = convert_beats.params_from_official(sd, config)
  # Frames not a multiple of 16 (the tail is dropped); example 1 padded from frame 48 with a
  # waveform-length mask (160 samples per frame, plus a ragged tail as 30 s chunks have).
  fbank = _fbank(2, 70)
  mask = np.zeros((2, 70 * 160 + 37), bool)
  mask[1, 48 * 160 :] = True
  got, got_mask = _run(config, params, fbank, mask)
  want, want_mask = numpy_beats(sd, cfg_dict, fbank, mask)
  assert got.shape == (2, 32, 32) and got_mask.shape == (2, 32)
  np.testing.assert_array_equal(got_mask, want_mask)
  assert int(got_mask[1].sum()) == 8 and not got_mask[0].any()
  err = float(np.max(np.abs(np.asarray(got) - want)))
  assert err < 1e-4, err
  # Without a mask: every token attends everywhere.
  got, got_mask = _run(config, params, fbank)
  want, _ = numpy_beats(sd, cfg_dict, fbank)
  assert not np.asarray(got_mask).any()
  err = float(np.max(np.abs(np.asarray(got) - want)))
  assert err < 1e-4, err


def test_fold_weight_norm_matches_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(3)
  g, v = rng.normal(size=(1, 1, 5)), rng.normal(size=(12, 3, 5))
  want = torch._weight_norm(torch.tensor(v), torch.tensor(g), 2).numpy()  # pylint: disable=protected-access
  np.testing.assert_allclose(convert_beats.fold_weight_norm(g, v), want, rtol=1e-6, atol=1e-6)


def test_padding_invariance():
  config = beats.config_from_official(TINY_CFG)
  params = convert_beats.params_from_official(official_state_dict(TINY_CFG), config)
  fbank = _fbank(2, 64)
  mask = np.zeros((2, 64), bool)
  mask[1, 32:] = True  # Padding from a patch boundary: tokens 16.. of example 1 are padding.
  garbage = fbank.copy()
  garbage[1, 32:] = 50.0 * _fbank(1, 32, seed=7)[0]
  out, token_mask = _run(config, params, fbank, mask)
  out_g, _ = _run(config, params, garbage, mask)
  np.testing.assert_array_equal(token_mask[1], np.arange(32) >= 16)
  np.testing.assert_allclose(out_g[:, :16], out[:, :16], atol=1e-5)
  np.testing.assert_allclose(out_g[0], out[0], atol=1e-5)
  # ... and the unpadded tokens are what the model gives for the unpadded frames alone.
  alone, _ = _run(config, params, fbank[1:, :32])
  np.testing.assert_allclose(out[1, :16], alone[0], atol=1e-5)
  # The control: without the mask the garbage does reach the first tokens.
  plain, _ = _run(config, params, fbank)
  plain_g, _ = _run(config, params, garbage)
  assert float(np.max(np.abs(plain_g[1, :16] - plain[1, :16]))) > 1e-2
  # Padding that starts inside a patch: the official mask gives 2 frames per token *index*,
  # so tokens 16..19 (time patch 2, frames 32..47) stay unpadded although frames 40.. are pads.
  mask40 = np.zeros((2, 64), bool)
  mask40[1, 40:] = True
  _, token_mask40 = _run(config, params, fbank, mask40)
  np.testing.assert_array_equal(token_mask40[1], np.arange(32) >= 20)
  # A fully padded example stays finite (the official code gives NaN there).
  out_all, mask_all = _run(config, params, fbank, np.ones((2, 64), bool))
  assert np.isfinite(np.asarray(out_all)).all() and np.asarray(mask_all).all()


def test_load_official_checkpoint(tmp_path):
  torch = pytest.importorskip('torch')
  sd = official_state_dict(TINY_CFG)
  sd['predictor.weight'] = np.zeros((527, 32), np.float32)  # Dropped by the loader.
  sd['predictor.bias'] = np.zeros((527,), np.float32)
  path = tmp_path / 'beats_tiny.pt'
  torch.save({'cfg': TINY_CFG, 'model': {k: torch.tensor(v) for k, v in sd.items()}}, path)
  config, params = convert_beats.load_official_checkpoint(str(path))
  assert config == beats.BEATS_SIZES['tiny']

  fbank = _fbank(2, 64)
  variables = jax.eval_shape(beats.BEATs(config).init, jax.random.PRNGKey(0), fbank)
  want_shapes = jax.tree_util.tree_map(np.shape, nn.meta.unbox(variables['params']))
  assert jax.tree_util.tree_map(np.shape, params) == want_shapes
  mask = np.zeros((2, 64), bool)
  mask[0, 48:] = True
  out, token_mask = _run(config, params, fbank, mask)
  assert out.shape == (2, 32, 32) and out.dtype == np.float32
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(token_mask[0], np.arange(32) >= 24)


def test_converter_names_bad_tensors():
  config = beats.config_from_official(TINY_CFG)
  sd = official_state_dict(TINY_CFG)

  renamed = dict(sd)
  renamed['encoder.layers.1.self_attn.grep_b'] = renamed.pop('encoder.layers.1.self_attn.grep_a')
  with pytest.raises(
      ValueError, match=r'missing.*layers\.1\.self_attn\.grep_a.*unexpected.*grep_b'
  ):
    convert_beats.params_from_official(renamed, config)

  wrong = dict(sd, **{'encoder.pos_conv.0.weight_v': np.zeros((32, 32, 8), np.float32)})
  with pytest.raises(ValueError, match=r'encoder\.pos_conv\.0\.weight_v'):
    convert_beats.params_from_official(wrong, config)

  untied = dict(sd)
  name = 'encoder.layers.1.self_attn.relative_attention_bias.weight'
  untied[name] = untied[name] + 1.0
  with pytest.raises(ValueError, match=name.replace('.', r'\.')):
    convert_beats.params_from_official(untied, config)

  # The tied copies are optional (a deduplicating saver keeps one).
  del sd[name]
  convert_beats.params_from_official(sd, config)
