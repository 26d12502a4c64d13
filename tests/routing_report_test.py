"""Routing fractions per task (training/routing_report.py): the counting on a hand-built router
output, the token groups, and the choices the MoE layers sow, unrolled and scanned."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from unimoe_jax import layer_stacking
from unimoe_jax.config import MoEConfig, named
from unimoe_jax.decoder import Decoder
from unimoe_jax.moe import routing
from unimoe_jax.training import routing_report


def test_fractions_of_a_hand_built_router_output():
  # 2 MoE layers, 1 row of 5 positions, top-2 of 4 experts. Positions 0-1 media, 2-3 text,
  # 4 padding (in neither group).
  indices = np.array(
      [[[[0, 1], [0, 2], [3, 1], [3, 0], [2, 2]]], [[[1, 2], [1, 2], [0, 3], [0, 3], [1, 1]]]]
  )
  groups = {
      'media': np.array([[True, True, False, False, False]]),
      'text': np.array([[False, False, True, True, False]]),
  }
  counts = routing_report.count_choices(indices, groups, num_experts=4)
  # Layer 0 media: choices 0, 1, 0, 2 -> expert 0 twice, 1 once, 2 once, 3 never.
  np.testing.assert_array_equal(counts['media'], [[2, 1, 1, 0], [0, 2, 2, 0]])
  np.testing.assert_array_equal(counts['text'], [[1, 1, 0, 2], [2, 0, 0, 2]])
  fractions = routing_report.fractions(counts)
  np.testing.assert_allclose(fractions['media'], [[0.5, 0.25, 0.25, 0], [0, 0.5, 0.5, 0]])
  np.testing.assert_allclose(fractions['text'], [[0.25, 0.25, 0, 0.5], [0.5, 0, 0, 0.5]])

  # Summed over two batches, then normalised; an empty group is NaN, not "never routed".
  total = {}
  routing_report.add_counts(total, counts)
  routing_report.add_counts(total, counts)
  np.testing.assert_array_equal(total['media'], 2 * counts['media'])
  empty = routing_report.fractions({'media': np.zeros((2, 4), np.int64)})['media']
  assert np.isnan(empty).all()
  as_json = routing_report.to_json({'task': counts})
  assert as_json['task']['media']['fractions'][0] == [0.5, 0.25, 0.25, 0.0]
  assert as_json['task']['text']['counts'] == [[1, 1, 0, 2], [2, 0, 0, 2]]

  with pytest.raises(ValueError, match='mask shape'):
    routing_report.count_choices(indices, {'text': np.ones((1, 4), bool)}, 4)


def test_token_groups_split_media_text_and_padding():
  batch = {
      'decoder_input_tokens': np.array([[1, -1, -1, 7, 8, 0, 0]]),
      'decoder_target_tokens': np.array([[-1, -1, 7, 8, 2, 0, 0]]),
  }
  groups = routing_report.token_groups(batch)
  np.testing.assert_array_equal(groups['media'], [[0, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(groups['text'], [[1, 0, 0, 1, 1, 0, 0]])


@pytest.mark.parametrize('layers,scan', [('odd', True)])  # The looped reference runs too.
def test_sown_choices_are_the_top_k_of_each_layer_router(layers, scan):
  """The sown choices equal top-k of the router logits recomputed from the layer's input
  (captured separately), and a scanned decoder sows what the looped one does."""
  cfg = named(
      'tiny',
      num_layers=4,
      scan_layers=scan,
      moe=MoEConfig(num_experts=4, layers=layers, gmm_backend='tiled'),
  )
  looped_cfg = named('tiny', num_layers=4, moe=cfg.moe)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 1, 512)
  params = nn.meta.unbox(Decoder(looped_cfg).init(jax.random.PRNGKey(1), tokens)['params'])
  _, sown = Decoder(looped_cfg).apply({'params': params}, tokens, mutable=['intermediates'])
  looped = routing_report.router_choices(sown['intermediates'])
  assert looped.shape == (len(cfg.moe_layer_indices()), 2, 9, 2)

  # Reference: capture each MoE layer's input (the pre-MLP norm's output) and redo the router.
  _, captured = Decoder(looped_cfg).apply(
      {'params': params},
      tokens,
      capture_intermediates=lambda m, _: m.name == 'pre_mlp_norm',
      mutable=['intermediates'],
  )
  for row, layer in enumerate(cfg.moe_layer_indices()):
    x = captured['intermediates'][f'layers_{layer}']['pre_mlp_norm']['__call__'][0]
    logits = np.einsum(
        'bld,de->ble',
        np.asarray(x, np.float32),
        np.asarray(params[f'layers_{layer}']['moe']['router']),
    )
    _, want = routing.top_k_routing(logits.reshape(-1, 4), 2)
    np.testing.assert_array_equal(
        np.sort(looped[row].reshape(-1, 2), -1), np.sort(np.asarray(want), -1)
    )

  if scan:
    stacked = layer_stacking.to_stacked(params, cfg.scan_period())
    _, sown = Decoder(cfg).apply({'params': stacked}, tokens, mutable=['intermediates'])
    np.testing.assert_array_equal(
        routing_report.router_choices(sown['intermediates'], cfg.scan_period()), looped
    )


def test_router_choices_names_a_model_without_moe():
  with pytest.raises(ValueError, match='no router_indices'):
    routing_report.router_choices({'decoder': {'layers_0': {}}})
