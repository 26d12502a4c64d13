"""Whisper encoder and the Uni-MoE Whisper aligner against a tiny random Hugging Face
WhisperModel."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import state_dict_numpy, tiny_config, torch_and_transformers
from unimoe_jax.connectors import whisper_aligner
from unimoe_jax.connectors.whisper_aligner import WhisperAligner, WhisperAlignerConfig
from unimoe_jax.convert import whisper as convert
from unimoe_jax.encoders.whisper import WhisperEncoder, WhisperEncoderConfig, sinusoids

NUM_QUERY = 6
TOL = 1e-4


@pytest.fixture(scope='module')
def hf():
  """(model, state dict, encoder config, aligner config) of a tiny random WhisperModel."""
  torch, transformers = torch_and_transformers()
  config = transformers.WhisperConfig(attn_implementation='eager', **tiny_config('whisper'))
  model = transformers.WhisperModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == 'encoder.embed_positions.weight':
        continue  # Whisper's fixed sinusoids: our encoder computes them, so they must stay.
      if name.endswith('layer_norm.weight'):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.1)
  enc_cfg = convert.encoder_config_from_hf(config.to_dict())
  ali_cfg = convert.aligner_config_from_hf(config.to_dict(), num_query_tokens=NUM_QUERY)
  return model, state_dict_numpy(model), enc_cfg, ali_cfg


def _features(enc_cfg, batch=2, seed=0):
  return (
      np.random.default_rng(seed)
      .normal(size=(batch, enc_cfg.num_frames, enc_cfg.num_mel_bins))
      .astype(np.float32)
  )


def _hf_encode(model, feats):
  torch, _ = torch_and_transformers()
  with torch.no_grad():
    out = model.encoder(torch.from_numpy(feats.transpose(0, 2, 1))).last_hidden_state
  return out.numpy()


def _hf_align(model, queries, encoder_out, attention_mask=None):
  torch, _ = torch_and_transformers()
  batch = encoder_out.shape[0]
  embeds = torch.from_numpy(np.broadcast_to(queries[None], (batch,) + queries.shape).copy())
  with torch.no_grad():
    out = model.decoder(
        inputs_embeds=embeds,
        encoder_hidden_states=torch.from_numpy(encoder_out),
        attention_mask=attention_mask,
        use_cache=False,
    ).last_hidden_state
  return out.numpy()


def _queries(ali_cfg, seed=1):
  return (
      np.random.default_rng(seed)
      .normal(size=(ali_cfg.num_query_tokens, ali_cfg.d_model))
      .astype(np.float32)
  )


def _tree_shapes(tree):
  return jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), tree)


def _run(module, variables, *args, **kwargs):
  """`module.apply` under jit: one compilation instead of one per primitive and shape."""
  return jax.jit(module.apply)(variables, *args, **kwargs)


def _init_shapes(module, *args):
  """Shapes of `module.init`'s unboxed params, traced abstractly (eager init compiles every
  initializer, which takes seconds per shape here)."""
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)
  return _tree_shapes(nn.meta.unbox(variables['params']))


def test_configs_from_hf(hf):
  _, _, enc_cfg, ali_cfg = hf
  assert (
      enc_cfg.d_model,
      enc_cfg.num_layers,
      enc_cfg.num_heads,
      enc_cfg.ffn_dim,
      enc_cfg.num_mel_bins,
      enc_cfg.num_frames,
  ) == (32, 2, 4, 48, 16, 40)
  assert (
      ali_cfg.num_query_tokens,
      ali_cfg.num_layers,
      ali_cfg.max_target_positions,
      ali_cfg.causal,
  ) == (NUM_QUERY, 2, 16, True)


def test_sinusoids_equal_hf_positions(hf):
  model, _, enc_cfg, _ = hf
  table = model.encoder.embed_positions.weight.detach().numpy()
  np.testing.assert_allclose(
      sinusoids(enc_cfg.max_source_positions, enc_cfg.d_model), table, atol=1e-6, rtol=0
  )
  # Full whisper-small size, where float32 rounding of the argument matters most.
  torch, _ = torch_and_transformers()
  from transformers.models.whisper.modeling_whisper import sinusoids as hf_sinusoids  # pylint: disable=g-import-not-at-top

  del torch
  ours, ref = sinusoids(1500, 768), hf_sinusoids(1500, 768).numpy()
  # torch's float32 exp is off by an ulp from numpy's for some timescales; x1500 positions.
  assert np.max(np.abs(ours - ref)) < 2e-4


def test_encoder_matches_hf(hf):
  model, sd, enc_cfg, _ = hf
  feats = _features(enc_cfg)
  params = convert.encoder_params_from_hf(sd, enc_cfg)
  assert _tree_shapes(params) == _init_shapes(WhisperEncoder(enc_cfg), feats)
  ours = np.asarray(_run(WhisperEncoder(enc_cfg), {'params': params}, feats))
  ref = _hf_encode(model, feats)
  assert ours.shape == (2, enc_cfg.max_source_positions, enc_cfg.d_model)
  err = np.max(np.abs(ours - ref))
  assert err < TOL, err
  # The two examples differ, so a batch mix-up could not pass.
  assert np.max(np.abs(ref[0] - ref[1])) > 0.1


def test_encoder_rejects_wrong_frame_count(hf):
  _, sd, enc_cfg, _ = hf
  params = convert.encoder_params_from_hf(sd, enc_cfg)
  feats = _features(enc_cfg)[:, :-2]
  with pytest.raises(ValueError, match='expected 40 log-mel frames'):
    WhisperEncoder(enc_cfg).apply({'params': params}, feats)
  with pytest.raises(ValueError, match='n_mels=16'):  # Frequency-major input is refused too.
    WhisperEncoder(enc_cfg).apply({'params': params}, _features(enc_cfg).transpose(0, 2, 1))


@pytest.mark.parametrize('causal', [True, False])
def test_aligner_matches_hf_decoder(hf, causal):
  """The official aligner IS `WhisperModel.decoder(inputs_embeds=queries, encoder_hidden_states=..)`
  (learned positions added, causal self-attention, final LayerNorm), so HF's decoder is the exact
  reference. The non-causal variant is checked by handing HF an all-zero 4-D additive mask."""
  torch, _ = torch_and_transformers()
  model, sd, enc_cfg, ali_cfg = hf
  ali_cfg = dataclasses.replace(ali_cfg, causal=causal)
  encoder_out = _hf_encode(model, _features(enc_cfg))
  queries = _queries(ali_cfg)
  params = convert.aligner_params_from_hf(sd, ali_cfg, query_tokens=queries)
  assert _tree_shapes(params) == _init_shapes(WhisperAligner(ali_cfg), encoder_out)
  ours = np.asarray(_run(WhisperAligner(ali_cfg), {'params': params}, encoder_out))
  mask = None if causal else torch.zeros(2, 1, NUM_QUERY, NUM_QUERY)
  ref = _hf_align(model, queries, encoder_out, attention_mask=mask)
  assert ours.shape == (2, NUM_QUERY, ali_cfg.d_model)
  err = np.max(np.abs(ours - ref))
  assert err < TOL, err
  # The other attention pattern is far off: the comparison sees causality.
  other = _hf_align(
      model,
      queries,
      encoder_out,
      attention_mask=torch.zeros(2, 1, NUM_QUERY, NUM_QUERY) if causal else None,
  )
  assert np.max(np.abs(ours - other)) > 1e-2


def test_aligner_encoder_mask_equals_truncation(hf):
  model, sd, enc_cfg, ali_cfg = hf
  encoder_out = _hf_encode(model, _features(enc_cfg))
  queries = _queries(ali_cfg)
  params = convert.aligner_params_from_hf(sd, ali_cfg, query_tokens=queries)
  lengths = [enc_cfg.max_source_positions, 7]
  mask = np.arange(encoder_out.shape[1])[None, :] < np.array(lengths)[:, None]
  ours = np.asarray(
      _run(WhisperAligner(ali_cfg), {'params': params}, encoder_out, encoder_mask=jnp.asarray(mask))
  )
  for b, n in enumerate(lengths):
    ref = _hf_align(model, queries, encoder_out[b : b + 1, :n])[0]
    err = np.max(np.abs(ours[b] - ref))
    assert err < TOL, (b, err)
  unmasked = np.asarray(_run(WhisperAligner(ali_cfg), {'params': params}, encoder_out))
  assert np.max(np.abs(unmasked[1] - ours[1])) > 1e-2
  with pytest.raises(ValueError, match='encoder_mask shape'):
    WhisperAligner(ali_cfg).apply({'params': params}, encoder_out, encoder_mask=mask[:, :5])


def test_query_tokens_argument(hf):
  _, sd, _, ali_cfg = hf
  a = convert.aligner_params_from_hf(sd, ali_cfg, seed=3)['query_tokens']
  b = convert.aligner_params_from_hf(sd, ali_cfg, seed=3)['query_tokens']
  c = convert.aligner_params_from_hf(sd, ali_cfg, seed=4)['query_tokens']
  assert a.shape == (NUM_QUERY, ali_cfg.d_model) and 0.01 < a.std() < 0.04
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  q = _queries(ali_cfg)
  np.testing.assert_array_equal(
      convert.aligner_params_from_hf(sd, ali_cfg, query_tokens=q[None])['query_tokens'], q
  )
  with pytest.raises(ValueError, match='query_tokens'):
    convert.aligner_params_from_hf(sd, ali_cfg, query_tokens=q[:-1])


def test_prefixes(hf):
  """`model.`-prefixed names (WhisperForConditionalGeneration) convert the same; the LM head
  and the decoder's token embedding are ignored."""
  _, sd, enc_cfg, ali_cfg = hf
  full = {f'model.{k}': v for k, v in sd.items()}
  full['proj_out.weight'] = sd['decoder.embed_tokens.weight']
  for fn, cfg in (
      (convert.encoder_params_from_hf, enc_cfg),
      (convert.aligner_params_from_hf, ali_cfg),
  ):
    a, b = fn(sd, cfg), fn(full, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    c = fn(
        {k[len('model.') :]: v for k, v in full.items() if k.startswith('model.')},
        cfg,
        prefix={convert.encoder_params_from_hf: 'encoder.'}.get(fn, 'decoder.'),
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, c)
  with pytest.raises(ValueError, match='prefix'):
    convert.encoder_params_from_hf(sd, enc_cfg, prefix='audio_tower.')


@pytest.mark.parametrize(
    'old', ['encoder.layers.1.fc1.weight', 'decoder.layers.0.encoder_attn.k_proj.weight']
)
def test_converters_reject_renamed_tensor(hf, old):
  _, sd, enc_cfg, ali_cfg = hf
  new = old.replace('layers.', 'blocks.')
  bad = dict(sd)
  bad[new] = bad.pop(old)
  fn, cfg = (
      (convert.encoder_params_from_hf, enc_cfg)
      if old.startswith('encoder')
      else (convert.aligner_params_from_hf, ali_cfg)
  )
  with pytest.raises(ValueError) as info:
    fn(bad, cfg)
  assert old in str(info.value) and new in str(info.value)


def test_converters_reject_wrong_shape_and_trained_positions(hf):
  _, sd, enc_cfg, ali_cfg = hf
  bad = dict(sd)
  bad['decoder.layers.1.fc2.bias'] = np.zeros(31, np.float32)
  with pytest.raises(ValueError, match='decoder.layers.1.fc2.bias'):
    convert.aligner_params_from_hf(bad, ali_cfg)
  bad = dict(sd)
  bad['encoder.embed_positions.weight'] = sd['encoder.embed_positions.weight'] + 0.01
  with pytest.raises(ValueError, match='sinusoid'):
    convert.encoder_params_from_hf(bad, enc_cfg)


def test_config_validation_names_field():
  with pytest.raises(ValueError, match='num_heads'):
    WhisperEncoderConfig(d_model=30, num_heads=4)
  with pytest.raises(ValueError, match='max_target_positions'):
    WhisperAlignerConfig(num_query_tokens=50, max_target_positions=16)
  with pytest.raises(ValueError, match='act'):
    WhisperAlignerConfig(act='swish')


@pytest.mark.slow
def test_bfloat16_runs_close(hf):
  model, sd, enc_cfg, ali_cfg = hf
  feats = _features(enc_cfg)
  enc_params = convert.encoder_params_from_hf(sd, enc_cfg)
  ali_params = convert.aligner_params_from_hf(sd, ali_cfg, query_tokens=_queries(ali_cfg))
  outs = []
  for dtype in (jnp.float32, jnp.bfloat16):

    @jax.jit
    def run(feats, dtype=dtype):
      enc = WhisperEncoder(enc_cfg, dtype=dtype).apply({'params': enc_params}, feats)
      return WhisperAligner(ali_cfg, dtype=dtype).apply({'params': ali_params}, enc)

    out = run(feats)
    assert out.dtype == dtype
    outs.append(np.asarray(out, np.float32))
  assert np.max(np.abs(outs[0] - outs[1])) < 0.2


def test_init_std_sets_every_kernel_and_makes_a_narrow_random_tower_see_its_input():
  """`init_std` reaches the stem, attention and MLP kernels (and the aligner's queries). Why
  the tiny demo needs it: at width 32 with HF's 0.02, two different log-mels come out of a
  random encoder within 2% of each other (its position embeddings dominate); with 0.1, ~50%."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 100, 80)).astype(np.float32) * 0.5)
  spread = {}
  for std in (0.02, 0.1):
    cfg = WhisperEncoderConfig(
        d_model=32, num_layers=2, num_heads=4, ffn_dim=64, max_source_positions=50, init_std=std
    )
    encoder = WhisperEncoder(cfg)
    params = encoder.init(jax.random.PRNGKey(0), x)['params']
    for path in (
        ('conv1', 'kernel'),
        ('conv2', 'kernel'),
        ('layers_0', 'attn', 'query', 'kernel'),
        ('layers_1', 'mlp', 'fc2', 'kernel'),
    ):
      leaf = params
      for key in path:
        leaf = leaf[key]
      assert abs(float(nn.unbox(leaf).std()) / std - 1.0) < 0.2, (std, path)
    y = encoder.apply({'params': params}, x)
    spread[std] = float(jnp.linalg.norm(y[0] - y[1]) / jnp.linalg.norm(y[0]))
    aligner_cfg = whisper_aligner.named(
        'tiny', num_query_tokens=4, num_layers=1, max_target_positions=8, init_std=std
    )
    aligner_params = WhisperAligner(aligner_cfg).init(jax.random.PRNGKey(0), y)['params']
    queries = nn.unbox(aligner_params['query_tokens'])
    assert abs(float(queries.std()) / std - 1.0) < 0.3
  assert spread[0.02] < 0.05 and spread[0.1] > 0.3, spread
