"""unimoe_jax.t5x_adapter and gin/t5x/: the t5x contract without t5x, and with it when installed.

t5x is not on PyPI, so most tests replicate what t5x's binaries do with the model (call
forms from t5x's trainer.py / utils.py, the params_axes checks of train_state.py) and parse
the gin files with gin's own parser; the test at the end imports t5x and skips without it
(tests/t5x_binaries_test.py runs t5x's binaries themselves).
"""

import inspect
import io
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.core import frozen_dict
from flax.linen import partitioning as flax_partitioning
from gin import config_parser

from unimoe_jax import config as config_lib
from unimoe_jax import models
from unimoe_jax import partitioning
from unimoe_jax import t5x_adapter as ta
from unimoe_jax.network import UniMoEConfig
from unimoe_jax.training import optimizer as optimizer_lib
from t5x_support import require_t5x

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO, 'gin')
T5X_GIN = sorted(
    os.path.join(d, f)
    for d, _, files in os.walk(os.path.join(GIN_DIR, 't5x'))
    for f in files
    if f.endswith('.gin')
)
B, L = 2, 16
SHAPES = {
    'decoder_input_tokens': (B, L),
    'decoder_target_tokens': (B, L),
    'decoder_loss_weights': (B, L),
    'decoder_segment_ids': (B, L),
    'decoder_positions': (B, L),
}
TYPES = {k: np.int32 for k in SHAPES}
TYPES['decoder_loss_weights'] = np.float32


def tiny_config(moe=True, lora=False) -> UniMoEConfig:
  decoder = config_lib.named(
      'tiny',
      num_layers=1,
      moe=config_lib.MoEConfig(num_experts=4, num_experts_per_tok=2) if moe else None,
      lora=config_lib.LoRAConfig(rank=4, alpha=8.0, dropout=0.0) if lora else None,
  )
  return UniMoEConfig(decoder=decoder)


@pytest.fixture(scope='module')
def model():
  tx = ta.optax_optimizer(
      total_steps=10,
      config=optimizer_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, clip_grad_norm=0.0),
  )
  return ta.T5XUniMoEModel(tiny_config(lora=True), optimizer_def=tx)


def init(model):
  return jax.jit(lambda rng: model.get_initial_variables(rng, SHAPES, TYPES))(jax.random.PRNGKey(0))


@pytest.fixture(scope='module')
def variables(model):
  return init(model)


def text_batch(seed=0):
  rng = np.random.RandomState(seed)
  targets = rng.randint(3, 512, size=(B, L)).astype(np.int32)
  inputs = np.concatenate([np.zeros((B, 1), np.int32), targets[:, :-1]], axis=1)
  weights = np.zeros((B, L), np.float32)
  weights[:, 6:] = 1.0
  return {
      'decoder_input_tokens': jnp.asarray(inputs),
      'decoder_target_tokens': jnp.asarray(targets),
      'decoder_loss_weights': jnp.asarray(weights),
  }


# ---- variables -------------------------------------------------------------------------


def test_initial_variables_are_params_and_params_axes_only(variables):
  assert set(variables) == {'params', 'params_axes'}
  leaves = jax.tree_util.tree_leaves(
      variables['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)  # unboxed


def test_params_axes_cover_every_param_with_the_boxes_names(model, variables):
  boxed = jax.eval_shape(
      lambda: models.UniMoEModel.get_initial_variables(model, jax.random.PRNGKey(0), SHAPES, TYPES)
  )['params']
  boxed_flat = traverse_util.flatten_dict(boxed)
  params_flat = traverse_util.flatten_dict(variables['params'])
  axes_flat = traverse_util.flatten_dict(variables['params_axes'])
  assert len(params_flat) == len(boxed_flat) > 20
  # t5x's layout: '<param>_axes' leaves holding AxisMetadata.
  assert set(axes_flat) == {k[:-1] + (k[-1] + '_axes',) for k in params_flat}
  for key, value in params_flat.items():
    meta = axes_flat[key[:-1] + (key[-1] + '_axes',)]
    assert isinstance(meta, flax_partitioning.AxisMetadata)
    assert tuple(meta.names) == tuple(boxed_flat[key].names), key
    assert len(meta.names) == value.ndim, key
    named = [n for n in meta.names if n is not None]
    assert len(named) == len(set(named)), f'{key}: repeated axis name {meta.names}'
  # What t5x's train_state._validate_params_axes and the partitioner compute.
  names = traverse_util.flatten_dict(
      flax_partitioning.get_axis_names(variables['params_axes']), sep='/'
  )
  assert set(names) == set(traverse_util.flatten_dict(variables['params'], sep='/'))
  # Spot checks of real names.
  assert tuple(names['decoder/token_embedder/embedding']) == ('vocab', 'embed')
  expert_leaves = [k for k, v in names.items() if 'expert' in tuple(v)]
  assert expert_leaves and all('/moe/' in k for k in expert_leaves)


def test_every_axis_name_has_a_partitioning_rule(variables):
  rule_names = {name for name, _ in partitioning.LOGICAL_AXIS_RULES}
  used = {
      n
      for meta in jax.tree_util.tree_leaves(
          variables['params_axes'], is_leaf=lambda x: isinstance(x, flax_partitioning.AxisMetadata)
      )
      for n in meta.names
      if n is not None
  }
  assert used and used <= rule_names, used - rule_names
  t5x_rules = dict(ta.logical_axis_rules())
  assert used <= set(t5x_rules)


def test_split_boxed_params_names_unannotated_params():
  boxed = {
      'a': {'w': nn.LogicallyPartitioned(jnp.ones((2, 3)), ('embed', 'mlp'))},
      'b': jnp.ones(3),
  }
  with pytest.raises(ValueError, match=r"\['b'\]"):
    ta.split_boxed_params(boxed)


def test_logical_axis_rules_restricted_to_t5x_mesh():
  rules = dict(ta.logical_axis_rules())
  assert [n for n, _ in ta.logical_axis_rules()] == [n for n, _ in partitioning.LOGICAL_AXIS_RULES]
  assert rules['activation_batch'] == 'data'  # ('data', 'expert') -> 'data'
  assert rules['expert'] is None  # no 'expert' axis in t5x's mesh
  assert rules['mlp'] == 'model' and rules['embed'] is None
  for target in rules.values():
    targets = target if isinstance(target, tuple) else (target,)
    assert all(t in (None, 'data', 'model') for t in targets)
  # With all three axes nothing changes.
  assert ta.logical_axis_rules(partitioning.MESH_AXES) == partitioning.LOGICAL_AXIS_RULES


# ---- signatures the binaries call --------------------------------------------------------


def _params(fn):
  return list(inspect.signature(fn).parameters.values())


def test_method_signatures_match_t5x_call_forms(model):
  # t5x/utils.py TrainStateInitializer: init_fn.__self__ is the model; keyword call.
  assert model.get_initial_variables.__self__ is model
  sig = inspect.signature(model.get_initial_variables)
  assert list(sig.parameters) == ['rng', 'input_shapes', 'input_types']
  assert sig.parameters['input_types'].default is None
  sig.bind(rng=0, input_shapes={}, input_types=None)
  # trainer.py: value_and_grad(model.loss_fn, has_aux=True)(params, batch, dropout_rng).
  assert [p.name for p in _params(model.loss_fn)] == ['params', 'batch', 'dropout_rng']
  assert [p.name for p in _params(model.eval_fn)] == ['params', 'batch']
  # utils.get_infer_fn: positional (params, batch, rng) when a parameter is named 'rng',
  # else (params, batch).
  for fn in (model.predict_batch, model.predict_batch_with_aux):
    ps = _params(fn)
    assert [p.name for p in ps[:3]] == ['params', 'batch', 'rng'] and ps[2].default is None
    inspect.signature(fn).bind(0, 0, 0)
  kw = inspect.signature(model.predict_batch_with_aux).parameters
  for name, default in (
      ('return_all_decodes', False),
      ('num_decodes', 1),
      ('decoder_params', None),
  ):
    assert kw[name].kind is inspect.Parameter.KEYWORD_ONLY and kw[name].default == default
  ps = _params(model.score_batch)
  assert [p.name for p in ps] == ['params', 'batch', 'return_intermediates']
  assert 'rng' not in inspect.signature(model.score_batch).parameters
  # No scan_layers on the module (t5x would clone it with spmd annotations).
  assert not getattr(model.module, 'scan_layers', False)


def test_feature_converter_binds_modalities():
  config = UniMoEConfig(decoder=config_lib.SIZES['tiny'])
  m = ta.T5XUniMoEModel(config)
  converter = m.FEATURE_CONVERTER_CLS(pack=False)  # eval.py / infer.py form
  assert converter.modalities == () and not converter.pack
  m2 = ta.T5XUniMoEModel(config, feature_modalities=('image', 'audio'))
  converter = m2.FEATURE_CONVERTER_CLS(pack=True, use_custom_packing_ops=False)  # utils.py form
  assert tuple(converter.modalities) == ('image', 'audio') and converter.pack
  assert {'image_features', 'image_mask', 'audio_features', 'audio_feature_mask'} <= set(
      converter.MODEL_FEATURES
  )


@pytest.mark.parametrize('pack', [True, False])
def test_feature_converter_refuses_rows_whose_soft_tokens_differ_from_the_model(pack):
  """t5x's binaries run our feature converter, not our loops: it checks every row against the
  model (network.check_placeholders), the first one while the dataset is built."""
  tf = pytest.importorskip('tensorflow')
  from data_feature_converter_test import IMAGE, dataset, make_example  # pylint: disable=g-import-not-at-top
  from unimoe_jax.encoders import clip  # pylint: disable=g-import-not-at-top

  config = UniMoEConfig(decoder=config_lib.SIZES['tiny'], vision=clip.named('tiny', patch_size=16))
  assert config.num_soft_tokens('image') == 4  # (32 px / 16 px)^2 patches
  converter = ta.T5XUniMoEModel(config, feature_modalities=('image',)).FEATURE_CONVERTER_CLS(
      pack=pack
  )
  lengths = {'targets': 16, 'image_features': 2}

  def example(placeholders):
    targets = [1, 5] + [IMAGE] * placeholders + [6, 2]
    return make_example(0, targets, [0.0] * (len(targets) - 1) + [1.0], image_items=[(0, 0)])

  rows = list(converter(dataset([example(4)] * 2, ('image',)), lengths).as_numpy_iterator())
  assert sum(int((r['decoder_input_tokens'] == IMAGE).sum()) for r in rows) == 8
  with pytest.raises(tf.errors.OpError, match=r"num_soft_tokens\('image'\) = 4"):
    converter(dataset([example(3)], ('image',)), lengths)  # The probe reads the first row.
  later = converter(dataset([example(4), example(4), example(3)], ('image',)), lengths)
  with pytest.raises(tf.errors.OpError, match='3 image placeholder tokens'):
    list(later.as_numpy_iterator())


# ---- a mini t5x trainer ----------------------------------------------------------------


def _merge_metrics(a, b):
  from clu import metrics as clu_metrics  # t5x/metrics.py is_metric_obj

  return jax.tree_util.tree_map(
      lambda x, y: x.merge(y), a, b, is_leaf=lambda x: isinstance(x, clu_metrics.Metric)
  )


@pytest.mark.slow  # one MoE + LoRA value_and_grad compile: ~40-80 s on the shared 2 cores
def test_fake_trainer_steps_reduce_loss(model, variables):
  """t5x/trainer.py's calls: value_and_grad(model.loss_fn, has_aux=True)(params, batch, rng),
  the optimizer from model.optimizer_def's optax transformation, metrics merged with
  tree_map(merge, is_leaf=Metric); then model.eval_fn(params, batch)."""
  from clu import metrics as clu_metrics

  tx = model.optax_transformation
  params = variables['params']
  opt_state = jax.jit(tx.init)(params)  # Jitted: op by op, ~250 small compiles with eval_fn.
  batch = text_batch()
  grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)

  @jax.jit
  def step(params, opt_state, rng):
    (loss, metrics), grads = grad_fn(params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  merged, losses = None, []
  for i in range(5):
    params, opt_state, loss, metrics = step(params, opt_state, jax.random.PRNGKey(i))
    assert all(isinstance(v, clu_metrics.Metric) for v in metrics.values())
    merged = metrics if merged is None else _merge_metrics(merged, metrics)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses
  # 'loss' averages the five step losses (tolerance: float32 sums).
  np.testing.assert_allclose(float(merged['loss'].compute()), np.mean(losses), rtol=1e-5)
  eval_loss, eval_metrics = jax.jit(model.eval_fn)(params, batch)
  np.testing.assert_allclose(float(eval_metrics['loss'].compute()), float(eval_loss), rtol=1e-6)


def test_optimizer_freezes_by_pattern_and_states_are_t5x_partitionable(variables):
  params = variables['params']
  tx = ta.optax_optimizer(
      total_steps=10,
      trainable_patterns=(r'.*/lora_[ab]',),
      config=optimizer_lib.OptimizerConfig(learning_rate=0.1, warmup_steps=0),
  )
  state = jax.jit(tx.init)(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  flat = traverse_util.flatten_dict(updates, sep='/')
  lora = [k for k in flat if k.rsplit('/', 1)[-1] in ('lora_a', 'lora_b')]
  assert lora and len(lora) < len(flat)
  for k, u in flat.items():
    moved = float(jnp.max(jnp.abs(u)))
    assert (moved > 0) == (k in lora), k
  # Adam moments exist for the LoRA matrices only.
  moment_leaves = [x for x in jax.tree_util.tree_leaves(state) if getattr(x, 'ndim', 0) >= 1]
  lora_size = sum(flat[k].size for k in lora)
  assert sum(x.size for x in moment_leaves) == 2 * lora_size
  # Every optax state type is one t5x's OptaxStatePartitionRules handles (t5x/optimizers.py).
  t5x_known = {
      'EmptyState',
      'ScaleByAdamState',
      'ScaleByScheduleState',
      'MaskedState',
      'MultiTransformState',
      'InjectHyperparamsState',
      'MultiStepsState',
      'ApplyIfFiniteState',
      'TraceState',
      'ZeroNansState',
  }

  def state_types(s, out):
    if isinstance(s, tuple) and hasattr(s, '_fields'):
      out.add(type(s).__name__)
    if isinstance(s, (tuple, list)):
      for x in s:
        state_types(x, out)
    elif isinstance(s, dict):
      for x in s.values():
        state_types(x, out)
    return out

  found = state_types(state, set())
  found |= state_types(jax.eval_shape(ta.optax_optimizer(total_steps=10).init, params), set())
  found.discard('MaskedNode')
  assert found and found <= t5x_known, found - t5x_known


def test_learning_rate_fn_is_the_optimizer_schedule():
  """The schedule t5x's trainer logs is the one optax applies: with Adam, a constant gradient
  moves each weight by exactly the learning rate of that step (bias-corrected moments)."""
  cfg = optimizer_lib.OptimizerConfig(
      learning_rate=1e-3, warmup_steps=2, clip_grad_norm=0.0, eps=1e-12
  )
  sched = ta.learning_rate_fn(total_steps=10, config=cfg)
  tx = ta.optax_optimizer(total_steps=10, config=cfg)
  params = {'w': jnp.zeros((3,))}
  state = tx.init(params)
  applied = []
  for _ in range(6):
    updates, state = tx.update({'w': jnp.ones((3,))}, state, params)
    applied.append(-float(updates['w'][0]))
  expected = [float(sched(i)) for i in range(6)]
  assert expected[0] == 0.0 and expected[2] == pytest.approx(1e-3)
  # rtol: Adam's float32 moments and eps.
  np.testing.assert_allclose(applied, expected, rtol=1e-4, atol=1e-12)


def test_score_batch_intermediates_have_batch_axis(model, variables):
  batch = text_batch(1)

  @jax.jit
  def run(params):
    return (
        model.score_batch(params, batch),
        model.score_batch(params, batch, return_intermediates=True),
        models.UniMoEModel.score_batch(model, params, batch),
    )

  scores, (scores2, inter), base = run(variables['params'])
  assert scores.shape == (B,)
  np.testing.assert_allclose(np.asarray(scores), np.asarray(base), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(scores2), np.asarray(scores), rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(inter['decoder']['token_scores'][0]).sum(-1), np.asarray(scores), rtol=1e-5
  )
  for leaf in jax.tree_util.tree_leaves(inter):
    assert leaf.shape[0] == B  # t5x.infer indexes every leaf with x[non_pad_idxs]


@pytest.mark.parametrize('method', ['greedy', 'sample', 'beam'])
def test_predict_num_decodes_and_all_decodes_follow_t5x(method):
  """t5x's contract: `num_decodes` beams or samples; with `return_all_decodes` decodes
  `[batch, n, length]` and scores `[batch, n]` in increasing score order, the best last,
  which is what `return_all_decodes=False` returns."""
  m = ta.T5XUniMoEModel(
      tiny_config(moe=False), max_decode_steps=4, decode_method=method, temperature=1.0
  )
  v = init(m)
  batch, rng, n = text_batch(3), jax.random.PRNGKey(2), 3
  all_decodes, all_aux = m.predict_batch_with_aux(
      v['params'], batch, rng, num_decodes=n, return_all_decodes=True
  )
  best, aux = m.predict_batch_with_aux(v['params'], batch, rng, num_decodes=n)
  assert all_decodes.shape == (B, n, L) and all_aux['scores'].shape == (B, n)
  scores = np.asarray(all_aux['scores'])
  assert np.all(np.diff(scores, axis=-1) >= 0), scores
  np.testing.assert_array_equal(np.asarray(best), np.asarray(all_decodes)[:, -1])
  np.testing.assert_allclose(np.asarray(aux['scores']), scores[:, -1], rtol=1e-6)
  decodes = np.asarray(all_decodes)
  assert np.any(decodes[:, :, 0] > 0)  # Something was generated.
  if method == 'greedy':  # One answer, repeated.
    assert (decodes == decodes[:, :1]).all()
  elif method == 'sample':  # Temperature 1 on a random model: the samples differ.
    assert not (decodes == decodes[:, :1]).all()
  with pytest.raises(ValueError, match='num_decodes'):
    m.predict_batch_with_aux(v['params'], batch, rng, num_decodes=0)


def test_initial_variables_are_a_frozen_dict(variables):
  assert isinstance(variables, frozen_dict.FrozenDict)  # t5x's as_logical_axes needs it


def test_predict_accepts_decode_rng_in_decoder_params(variables):
  m = ta.T5XUniMoEModel(tiny_config(moe=False), max_decode_steps=3)
  v = init(m)
  batch = text_batch(2)
  decodes, aux = m.predict_batch_with_aux(
      v['params'], batch, decoder_params={'decode_rng': jax.random.PRNGKey(1)}
  )
  ref, _ = m.predict_batch_with_aux(v['params'], batch, jax.random.PRNGKey(1))
  assert decodes.shape == (B, L) and aux['scores'].shape == (B,)
  np.testing.assert_array_equal(np.asarray(decodes), np.asarray(ref))
  with pytest.raises(ValueError, match='either'):
    m.predict_batch_with_aux(
        v['params'],
        batch,
        jax.random.PRNGKey(1),
        decoder_params={'decode_rng': jax.random.PRNGKey(1)},
    )
  with pytest.raises(ValueError, match='topk'):
    m.predict_batch_with_aux(v['params'], batch, decoder_params={'topk': 4})


def test_optimizer_def_is_optax_until_t5x_reads_it(model):
  assert isinstance(model.optax_transformation, optax.GradientTransformation)
  assert ta.T5XUniMoEModel(tiny_config(moe=False)).optimizer_def is None


# ---- gin/t5x without t5x ---------------------------------------------------------------


class _Recorder(config_parser.ParserDelegate):

  def __init__(self):
    self.references = []

  def configurable_reference(self, scoped_name, evaluate):
    self.references.append(scoped_name)
    return ('@', scoped_name, evaluate)

  def macro(self, name):
    return ('%', name)


def _statements(path):
  recorder = _Recorder()
  with open(path) as f:
    statements = list(config_parser.ConfigParser(io.StringIO(f.read()), recorder))
  return statements, recorder.references


def _is_t5x(module: str) -> bool:
  # unimoe_jax.t5x_moe subclasses t5x's trainer, so it imports only where t5x does.
  return module.split('.')[0] in ('t5x', '__main__', 'seqio') or module == 'unimoe_jax.t5x_moe'


def test_gin_t5x_files_parse_and_name_real_project_objects():
  """Every gin/t5x file parses with gin's parser; its includes exist (project ones here, t5x
  ones under t5x/configs/); and every binding or reference to a unimoe_jax object names a
  real attribute and parameter. Names from t5x itself are checked by the t5x tests below."""
  assert {os.path.relpath(p, GIN_DIR) for p in T5X_GIN} == {
      't5x/model.gin',
      't5x/partitioner.gin',
      't5x/models/tiny.gin',
      't5x/models/unimoe_tiny.gin',
      't5x/models/unimoe_7b.gin',
      't5x/models/unimoe_7b_4e.gin',
      't5x/models/unimoe_7b_8e.gin',
      't5x/stages/stage1_align.gin',
      't5x/stages/stage2_expert.gin',
      't5x/stages/stage3_unimoe.gin',
      't5x/runs/train.gin',
      't5x/runs/eval.gin',
      't5x/runs/infer.gin',
  }
  for path in T5X_GIN:
    statements, references = _statements(path)
    aliases = {}
    for st in statements:
      if isinstance(st, config_parser.ImportStatement):
        if st.module == '__gin__.dynamic_registration':
          continue
        alias = st.alias or st.module.rsplit('.', 1)[-1]
        if not _is_t5x(st.module):
          aliases[alias] = __import__(st.module, fromlist=['_'])
        else:
          aliases[alias] = None
      elif isinstance(st, config_parser.IncludeStatement):
        if st.filename.startswith('t5x/configs/'):
          continue
        assert os.path.isfile(os.path.join(GIN_DIR, st.filename)), (path, st.filename)
    if any(isinstance(st, config_parser.ImportStatement) for st in statements):
      assert 'dynamic_registration' in open(path).read(), path
    selectors = [
        st.selector + '.' + st.arg_name
        for st in statements
        if isinstance(st, config_parser.BindingStatement)
        and st.selector
        and st.selector != 'gin.macro'
    ]
    selectors += [r.split('/')[-1] + '.' for r in references if '.' in r]
    for sel in selectors:
      parts = sel.split('.')
      alias, attr, param = parts[0], parts[1], parts[2] if len(parts) > 2 else ''
      if alias not in aliases:
        continue  # a macro (gin.macro) or a non-dotted name
      module = aliases[alias]
      if module is None:
        continue  # t5x / __main__ object
      obj = getattr(module, attr)  # AttributeError names a missing object
      if param:
        fn = obj.__init__ if inspect.isclass(obj) else obj
        sig = inspect.signature(getattr(fn, '__wrapped__', fn))
        assert param in sig.parameters, (path, sel)


def test_model_gin_builds_model_without_t5x():
  """gin/t5x/models/unimoe_tiny.gin needs no t5x: parse it for real, build MODEL and init."""
  import seqio
  import tensorflow as tf

  vocab = seqio.PassThroughVocabulary(size=512, eos_id=2)
  name = 't5x_adapter_test_task'
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files: tf.data.Dataset.from_tensors({'targets': [3, 4]}),
            splits=['train'],
        ),
        output_features={'targets': seqio.Feature(vocab)},
    )
  gin.clear_config()
  try:
    gin.add_config_file_search_path(GIN_DIR)
    gin.parse_config_files_and_bindings(
        [os.path.join(GIN_DIR, 't5x/models/unimoe_tiny.gin')],
        [f"MIXTURE_OR_TASK_NAME = '{name}'", 'MIXTURE_OR_TASK_MODULE = None'],
        finalize_config=False,
    )
    model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert isinstance(model, ta.T5XUniMoEModel)
  cfg = model.config
  assert cfg.decoder.num_layers == 2 and cfg.decoder.moe.num_experts == 4
  assert set(cfg.modalities) == {'image', 'video', 'speech', 'audio'}
  assert model.optimizer_def is None
  assert model.output_vocabulary is vocab  # the task's own vocabulary
  assert set(model.FEATURE_CONVERTER_CLS(pack=False).modalities) == set(cfg.modalities)
  shapes = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), SHAPES, TYPES))
  names = traverse_util.flatten_dict(shapes['params'], sep='/')
  assert any(k.startswith('vision_tower/') for k in names)
  assert set(
      traverse_util.flatten_dict(flax_partitioning.get_axis_names(shapes['params_axes']), sep='/')
  ) == set(names)


# ---- with t5x ----------------------------------------------------------------------------


def test_t5x_train_state_partitions_params_and_optimizer(model):
  require_t5x()
  from t5x import partitioning as t5x_partitioning
  from t5x import train_state as t5x_train_state

  variables = jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), SHAPES, TYPES)
  )
  state = t5x_train_state.FlaxOptimTrainState.create(model.optimizer_def, variables)
  axes = state.as_logical_axes()
  partitioner = t5x_partitioning.PjitPartitioner(
      num_partitions=1, logical_axis_rules=ta.logical_axis_rules()
  )
  partitioner.get_mesh_axes(state)
  assert tuple(axes.params['decoder']['token_embedder']['embedding']) == ('vocab', 'embed')


def test_t5x_moe_partitioner_puts_experts_and_their_adam_moments_on_expert():
  """t5x's MoE partitioner on the 8 test devices (data=2, expert=4) with our axis rules:
  expert kernels and their Adam moments are split over `expert`, the batch over both."""
  require_t5x()
  from t5x import train_state as t5x_train_state
  from unimoe_jax import t5x_moe

  tx = ta.optax_optimizer(total_steps=10)
  model = ta.T5XUniMoEModel(tiny_config(lora=False), optimizer_def=tx)
  variables = jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), SHAPES, TYPES)
  )
  state = t5x_train_state.FlaxOptimTrainState.create(model.optimizer_def, variables)
  partitioner = t5x_moe.MoePartitioner(
      num_expert_partitions=4,
      num_partitions=1,
      mesh_config=partitioning.MeshConfig(expert=4),
      logical_axis_rules=ta.logical_axis_rules(partitioning.MESH_AXES),
  )
  assert dict(partitioner.mesh.shape) == {'data': 2, 'expert': 4, 'model': 1}
  specs = partitioner.get_mesh_axes(state)
  kernel = specs.params['decoder']['layers_0']['moe']['wi_0']['kernel']
  assert tuple(kernel) == ('expert', None, 'model'), kernel
  moments = [
      s
      for path, s in traverse_util.flatten_dict(
          frozen_dict.unfreeze(specs.state_dict()['state']), sep='/'
      ).items()
      if path.endswith('layers_0/moe/wi_0/kernel')
  ]
  assert len(moments) == 2 and all(tuple(m) == ('expert', None, 'model') for m in moments)
  assert tuple(partitioner.data_partition_spec) == (('expert', 'data'),)
