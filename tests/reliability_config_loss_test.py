"""Issue 21 bugs read in the code: a derived head_dim that stuck through dataclasses.replace, and
a loss that gathered at negative (placeholder) target ids."""

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
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
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
