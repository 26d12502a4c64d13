"""The training stack in-process: optimizer, freezing, gradient accumulation, initial
and initial checkpoints. (The loop on a data x expert mesh: training_resume_input_test.py's
two-process test; the same train step on that mesh against one device: partitioning_test.py.)

Runs on the tiny decoder and the synthetic `unimoe_test_lm` task (tests/tiny_tasks.py).
"""

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import tiny_tasks
from unimoe_jax import partitioning
from unimoe_jax.training import loop
from unimoe_jax.training import optimizer as optimizer_lib
from unimoe_jax.training import train_state as train_state_lib

SHAPES = {
    k: (8, 32) for k in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')
}
MLP = r'decoder/layers_.*/mlp/.*'


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _flat(tree):
  return {
      optimizer_lib.path_of(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()
  }


def _paths(tree):
  return {optimizer_lib.path_of(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _abstract(model=None):
  model = model or tiny_tasks.tiny_model()
  return flax.linen.meta.unbox(train_state_lib.abstract_params(model, SHAPES))


def _fixed_batch(seed=0, rows=8, length=32, weighted_per_row=None):
  """A batch of the model format; each row has `weighted_per_row` loss-weighted tokens."""
  rng = np.random.RandomState(seed)
  targets = rng.randint(3, 67, size=(rows, length)).astype(np.int32)
  inputs = np.concatenate([np.zeros((rows, 1), np.int32), targets[:, :-1]], axis=1)
  weights = np.zeros((rows, length), np.float32)
  for r in range(rows):
    n = weighted_per_row or rng.randint(4, length)
    weights[r, length - n :] = 1.0
  return {
      'decoder_input_tokens': inputs,
      'decoder_target_tokens': targets,
      'decoder_loss_weights': weights,
  }


# ---- optimizer ---------------------------------------------------------------------------


def test_trainable_mask_names_a_pattern_that_matches_nothing():
  params = _abstract()
  with pytest.raises(ValueError, match=r"trainable pattern 'decoder/layers_.\*/mlpp/\.\*'"):
    optimizer_lib.trainable_mask(params, (r'decoder/layers_.*/mlpp/.*',))
  with pytest.raises(ValueError, match=r"frozen pattern 'decoder/routr'"):
    optimizer_lib.trainable_mask(params, ('.*',), ('decoder/routr',))
  with pytest.raises(ValueError, match='no parameter is trainable'):
    optimizer_lib.trainable_mask(params, ('.*',), ('.*',))
  mask = _flat(optimizer_lib.trainable_mask(params, (MLP,)))
  assert sum(mask.values()) == 6 and len(mask) == 21
  assert all(v == ('/mlp/' in p) for p, v in mask.items())
  # A frozen pattern wins over a trainable one.
  mask = _flat(optimizer_lib.trainable_mask(params, (MLP,), (r'.*/wo/.*',)))
  assert sorted(p for p, v in mask.items() if v) == [
      f'decoder/layers_{i}/mlp/{w}/kernel' for i in (0, 1) for w in ('wi_0', 'wi_1')
  ]


def test_split_merge_round_trip():
  params = jax.tree_util.tree_map(
      lambda s: np.random.RandomState(0).randn(*s.shape).astype(np.float32), _abstract()
  )
  mask = optimizer_lib.trainable_mask(params, (MLP,), (r'.*layers_1.*',))
  trainable, frozen = optimizer_lib.split_params(params, mask)
  assert sorted(_flat(trainable)) == [
      f'decoder/layers_0/mlp/{w}/kernel' for w in ('wi_0', 'wi_1', 'wo')
  ]
  assert len(_flat(frozen)) == 18
  merged = optimizer_lib.merge_params(trainable, frozen)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
  for path, value in _flat(params).items():
    np.testing.assert_array_equal(_flat(merged)[path], value)


def test_learning_rate_schedule_warmup_then_cosine():
  config = optimizer_lib.OptimizerConfig(
      learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.1
  )
  lr = optimizer_lib.learning_rate_schedule(config, total_steps=110)
  expected = {
      0: 0.0,
      5: 0.5,
      10: 1.0,
      60: 0.1 + 0.9 * 0.5,
      110: 0.1,
      35: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.25)),
  }
  for step, value in expected.items():
    np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6, atol=1e-7, err_msg=str(step))
  # warmup_ratio: 3% of 100 steps; then constant.
  config = optimizer_lib.OptimizerConfig(learning_rate=2.0, schedule='constant')
  lr = optimizer_lib.learning_rate_schedule(config, total_steps=100)
  np.testing.assert_allclose(
      [float(lr(s)) for s in (0, 1, 3, 50, 100)], [0.0, 2.0 / 3, 2.0, 2.0, 2.0], rtol=1e-6
  )
  with pytest.raises(ValueError, match='schedule'):
    optimizer_lib.OptimizerConfig(schedule='linear')


def test_weight_decay_skips_one_dimensional_leaves():
  params = {
      'dense': {'kernel': jnp.ones((3, 4))},
      'norm': {'scale': jnp.ones((4,))},
      'emb': {'embedding': jnp.ones((5, 4))},
  }
  mask = optimizer_lib.weight_decay_mask(params, ('.*',))
  assert mask == {'dense': {'kernel': True}, 'norm': {'scale': False}, 'emb': {'embedding': True}}
  assert optimizer_lib.weight_decay_mask(params, ('dense/.*',))['emb']['embedding'] is False
  # Through the optimizer: zero gradients leave only the decay, -lr * wd * p.
  config = optimizer_lib.OptimizerConfig(
      learning_rate=0.5, warmup_steps=0, schedule='constant', weight_decay=0.1, clip_grad_norm=0.0
  )
  tx, _ = optimizer_lib.make_optimizer(config, 10)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.05, rtol=1e-6)
  np.testing.assert_allclose(updates['emb']['embedding'], -0.05, rtol=1e-6)
  np.testing.assert_array_equal(updates['norm']['scale'], 0.0)


# ---- freezing through the loop -------------------------------------------------------------


def test_frozen_params_stay_bit_identical(tmp_path):
  """Starts from INITIAL_CHECKPOINT_PATH (known values), trains 3 steps of the MLPs only."""
  from unimoe_jax import checkpoints as model_checkpoints  # pylint: disable=g-import-not-at-top

  rng = np.random.RandomState(0)
  before = {
      path: (
          np.ones(s.shape, np.float32)
          if len(s.shape) == 1
          else (0.05 * rng.randn(*s.shape)).astype(np.float32)
      )
      for path, s in _paths(_abstract()).items()
  }
  start = model_checkpoints.save(
      str(tmp_path / 'start'),
      traverse_util.unflatten_dict({tuple(p.split('/')): v for p, v in before.items()}),
      '',
  )
  result = loop.train(
      **tiny_tasks.train_kwargs(
          str(tmp_path / 'run'),
          train_steps=3,
          trainable_patterns=(MLP,),
          initial_checkpoint_path=start,
      )
  )
  assert result['step'] == 3
  after = _flat(result['state'].params)
  trained = sorted(p for p in before if '/mlp/' in p)
  assert len(trained) == 6 and len(before) == 21 and sorted(after) == sorted(before)
  for path in before:
    if path in trained:
      assert np.max(np.abs(after[path] - before[path])) > 1e-3, path
    else:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  # Adam moments exist for the trainable leaves only.
  adam = [
      s
      for s in jax.tree_util.tree_leaves(
          result['state'].opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
      )
      if isinstance(s, optax.ScaleByAdamState)
  ]
  assert len(adam) == 1
  assert sorted(_flat(adam[0].mu)) == trained and sorted(_flat(adam[0].nu)) == trained
  # The loss went down on the learnable data even with attention and embeddings frozen.
  scalars = tiny_tasks.read_scalars(str(tmp_path / 'run'))
  assert sorted(scalars) == [1, 2, 3]
  assert scalars[3]['loss'] < scalars[1]['loss']


# ---- gradient accumulation -----------------------------------------------------------------


@pytest.fixture(scope='module')
def accum_steps():
  """`step(batch, grad_accum_steps) -> (param change by path, metrics)`: one SGD step."""
  model = tiny_tasks.tiny_model()
  tx = optax.sgd(1e3)  # Large: the change dwarfs the fp32 rounding of param + change.
  mask = optimizer_lib.trainable_mask(_abstract(model))
  mesh = partitioning.make_mesh(partitioning.MeshConfig(1, 1, 1), jax.devices()[:1])
  state, _ = train_state_lib.create_train_state(
      model, tx, mask, mesh, jax.random.PRNGKey(0), SHAPES
  )
  schedule = optax.constant_schedule(1.0)
  steps = {
      accum: jax.jit(train_state_lib.make_train_step(model, tx, mask, schedule, accum))
      for accum in (1, 2)
  }
  results = {}

  def step(batch_seed, weighted_per_row, accum):
    key = (batch_seed, weighted_per_row, accum)
    if key not in results:
      batch = _fixed_batch(batch_seed, weighted_per_row=weighted_per_row)
      new, metrics = steps[accum](state, batch, jax.random.PRNGKey(1))
      delta = jax.tree_util.tree_map(
          lambda a, b: np.asarray(a) - np.asarray(b), new.params, state.params
      )
      results[key] = _flat(delta), {k: float(v.compute()) for k, v in metrics.items()}
    return results[key]

  return step


def test_grad_accum_equals_one_step_on_the_whole_batch(accum_steps):
  """Two micro-batches of 4 rows vs one step on all 8, with equal and unequal token counts.

  Each micro-batch loss is its part of the whole batch's loss (models.with_batch_totals: the
  whole batch's normaliser), and the step sums the micro-batch gradients, so it equals the
  full-batch gradient however the loss-weighted tokens fall into micro-batches. Plain SGD
  makes the parameter change proportional to the gradient, so the comparison is a gradient
  comparison (Adam's first step, lr * sign(g), would amplify rounding of tiny gradients).
  """
  uneven = _fixed_batch(1)['decoder_loss_weights']
  assert uneven[:4].sum() != uneven[4:].sum()
  for seed, tokens in ((0, 20), (1, None)):  # 20 weighted tokens per row; then uneven rows.
    full, full_metrics = accum_steps(seed, tokens, 1)
    accum, accum_metrics = accum_steps(seed, tokens, 2)
    for path, value in full.items():
      scale = np.max(np.abs(value))
      assert scale > 0, path
      # fp32: relative to the leaf's largest entry (elementwise rtol fails on near-zero ones).
      np.testing.assert_allclose(
          accum[path], value, rtol=0, atol=1e-5 * scale, err_msg=f'{seed}: {path}'
      )
    for key in (
        'loss',
        'cross_ent_loss',
        'accuracy',
        'grad_norm',
        'num_target_tokens',
        'num_sequences',
    ):
      np.testing.assert_allclose(
          accum_metrics[key], full_metrics[key], rtol=1e-5, err_msg=f'{seed}: {key}'
      )
  _, metrics = accum_steps(0, 20, 1)
  assert metrics['num_target_tokens'] == 160 and metrics['num_sequences'] == 8


def test_grad_accum_reports_per_step_token_counts(accum_steps):
  _, metrics = accum_steps(0, 20, 2)
  assert metrics['num_target_tokens'] == 160 and metrics['num_sequences'] == 8


# ---- initial checkpoints -------------------------------------------------------------------


def test_load_params_into():
  model = tiny_tasks.tiny_model()
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, model=2))
  tx, _ = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(), 10)
  mask = optimizer_lib.trainable_mask(_abstract(model))
  state, shardings = train_state_lib.create_train_state(
      model, tx, mask, mesh, jax.random.PRNGKey(0), SHAPES
  )
  init = _flat(state.params)
  loaded = traverse_util.flatten_dict(jax.device_get(state.params))
  loaded = {k: np.asarray(v) + 1.0 for k, v in loaded.items()}
  kept = ('decoder', 'layers_1', 'mlp', 'wo', 'kernel')
  del loaded[kept]

  new, missing = train_state_lib.load_params_into(
      state, shardings, traverse_util.unflatten_dict(loaded), 'ckpt'
  )
  assert missing == ('decoder/layers_1/mlp/wo/kernel',)
  got = _flat(new.params)
  for path, value in init.items():
    expected = value if path == 'decoder/layers_1/mlp/wo/kernel' else value + 1.0
    np.testing.assert_array_equal(got[path], expected, err_msg=path)
  # Placed on the state's shardings (vocab on 'model').
  emb = new.params['decoder']['token_embedder']['embedding']
  assert emb.sharding == shardings.params['decoder']['token_embedder']['embedding']

  wrong = dict(loaded)
  wrong[('decoder', 'logits_dense', 'kernel')] = np.zeros((64, 500), np.float32)
  with pytest.raises(
      ValueError,
      match=r'wrong shape decoder/logits_dense/kernel: '
      r'checkpoint \(64, 500\) vs model \(64, 512\)',
  ):
    train_state_lib.load_params_into(state, shardings, traverse_util.unflatten_dict(wrong), 'c')
  extra = dict(loaded)
  extra[('decoder', 'layers_0', 'moe', 'router')] = np.zeros((64, 4), np.float32)
  with pytest.raises(ValueError, match='unexpected parameter decoder/layers_0/moe/router'):
    train_state_lib.load_params_into(state, shardings, traverse_util.unflatten_dict(extra), 'c')


def test_place_params_needs_only_shapes_and_dtypes():
  # What eval / infer do: the model's params as ShapeDtypeStructs, no TrainState, no optimizer.
  model = tiny_tasks.tiny_model()
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, model=2))
  boxed = train_state_lib.abstract_params(model, SHAPES)  # With the logical axis names.
  abstract, shardings = flax.linen.meta.unbox(boxed), partitioning.params_shardings(mesh, boxed)
  rng = np.random.default_rng(0)
  loaded = {
      k: rng.standard_normal(v.shape).astype(np.float64)  # Cast to the model's float32.
      for k, v in traverse_util.flatten_dict(abstract).items()
  }
  params, missing = train_state_lib.place_params(
      abstract, shardings, traverse_util.unflatten_dict(loaded), 'ckpt'
  )
  assert missing == ()
  # The vocabulary axis of the embedding sits on 'model' (a real sharding, not replicated).
  assert params['decoder']['token_embedder']['embedding'].sharding.spec[0] == 'model'
  placed = traverse_util.flatten_dict(params)
  flat_shardings = traverse_util.flatten_dict(shardings)
  for key, value in loaded.items():
    assert placed[key].dtype == jnp.float32 and placed[key].sharding == flat_shardings[key], key
    np.testing.assert_array_equal(np.asarray(placed[key]), value.astype(np.float32))
  del loaded[('decoder', 'logits_dense', 'kernel')]
  _, missing = train_state_lib.place_params(
      abstract, shardings, traverse_util.unflatten_dict(loaded), 'ckpt'
  )
  assert missing == ('decoder/logits_dense/kernel',)


@pytest.mark.parametrize('moe, eval_task', [(False, tiny_tasks.TASK_NAME), (True, None)])
def test_routing_report_without_moe_or_eval_mixture_fails_before_training(tmp_path, moe, eval_task):
  model_dir = tmp_path / 'run'
  with pytest.raises(ValueError, match='routing_report needs an MoE model'):
    loop.train(
        **tiny_tasks.train_kwargs(
            str(model_dir), moe=moe, routing_report=True, eval_mixture_or_task_name=eval_task
        )
    )
  assert not model_dir.exists()  # Nothing trained, nothing written.
