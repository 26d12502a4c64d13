"""The multimodal model: splicing, presence skipping, a mixed batch on the 8-device mesh."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax import partitioning
from unimoe_jax.config import MoEConfig, named
from unimoe_jax.connectors.qformer import QFORMER_SIZES
from unimoe_jax.encoders import clip
from unimoe_jax.network import UniMoE, UniMoEConfig, check_placeholders, splice
from tiny_models import tiny_audio_towers
from tree_asserts import assert_trees_close

IMAGE, VIDEO, SPEECH, AUDIO = 500, 501, 502, 503
LENGTH, FRAMES, MEL_FRAMES, FBANK_FRAMES = 160, 2, 32, 32


def tiny_config(**overrides):
  # One layer per tower (CLIP's layer -2 of 2): compile time dominates these tests.
  vision = clip.named('tiny', image_size=16, patch_size=8, num_layers=2)
  fields = dict(
      decoder=named('tiny', moe=MoEConfig(num_experts=4, num_experts_per_tok=2)),
      vision=vision,
      vision_projector='mlp2x_gelu',
      **tiny_audio_towers(6, 5, num_mel_bins=16, max_source_positions=MEL_FRAMES // 2),
      image_token_id=IMAGE,
      video_token_id=VIDEO,
      speech_token_id=SPEECH,
      audio_token_id=AUDIO,
  )
  fields.update(overrides)
  return UniMoEConfig(**fields)


# Items per row: (image, video, speech, audio). Row 0 is text only.
ROWS = [
    (0, 0, 0, 0),
    (1, 0, 0, 0),
    (0, 1, 0, 0),
    (0, 0, 1, 0),
    (0, 0, 0, 1),
    (1, 0, 1, 0),
    (2, 0, 0, 0),
    (0, 1, 0, 1),
]
MAX_ITEMS = (2, 1, 1, 1)


def mixed_batch(cfg, rows=ROWS, seed=0):
  """Rows of text with each real item's placeholders at a random offset, and media arrays."""
  rng = np.random.default_rng(seed)
  b = len(rows)
  tokens = rng.integers(1, 400, size=(b, LENGTH)).astype(np.int32)
  ids = (IMAGE, VIDEO, SPEECH, AUDIO)
  mods = ('image', 'video', 'speech', 'audio')
  for r, counts in enumerate(rows):
    pos = 2
    for m, token, count in zip(mods, ids, counts):
      for _ in range(count):
        n = cfg.num_soft_tokens(m)
        pos += int(rng.integers(1, 4))
        tokens[r, pos : pos + n] = token
        pos += n
    assert pos < LENGTH
  v = cfg.vision.image_size
  shapes = {
      'image': (v, v, 3),
      'video': (FRAMES, v, v, 3),
      'speech': (MEL_FRAMES, cfg.speech_encoder.num_mel_bins),
      'audio': (FBANK_FRAMES, 128),
  }
  batch = {
      'decoder_input_tokens': tokens,
      'decoder_target_tokens': np.roll(tokens, -1, axis=1),
      'decoder_loss_weights': np.ones((b, LENGTH), np.float32),
  }
  for i, m in enumerate(mods):
    mask = np.zeros((b, MAX_ITEMS[i]), bool)
    for r, counts in enumerate(rows):
      mask[r, : counts[i]] = True
    batch[f'{m}_mask'] = mask
    batch[f'{m}_features'] = (
        rng.standard_normal((b, MAX_ITEMS[i]) + shapes[m])
        * mask.reshape(mask.shape + (1,) * len(shapes[m]))
    ).astype(np.float32)
  return batch


@pytest.fixture(scope='module')
def model_and_params():
  cfg = tiny_config()
  model = UniMoE(cfg)
  batch = mixed_batch(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch))['params']
  return cfg, model, params, batch


def test_splice_puts_soft_tokens_at_placeholders_in_order():
  tokens = jnp.array([[1, 9, 9, 2, 9, 3], [9, 1, 2, 3, 4, 5]])
  emb = jnp.zeros((2, 6, 3))
  soft = jnp.arange(2 * 3 * 3, dtype=jnp.float32).reshape(2, 3, 3) + 1
  out = np.asarray(splice(emb, tokens, soft, 9))
  np.testing.assert_array_equal(out[0, [1, 2, 4]], soft[0])
  np.testing.assert_array_equal(out[1, 0], soft[1, 0])
  np.testing.assert_array_equal(out[0, [0, 3, 5]], 0)
  np.testing.assert_array_equal(out[1, 1:], 0)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='image_token_id'):
    tiny_config(image_token_id=0)
  with pytest.raises(ValueError, match='speech_aligner'):
    tiny_config(speech_aligner=None)
  with pytest.raises(ValueError, match='placeholder ids must differ'):
    tiny_config(video_token_id=IMAGE)
  with pytest.raises(ValueError, match='encoder_hidden_size'):
    tiny_config(audio_qformer=dataclasses.replace(QFORMER_SIZES['tiny'], encoder_hidden_size=7))


def test_check_placeholders_names_row_and_modality():
  cfg = tiny_config()
  batch = mixed_batch(cfg)
  check_placeholders(cfg, batch)
  batch['decoder_input_tokens'][5, -1] = SPEECH
  with pytest.raises(ValueError, match=r'row 5: .* speech'):
    check_placeholders(cfg, batch)


def test_soft_tokens_land_exactly_at_placeholders(model_and_params):
  cfg, model, params, batch = model_and_params

  def parts(m, b):
    return m.encode(b), m.embed(b), m.decoder.embed(b['decoder_input_tokens'])

  soft, emb, text = jax.jit(lambda p, b: model.apply({'params': p}, b, method=parts))(params, batch)
  emb, text = np.asarray(emb), np.asarray(text)
  tokens = batch['decoder_input_tokens']
  ids = {'image': IMAGE, 'video': VIDEO, 'speech': SPEECH, 'audio': AUDIO}
  for r, counts in enumerate(ROWS):
    is_media = np.isin(tokens[r], list(ids.values()))
    np.testing.assert_array_equal(emb[r, ~is_media], text[r, ~is_media])
    for (m, token), count in zip(ids.items(), counts):
      where = np.nonzero(tokens[r] == token)[0]
      n = cfg.num_soft_tokens(m)
      assert len(where) == count * n
      np.testing.assert_array_equal(emb[r, where], np.asarray(soft[m][r, : count * n]))
      # Different items really are different soft tokens (the splice is not a broadcast).
      if count:
        assert np.abs(np.asarray(soft[m][r, :n])).sum() > 0
  # Two images in row 6 come from two different pixel arrays.
  n = cfg.num_soft_tokens('image')
  assert not np.allclose(soft['image'][6, :n], soft['image'][6, n : 2 * n])


def test_absent_modality_costs_no_encoder_run(model_and_params):
  cfg, model, params, _ = model_and_params
  calls = []

  class Counting(UniMoE):

    def _connect(self, modality, features, feature_mask):
      jax.debug.callback(lambda: calls.append(modality))
      return super()._connect(modality, features, feature_mask)

  text_only = mixed_batch(cfg, rows=[(0, 0, 0, 0), (0, 0, 0, 0)])
  with_image = mixed_batch(cfg, rows=[(1, 0, 0, 0), (0, 0, 0, 0)])
  fn = jax.jit(lambda p, b: Counting(cfg).apply({'params': p}, b, method=UniMoE.embed))
  emb = fn(params, text_only)
  jax.block_until_ready(emb)
  assert calls == []  # Same shapes, no real item: every encoder branch skipped.
  assert np.isfinite(np.asarray(emb)).all()
  jax.block_until_ready(fn(params, with_image))
  assert sorted(calls) == ['image']
  # A batch without the media keys at all traces no encoder, and embeds the same.
  bare = {k: v for k, v in text_only.items() if k.startswith('decoder_')}
  np.testing.assert_array_equal(
      jax.jit(lambda p, b: model.apply({'params': p}, b, method=UniMoE.embed))(params, bare), emb
  )


def _loss(model, params, batch):
  logits, aux = model.apply({'params': params}, batch)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, batch['decoder_target_tokens'][..., None], -1)[..., 0]
  return jnp.sum(nll * batch['decoder_loss_weights']) / nll.size + aux.get('aux_loss', 0.0)


@pytest.mark.slow
def test_mixed_batch_forward_backward_on_mesh_matches_one_device(model_and_params):
  """The fixture's params placed by the model's partitioning rules (a sharded init is
  partitioning_test.py's and fsdp_test.py's; here it was one more 8-device compile, ~8 s)."""
  cfg, model, params, batch = model_and_params
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, expert=4))
  shardings = partitioning.params_shardings(
      mesh, jax.eval_shape(lambda k: model.init(k, batch), jax.random.PRNGKey(1))
  )
  params = jax.device_put(params, shardings['params'])
  grad_fn = jax.value_and_grad(lambda p, b: _loss(model, p, b))
  data = partitioning.logical_sharding(mesh, ('activation_batch',))
  sharded_batch = jax.device_put(batch, data)
  with partitioning.mesh_context(mesh):
    value, grads = jax.jit(grad_fn, out_shardings=(None, shardings['params']))(
        params, sharded_batch
    )
  ref_value, ref_grads = jax.jit(grad_fn)(jax.tree_util.tree_map(np.asarray, params), batch)
  assert np.isfinite(float(value))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  # Encoders are frozen: no gradient reaches them; connectors and the decoder do get one.
  assert float(jnp.abs(grads['vision_tower']['pre_layernorm']['scale']).max()) == 0.0
  for name in (
      'vision_projector',
      'speech_aligner',
      'speech_projector',
      'audio_qformer',
      'audio_projector',
      'decoder',
  ):
    leaves = jax.tree_util.tree_leaves(grads[name])
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves), name
    assert max(float(jnp.abs(g).max()) for g in leaves) > 0, name
  assert_trees_close(grads, ref_grads, atol_scale=2e-5)


def test_negative_placeholder_ids_outside_the_vocabulary(model_and_params):
  # LLaVA-style ids (-200, ...) are the defaults; they never reach the embedding lookup.
  ref, _, params, _ = model_and_params
  cfg = tiny_config(
      image_token_id=-200, video_token_id=-201, speech_token_id=-202, audio_token_id=-203
  )
  batch = mixed_batch(ref, rows=[(1, 0, 0, 0), (0, 0, 0, 0)])
  batch = {k: v for k, v in batch.items() if k.startswith(('decoder_', 'image_'))}
  moved = dict(
      batch,
      decoder_input_tokens=np.where(
          batch['decoder_input_tokens'] == IMAGE, -200, batch['decoder_input_tokens']
      ),
  )
  embed = lambda c, b: jax.jit(
      lambda p, b: UniMoE(c).apply(  # pylint: disable=g-long-lambda
          {'params': p}, b, method=UniMoE.embed
      )
  )(params, b)
  np.testing.assert_array_equal(embed(ref, batch), embed(cfg, moved))
