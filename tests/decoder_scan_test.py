"""Scanned decoder layers (`DecoderConfig.scan_layers`) against the looped decoder, and the
loop <-> scan parameter converter (`layer_stacking.py`) at every place that reads parameters.

The reference is the looped decoder with the same weights (converted by `to_stacked`):
float32, logits / aux / gradients within 1e-5 relative to each array's largest magnitude.
"""

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax import checkpoints
from unimoe_jax import decoding
from unimoe_jax import layer_stacking
from unimoe_jax.config import LoRAConfig, MoEConfig, named
from unimoe_jax.convert import experts as experts_lib
from unimoe_jax.decoder import Decoder
from unimoe_jax.layers.lora import merge_lora
from unimoe_jax.training import optimizer as optimizer_lib
from unimoe_jax.training import train_state as train_state_lib

RTOL = 1e-5
NUM_LAYERS = 4
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 512)
# Two packed segments and padding in each row.
SEGMENTS = jnp.asarray([[1] * 7 + [2] * 3 + [0] * 2, [1] * 4 + [2] * 8])


def _config(kind, lora, scan=False, **overrides):
  moe = (
      None
      if kind == 'dense'
      else MoEConfig(
          num_experts=4,
          layers=kind,
          gmm_backend='tiled',
          load_balance_loss_coef=0.01,
          router_z_loss_coef=0.001,
      )
  )
  return named(
      'tiny',
      num_layers=NUM_LAYERS,
      moe=moe,
      scan_layers=scan,
      lora=LoRAConfig(rank=4, dropout=0.0) if lora else None,
      **overrides,
  )


def _looped_params(cfg, seed=0):
  params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(seed), TOKENS[:, :4])['params'])
  # LoRA's B starts at zero: perturb every leaf so that every adapter takes part (numpy's
  # draws: jax.random compiled a sampler per leaf shape).
  rng = np.random.RandomState(seed + 1)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(np.asarray(x) + 0.02 * rng.standard_normal(x.shape), x.dtype), params
  )


def _loss_and_grads(cfg, params):
  def loss(params):
    logits, aux = Decoder(cfg).apply({'params': params}, TOKENS, segment_ids=SEGMENTS)
    total = jnp.mean(jnp.square(logits)) + aux.get('aux_loss', 0.0)
    return total, (logits, aux)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _assert_close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(float(np.max(np.abs(want))), 1e-30)
  err = float(np.max(np.abs(got - want))) / scale
  assert err <= RTOL, f'{what}: relative error {err:.3g} > {RTOL}'


# Each layer kind once, LoRA on two of them (all six pairs took 117 s of the suite's time).
@pytest.mark.parametrize('kind,lora', [('dense', True), ('all', False), ('every_other', True)])
def test_scanned_equals_looped(kind, lora):
  looped_cfg = _config(kind, lora)
  scanned_cfg = dataclasses.replace(looped_cfg, scan_layers=True)
  assert scanned_cfg.scan_period() == (2 if kind == 'every_other' else 1)
  params = _looped_params(looped_cfg)
  stacked = layer_stacking.to_config_layout(params, scanned_cfg)
  abstract = jax.eval_shape(Decoder(scanned_cfg).init, jax.random.PRNGKey(0), TOKENS[:, :4])
  assert jax.tree_util.tree_structure(
      nn.meta.unbox(abstract['params'])
  ) == jax.tree_util.tree_structure(stacked)
  (loss_a, (logits_a, aux_a)), grads_a = _loss_and_grads(looped_cfg, params)
  (loss_b, (logits_b, aux_b)), grads_b = _loss_and_grads(scanned_cfg, stacked)
  _assert_close(loss_b, loss_a, 'loss')
  _assert_close(logits_b, logits_a, 'logits')
  assert sorted(aux_a) == sorted(aux_b)
  for key in aux_a:
    _assert_close(aux_b[key], aux_a[key], f'aux {key}')
  grads_b = layer_stacking.to_looped(grads_b)
  flat_a = dict(jax.tree_util.tree_flatten_with_path(grads_a)[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(grads_b)[0])
  assert sorted(map(str, flat_a)) == sorted(map(str, flat_b))
  for path, grad in flat_a.items():
    _assert_close(flat_b[path], grad, f'gradient {jax.tree_util.keystr(path)}')


@pytest.mark.slow
def test_remat_policies_under_scan_give_the_same_gradients():
  cfg = _config('every_other', True, scan=True)
  params = layer_stacking.to_config_layout(_looped_params(_config('every_other', True)), cfg)
  (_, _), reference = _loss_and_grads(cfg, params)
  # 'full' and 'dots_saveable' are the looped decoder's policies too (decoder_test.py, and
  # 'full' runs inside the scan in the 7B files); the new policy is the scan's own concern.
  for policy in ('projections',):
    (_, _), grads = _loss_and_grads(dataclasses.replace(cfg, remat=policy), params)
    for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(grads)):
      _assert_close(b, a, f'remat={policy}')


def _greedy(cfg, params, prompts, new_tokens=6):
  length = max(map(len, prompts)) + new_tokens
  buf = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    buf[i, : len(p)] = p
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  model = Decoder(cfg)

  @jax.jit  # One program: the prefill run op by op compiled ~300 small ones.
  def run(params, buf, lengths):
    cache, index = decoding.prefill_cache(
        model, params, buf[:, : max(map(len, prompts))], lengths, length
    )
    seqs, _ = decoding.greedy_decode(
        buf,
        cache,
        decoding.decoder_tokens_to_logits(model, params),
        eos_id=10_000,
        initial_index=index,
        max_decode_steps=new_tokens,
    )
    return seqs, cache

  seqs, cache = run(params, jnp.asarray(buf), lengths)
  return np.asarray(seqs), cache


@pytest.mark.slow
def test_greedy_decoding_gives_the_same_tokens():
  looped_cfg = _config('every_other', True)
  scanned_cfg = dataclasses.replace(looped_cfg, scan_layers=True)
  params = _looped_params(looped_cfg)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(3, 512, size=n).astype(np.int32) for n in (7, 3)]
  want, _ = _greedy(looped_cfg, params, prompts)
  got, cache = _greedy(scanned_cfg, layer_stacking.to_config_layout(params, scanned_cfg), prompts)
  np.testing.assert_array_equal(got, want)
  # The cache is stacked like the parameters: [num_layers / period, batch, length, ...].
  key = nn.meta.unbox(cache)['stacked_layers']['offset_0']['attention']['cached_key']
  assert key.shape[:2] == (NUM_LAYERS // 2, 2), key.shape


def test_loop_scan_loop_is_bit_exact_and_scan_loop_scan_too():
  cfg = _config('every_other', True)
  params = jax.tree_util.tree_map(np.asarray, _looped_params(cfg))
  stacked = layer_stacking.to_stacked(params, 2)
  leaf = stacked['stacked_layers']['offset_1']['moe']['wi_0']['kernel']
  assert leaf.shape == (NUM_LAYERS // 2, 4, 64, 128)
  np.testing.assert_array_equal(leaf[1], params['layers_3']['moe']['wi_0']['kernel'])
  back = layer_stacking.to_looped(stacked)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(a, b)
  again = layer_stacking.to_stacked(back, 2)
  for a, b in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)
  # Inside a model tree only the 'decoder' subtree changes; the towers' layers_i stay.
  model_tree = {
      'decoder': params,
      'vision_tower': {'layers_0': {'w': np.ones(2)}, 'layers_1': {'w': np.ones(2)}},
  }
  converted = layer_stacking.to_stacked(model_tree, 2)
  assert 'stacked_layers' in converted['decoder']
  assert sorted(converted['vision_tower']) == ['layers_0', 'layers_1']


def test_partial_tree_stacks_whole_leaves_and_names_a_ragged_one():
  params = jax.tree_util.tree_map(np.asarray, _looped_params(_config('all', True)))
  routers = {
      f'layers_{i}': {'moe': {'router': params[f'layers_{i}']['moe']['router']}}
      for i in range(NUM_LAYERS)
  }
  stacked = layer_stacking.to_stacked(routers, 1)
  assert stacked['stacked_layers']['offset_0']['moe']['router'].shape == (NUM_LAYERS, 64, 4)
  with pytest.raises(ValueError, match=r'layers \[2, 3\] into a decoder of 2 layers'):
    layer_stacking.to_stacked(routers, 1, num_layers=2)
  del routers['layers_2']
  with pytest.raises(ValueError, match=r'moe/router: layers \[2\] lack it'):
    layer_stacking.to_stacked(routers, 1, num_layers=NUM_LAYERS)


def test_irregular_moe_layers_fall_back_to_the_loop_with_a_warning(caplog):
  cfg = dataclasses.replace(
      _config('all', False),
      moe=MoEConfig(num_experts=4, layers=(0, 1, 3), gmm_backend='tiled'),
      scan_layers=True,
  )
  assert cfg.scan_period() is None
  with caplog.at_level(logging.WARNING):
    params = Decoder(cfg).init(jax.random.PRNGKey(0), TOKENS[:, :4])['params']
  assert 'layers_3' in params and 'stacked_layers' not in params
  assert 'running the layers as a loop' in caplog.text
  # Periodic patterns scan: MoE on the even layers has period 2 too.
  even = dataclasses.replace(cfg, moe=MoEConfig(num_experts=4, layers=(0, 2)))
  assert even.scan_period() == 2


def test_checkpoint_in_either_layout_restores_into_either_model(tmp_path):
  looped_cfg = _config('every_other', True)
  scanned_cfg = dataclasses.replace(looped_cfg, scan_layers=True)
  params = jax.tree_util.tree_map(np.asarray, _looped_params(looped_cfg))
  written = {'looped': params, 'scanned': layer_stacking.to_config_layout(params, scanned_cfg)}
  mesh = jax.sharding.Mesh(
      np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'expert', 'model')
  )
  # The models' params: only their structure and shapes matter (zeros: a real init compiled
  # ~150 small programs).
  models = {
      id(cfg): {
          'decoder': jax.tree_util.tree_map(
              lambda a: np.zeros(a.shape, a.dtype),
              nn.meta.unbox(
                  jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(5), TOKENS[:, :4])['params']
              ),
          )
      }
      for cfg in (looped_cfg, scanned_cfg)
  }
  for name, tree in written.items():
    # Without the LoRA matrices (a stage-2 checkpoint): they keep their initialisation.
    path = str(tmp_path / name)
    checkpoints.save(path, {'decoder': _drop_lora(tree)}, '')
    loaded, _ = checkpoints.restore(path)
    for cfg in (looped_cfg, scanned_cfg):
      model_params = models[id(cfg)]
      shardings = jax.tree_util.tree_map(
          lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), model_params
      )
      state = train_state_lib.TrainState(step=None, params=model_params, opt_state=None)
      restored, missing = train_state_lib.load_params_into(
          state,
          train_state_lib.TrainState(step=None, params=shardings, opt_state=None),
          loaded,
          path,
      )
      assert missing and all('lora_' in m for m in missing), missing
      got = layer_stacking.to_looped(restored.params)['decoder']
      for key in ('layers_1', 'layers_2'):
        np.testing.assert_array_equal(
            np.asarray(got[key]['attention']['query']['kernel']),
            params[key]['attention']['query']['kernel'],
        )


def _drop_lora(tree):
  if not isinstance(tree, dict):
    return tree
  return {k: _drop_lora(v) for k, v in tree.items() if not k.startswith('lora_')}


def test_trainable_patterns_read_looped_paths_on_stacked_params():
  cfg = _config('every_other', True, scan=True)
  params = {
      'decoder': nn.meta.unbox(
          jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(0), TOKENS[:, :4])['params']
      )
  }
  mask = optimizer_lib.trainable_mask(params, (r'.*/lora_[ab]', r'decoder/layers_\d+/moe/router'))
  stack = mask['decoder']['stacked_layers']
  assert stack['offset_1']['moe']['router'] is True
  assert stack['offset_0']['mlp']['wi_0']['lora_a'] is True
  assert stack['offset_0']['mlp']['wi_0']['kernel'] is False
  assert mask['decoder']['token_embedder']['embedding'] is False
  # The same mask as the looped model's, read through the layout converter.
  looped = optimizer_lib.trainable_mask(
      {'decoder': layer_stacking.to_looped(params['decoder'])},
      (r'.*/lora_[ab]', r'decoder/layers_\d+/moe/router'),
  )
  assert layer_stacking.to_stacked(looped, 2) == mask
  # Layers 1 and 3 share one stacked router: selecting only layer 1 is an error.
  with pytest.raises(ValueError, match='stacked with them'):
    optimizer_lib.trainable_mask(params, (r'decoder/layers_1/moe/router',))
  with pytest.raises(ValueError, match='matches no parameter'):
    optimizer_lib.trainable_mask(params, (r'decoder/layers_9/moe/router',))
  # Weight decay: a stacked norm scale [layers, embed] is not a matrix.
  decay = optimizer_lib.weight_decay_mask(params, ('.*',))
  assert decay['decoder']['stacked_layers']['offset_0']['pre_mlp_norm']['scale'] is False
  assert decay['decoder']['stacked_layers']['offset_0']['mlp']['wi_0']['kernel'] is True


def test_merge_lora_on_stacked_params_equals_looped():
  cfg = _config('every_other', True)
  params = jax.tree_util.tree_map(np.asarray, _looped_params(cfg))
  scale = cfg.lora.scale
  want = merge_lora(params, scale)
  got = merge_lora(layer_stacking.to_stacked(params, 2), scale)
  assert 'stacked_layers' in got
  got = layer_stacking.to_looped(got)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_assemble_experts_reads_scanned_sources():
  cfg = _config('dense', False)
  base = {'decoder': jax.tree_util.tree_map(np.asarray, _looped_params(cfg, seed=0))}
  expert = {'decoder': jax.tree_util.tree_map(np.asarray, _looped_params(cfg, seed=7))}
  want = experts_lib.assemble_experts(base, [base, expert])
  got = experts_lib.assemble_experts(
      layer_stacking.to_stacked(base, 1), [base, layer_stacking.to_stacked(expert, 1)]
  )
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)
