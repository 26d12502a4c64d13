"""Issue 21 bugs read in the code: a derived head_dim that stuck through dataclasses.replace, a
loss that gathered at negative (placeholder) target ids, and unpacked padding in MoE routing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax import config
from unimoe_jax import models


def test_head_dim_is_derived_again_after_replace():
  tiny = config.named('tiny')
  assert tiny.resolved_head_dim == tiny.embed_dim // tiny.num_heads
  wide = config.named('tiny', embed_dim=128)
  assert wide.resolved_head_dim == 128 // wide.num_heads
  assert dataclasses.replace(wide, num_heads=8, num_kv_heads=8).resolved_head_dim == 16
  explicit = config.named('tiny', head_dim=7)
  assert dataclasses.replace(explicit, embed_dim=128).resolved_head_dim == 7


def test_head_dim_errors_name_the_field():
  with pytest.raises(ValueError, match='head_dim'):
    config.named('tiny', head_dim=-1)
  with pytest.raises(ValueError, match='embed_dim=130 is not divisible'):
    config.named('tiny', embed_dim=130)


def test_replaced_config_builds_attention_of_derived_head_dim():
  from unimoe_jax.decoder import Decoder

  cfg = config.named('tiny', embed_dim=128, num_layers=1, vocab_size=64, dtype='float32')
  ids = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), ids))
  flat = {
      '/'.join(str(getattr(k, 'key', k)) for k in path): leaf.shape
      for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
  }
  query = [s for p, s in flat.items() if 'query/kernel' in p]
  assert query and query[0][-2:] == (cfg.num_heads, 128 // cfg.num_heads), flat


@pytest.mark.parametrize('bad_id', [-1, -5, -64, -65, -1000, 64, 10_000])
def test_cross_entropy_out_of_vocab_targets_contribute_zero(bad_id):
  vocab = 64
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, vocab)) * 3
  targets = jnp.array([[1, 2, bad_id, 3, 0], [bad_id, bad_id, 4, 5, 6]], jnp.int32)
  weights = (targets > 0).astype(jnp.float32)
  for smoothing, z_loss in ((0.0, 0.0), (0.1, 1e-4)):
    loss, z = models.cross_entropy(logits, targets, z_loss, smoothing)
    assert np.all(np.isfinite(np.asarray(loss))), (bad_id, loss)
    bad = np.asarray((targets < 0) | (targets >= vocab))
    np.testing.assert_array_equal(np.asarray(loss - z)[bad], 0.0)
    total = jnp.sum(loss * weights)
    assert np.isfinite(float(total))
    # The valid positions are unchanged by the bad ones.
    clean = jnp.where(jnp.asarray(bad), 0, targets)
    ref, _ = models.cross_entropy(logits, clean, z_loss, smoothing)
    np.testing.assert_allclose(np.asarray(loss)[~bad], np.asarray(ref)[~bad], rtol=1e-6)


@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_unpacked_padding_takes_no_part_in_moe_routing(dispatch):
  """Issue 21: an unpacked batch (eval, infer, pack=False) passed no padding mask to the MoE
  layers, so padding counted in the router statistics and losses and took expert capacity.
  Its padding (target 0) is now masked: the statistics equal those of the same rows unpadded,
  and (dropless) the real tokens' logits too."""
  from unimoe_jax.network import UniMoE, UniMoEConfig  # pylint: disable=g-import-not-at-top

  moe = config.MoEConfig(
      num_experts=4, num_experts_per_tok=2, dispatch=dispatch, load_balance_loss_coef=0.01
  )
  model = UniMoE(UniMoEConfig(decoder=config.named('tiny', moe=moe)))
  real = np.random.default_rng(0).integers(3, 90, size=(2, 6)).astype(np.int32)
  padded = np.concatenate([real, np.zeros((2, 10), np.int32)], axis=1)
  batch = lambda t: {'decoder_input_tokens': t, 'decoder_target_tokens': t}
  # Jitted: run op by op, the init and the two forwards compiled ~330 small programs.
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch(padded))['params']
  forward = jax.jit(lambda p, b: model.apply({'params': p}, b))
  logits_padded, aux_padded = forward(params, batch(padded))
  logits_real, aux_real = forward(params, batch(real))
  if dispatch == 'capacity':
    # Capacity comes from the row length (static shapes): the unpadded rows get fewer slots,
    # drop other tokens, and layer 1 sees other inputs. Layer 0's routing must agree.
    np.testing.assert_allclose(
        aux_padded['expert_fraction'][0], aux_real['expert_fraction'][0], rtol=1e-5, atol=1e-7
    )
    return
  for key in ('expert_fraction', 'load_balance_loss', 'router_entropy'):
    np.testing.assert_allclose(aux_padded[key], aux_real[key], rtol=1e-5, atol=1e-7, err_msg=key)
  if dispatch == 'dropless':
    np.testing.assert_allclose(logits_padded[:, :6], logits_real, rtol=1e-5, atol=1e-5)
