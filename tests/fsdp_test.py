"""FSDP: `partitioning.logical_axis_rules.fsdp = True` shards parameters and optimizer state.

On the 8 test devices (data=2 x expert=4, and data=8): where every parameter kind goes, the gin
switch reaching our trainer's and t5x's rules (t5x's MoE partitioner too where t5x is
installed), the error for a size the mesh does not divide, per-device bytes of the train
state, the 7B gin files (FSDP and scan on, every parameter divides their 32-chip mesh, the
per-chip bytes they quote), loss and gradients equal to one device's (loop and scanned
decoder), and the compiled HLO of a scanned decoder all-gathering one layer's weights at a
time, with a negative control and the temporaries against depth.
"""

import dataclasses
import re
import time

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from partitioning_test import masked_loss_fn, sample_batch
from unimoe_jax import config as config_lib
from unimoe_jax import partitioning
from unimoe_jax.decoder import Decoder

FSDP = partitioning.FSDP_LOGICAL_AXIS_RULES
PLAIN = partitioning.LOGICAL_AXIS_RULES
MESHES = {
    'data2_expert4': partitioning.MeshConfig(data=2, expert=4),
    'data8': partitioning.MeshConfig(data=8),
}


def has_scan() -> bool:
  return 'scan_layers' in {f.name for f in dataclasses.fields(config_lib.DecoderConfig)}


def decoder_config(scan=False, num_layers=4, moe_layers='every_other', lora=True, **kw):
  """tiny (embed 64, mlp 128, 4 heads / 2 kv heads, vocab 512), 4-expert top-2 dropless MoE
  FFNs on `moe_layers`, LoRA r=4 (no dropout) on attention, mlp and experts."""
  moe = config_lib.MoEConfig(
      num_experts=4,
      num_experts_per_tok=2,
      dispatch='dropless',
      layers=moe_layers,
      load_balance_loss_coef=0.01,
      router_z_loss_coef=0.001,
  )
  lora_cfg = config_lib.LoRAConfig(rank=4, alpha=8.0, dropout=0.0) if lora else None
  if scan:
    if not has_scan():
      pytest.skip('DecoderConfig has no scan_layers yet')
    kw['scan_layers'] = True
  return config_lib.named('tiny', num_layers=num_layers, moe=moe, lora=lora_cfg, **kw)


def abstract_variables(cfg, batch=2, length=8):
  return jax.eval_shape(
      lambda: Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((batch, length), jnp.int32))
  )


def flat(tree):
  return traverse_util.flatten_dict(nn.meta.unbox(tree), sep='/')


# ---- the rules ----------------------------------------------------------------------------

DP = ('data', 'expert')
# Path suffix -> mesh axes under the FSDP rules (the tiny loop decoder, MoE on layer 1).
WANT = {
    'token_embedder/embedding': ('model', DP),
    'logits_dense/kernel': (DP, 'model'),
    'decoder_norm/scale': (None,),
    'layers_0/pre_attention_norm/scale': (None,),
    'layers_0/attention/query/kernel': (DP, 'model', None),
    'layers_0/attention/key/kernel': (DP, 'model', None),
    'layers_0/attention/out/kernel': ('model', None, DP),
    'layers_0/attention/query/lora_a': (DP, None),
    'layers_0/attention/query/lora_b': (None, 'model', None),  # No 'embed' axis: replicated.
    'layers_0/attention/out/lora_a': ('model', None, None),
    'layers_0/attention/out/lora_b': (None, DP),
    'layers_0/mlp/wi_0/kernel': (DP, 'model'),
    'layers_0/mlp/wo/kernel': ('model', DP),
    'layers_1/moe/router': (DP, None),
    # Expert weights: 'expert' takes the expert axis first, 'embed' falls back to data.
    'layers_1/moe/wi_0/kernel': ('expert', 'data', 'model'),
    'layers_1/moe/wo/kernel': ('expert', 'model', 'data'),
    'layers_1/moe/wi_1/lora_a': ('expert', 'data', None),
    'layers_1/moe/wi_1/lora_b': ('expert', None, 'model'),
    'layers_1/moe/wo/lora_b': ('expert', None, 'data'),
}


def test_fsdp_rules_place_every_parameter_kind():
  cfg = decoder_config(num_layers=2)
  abstract = abstract_variables(cfg)
  mesh = partitioning.make_mesh(MESHES['data2_expert4'])
  specs = {
      k: tuple(v.spec)
      for k, v in flat(partitioning.params_shardings(mesh, abstract, FSDP)['params']).items()
  }
  for path, want in WANT.items():
    assert specs[path] == want, (path, specs[path])
  # Every parameter with an 'embed' axis is split on it; no other axis ever takes 'data'.
  names = traverse_util.flatten_dict(nn.get_partition_spec(abstract)['params'], sep='/')
  for path, spec in specs.items():
    logical = tuple(names[path])
    for name, axes in zip(logical, spec):
      on_data = axes == 'data' or (isinstance(axes, tuple) and 'data' in axes)
      assert on_data == (name == 'embed'), (path, logical, spec)
  # The plain rules: the same placement with 'embed' replicated.
  plain = {
      k: tuple(v.spec)
      for k, v in flat(partitioning.params_shardings(mesh, abstract, PLAIN)['params']).items()
  }
  for path, spec in specs.items():
    want = tuple(None if names[path][i] == 'embed' else a for i, a in enumerate(spec))
    assert plain[path] == want, (path, plain[path], want)
  # Rules: the stacked axis of scanned layers is replicated; activations are unchanged.
  for rules in (FSDP, PLAIN):
    assert nn.logical_to_mesh_axes(('layers', 'embed', 'mlp'), rules)[0] is None
    assert nn.logical_to_mesh_axes(
        ('activation_batch', 'activation_length', 'activation_embed'), rules
    ) == jax.sharding.PartitionSpec(DP, None, None)


def test_gin_switch_reaches_every_caller_and_t5x_rules():
  from unimoe_jax import t5x_adapter as ta  # pylint: disable=g-import-not-at-top

  mesh = partitioning.make_mesh(MESHES['data8'])
  abstract = abstract_variables(decoder_config(num_layers=2))
  kernel = 'layers_0/attention/query/kernel'
  assert partitioning.logical_axis_rules() == PLAIN
  assert flat(partitioning.params_shardings(mesh, abstract)['params'])[kernel].spec[0] is None
  gin.clear_config()
  try:
    gin.parse_config('partitioning.logical_axis_rules.fsdp = True')
    assert partitioning.logical_axis_rules() == FSDP
    # Callers that pass no rules read the switch at call time.
    assert flat(partitioning.params_shardings(mesh, abstract)['params'])[kernel].spec[0] == DP
    with partitioning.mesh_context(mesh):
      assert tuple(nn.get_logical_axis_rules()) == FSDP
    # t5x's partitioner gets the same rules (gin/t5x/partitioner.gin: all three mesh axes),
    # or on t5x's plain (data, model) mesh the 'expert' part dropped.
    assert ta.logical_axis_rules(partitioning.MESH_AXES) == FSDP
    two_axes = ta.logical_axis_rules()
    assert [t for n, t in two_axes if n == 'embed'] == ['data', 'data']
    assert dict(two_axes)['expert'] is None
  finally:
    gin.clear_config()
  assert partitioning.logical_axis_rules() == PLAIN
  assert ('embed', None) in ta.logical_axis_rules()


def test_indivisible_embed_names_the_parameter():
  """embed_dim 36 on data=8: jax cannot split it; the error names parameters and sizes.
  (2 heads of 18: rotary embeddings need an even head_dim.)"""
  cfg = config_lib.named('tiny', embed_dim=36, num_heads=2, num_layers=1)
  abstract = abstract_variables(cfg)
  mesh = partitioning.make_mesh(MESHES['data8'])
  partitioning.params_shardings(mesh, abstract, PLAIN)  # Fine without FSDP.
  with pytest.raises(ValueError) as info:
    partitioning.params_shardings(mesh, abstract, FSDP)
  message = str(info.value)
  assert "['params']['token_embedder']['embedding']: shape (512, 36)" in message, message
  assert 'dimension 1 (36) is not divisible by the 8 devices of' in message
  assert "['params']['layers_0']['mlp']['wi_0']['kernel']" in message
  assert 'norm' not in message  # Norm scales are replicated: not a problem.


def test_t5x_moe_partitioner_with_fsdp_splits_weights_and_adam_moments():
  """t5x's MoE partitioner (gin/t5x/partitioner.gin's rules, gin switch on) on data=2 x
  expert=4: expert kernels and their Adam moments on expert x data, attention on data x
  expert. Needs t5x (skipped without it, as in tests/t5x_adapter_test.py)."""
  from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top
  from t5x_support import require_t5x  # pylint: disable=g-import-not-at-top

  require_t5x()
  from t5x import train_state as t5x_train_state  # pylint: disable=g-import-not-at-top
  from unimoe_jax import t5x_adapter as ta  # pylint: disable=g-import-not-at-top
  from unimoe_jax import t5x_moe  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoEConfig  # pylint: disable=g-import-not-at-top

  model = ta.T5XUniMoEModel(
      UniMoEConfig(decoder=decoder_config(num_layers=2, lora=False)),
      optimizer_def=ta.optax_optimizer(total_steps=10),
  )
  shapes = {
      k: (8, 8) for k in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')
  }
  variables = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
  state = t5x_train_state.FlaxOptimTrainState.create(model.optimizer_def, variables)
  gin.clear_config()
  try:
    gin.parse_config('partitioning.logical_axis_rules.fsdp = True')
    partitioner = t5x_moe.MoePartitioner(
        num_expert_partitions=4,
        num_partitions=1,
        mesh_config=MESHES['data2_expert4'],
        logical_axis_rules=ta.logical_axis_rules(partitioning.MESH_AXES),
    )
  finally:
    gin.clear_config()
  specs = partitioner.get_mesh_axes(state)
  layers = specs.params['decoder']
  assert tuple(layers['layers_1']['moe']['wi_0']['kernel']) == ('expert', 'data', 'model')
  assert tuple(layers['layers_1']['moe']['wo']['kernel']) == ('expert', 'model', 'data')
  assert tuple(layers['layers_0']['attention']['query']['kernel']) == (DP, 'model', None)
  assert tuple(layers['token_embedder']['embedding']) == ('model', DP)
  moments = [
      tuple(v)
      for path, v in traverse_util.flatten_dict(
          frozen_dict.unfreeze(specs.state_dict()['state']), sep='/'
      ).items()
      if path.endswith('layers_1/moe/wi_0/kernel')
  ]
  assert moments == [('expert', 'data', 'model')] * 2, moments


# ---- per-device bytes -----------------------------------------------------------------------


def _state_bytes(fsdp, mesh_config):
  """Per-device bytes of (params, optimizer state) of the abstract train state."""
  from unimoe_jax import models  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoEConfig  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import train_state as train_state_lib  # pylint: disable=g-import-not-at-top

  model = models.UniMoEModel(UniMoEConfig(decoder=decoder_config(num_layers=2)))
  shapes = {
      k: (8, 8) for k in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')
  }
  boxed = train_state_lib.abstract_params(model, shapes)
  mask = optimizer_lib.trainable_mask(nn.meta.unbox(boxed), ('.*',))
  tx, _ = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(), 10)
  mesh = partitioning.make_mesh(mesh_config)
  with gin.unlock_config():
    gin.clear_config()
    gin.bind_parameter('partitioning.logical_axis_rules.fsdp', fsdp)
    try:
      state, _ = train_state_lib.create_train_state(
          model, tx, mask, mesh, jax.random.PRNGKey(0), shapes, abstract_only=True
      )
    finally:
      gin.clear_config()

  def per_device(tree):
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
        for x in jax.tree_util.tree_leaves(tree)
    )

  names = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep='/')
  sizes = {k: int(np.prod(v.shape)) for k, v in flat(boxed).items()}
  return per_device(state.params), per_device(state.opt_state), names, sizes


def test_train_state_bytes_per_device_with_and_without_fsdp():
  """data=8: with FSDP each device holds 1/8 of every parameter with an 'embed' axis and of
  its two Adam moments; without it, everything whole (float32: 4 bytes)."""
  params_on, opt_on, names, sizes = _state_bytes(True, MESHES['data8'])
  params_off, opt_off, _, _ = _state_bytes(False, MESHES['data8'])
  total = sum(sizes.values())
  embed = sum(s for k, s in sizes.items() if 'embed' in tuple(names[k]))
  assert embed > 0.95 * total  # Only norms and some lora_a / lora_b lack 'embed'.
  assert params_off == 4 * total
  assert params_on == 4 * ((total - embed) + embed // 8)
  # Adam's mu and nu follow their parameters (plus a few scalar counters: <= 64 bytes).
  assert 0 <= opt_on - 2 * params_on <= 64
  assert 0 <= opt_off - 2 * params_off <= 64
  print(
      f'\ntiny MoE+LoRA, data=8: params {params_off} -> {params_on} bytes/device, '
      f'Adam state {opt_off} -> {opt_on}'
  )


def _per_device_bytes_on(mesh_config, abstract, rules):
  """Per-device bytes of a boxed abstract tree on a mesh of `mesh_config`'s sizes, from the
  rules alone (no devices needed); raises if a sharded dimension does not divide."""
  sizes = dict(
      zip(partitioning.MESH_AXES, (mesh_config.data, mesh_config.expert, mesh_config.model))
  )
  total = 0
  for leaf in jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    shape = list(leaf.value.shape)
    for dim, entry in enumerate(partitioning.logical_to_mesh_spec(leaf.names, rules)):
      parts = int(np.prod([sizes[a] for a in partitioning._mesh_axes_of(entry)] or [1]))  # pylint: disable=protected-access
      assert shape[dim] % parts == 0, (leaf.names, leaf.value.shape, entry)
      shape[dim] //= parts
    total += int(np.prod(shape)) * leaf.value.dtype.itemsize
  return total


@pytest.mark.parametrize('experts', [4, 8])
def test_7b_files_turn_on_fsdp_and_scan_and_divide_their_mesh(experts):
  """gin/models/unimoe_7b_{4e,8e}.gin: FSDP and scanned layers on; every parameter of the
  full multimodal model (towers too) divides the file's 32-chip mesh; the decoder's
  per-chip bytes are the figures the files quote (tools/plan_memory.py)."""
  import unimoe_jax  # pylint: disable=g-import-not-at-top
  from unimoe_jax import models  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoEConfig  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  try:
    for path in unimoe_jax.gin_search_paths():
      gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(
        [f'models/unimoe_7b_{experts}e.gin', 'models/multimodal.gin'], []
    )
    rules = partitioning.logical_axis_rules()
    model_config = gin.query_parameter('%MODEL_CONFIG').scoped_configurable_fn()
    mesh_config = gin.query_parameter('%MESH').scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert rules == FSDP and model_config.decoder.scan_layers
  assert model_config.decoder.moe.num_experts == experts
  assert mesh_config.data * mesh_config.expert * mesh_config.model == 32
  shapes = {
      k: (16, 64) for k in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')
  }

  def abstract(config):
    return jax.eval_shape(
        lambda: models.UniMoEModel(config).get_initial_variables(jax.random.PRNGKey(0), shapes)
    )['params']

  _per_device_bytes_on(mesh_config, abstract(model_config), FSDP)  # Every parameter divides.
  decoder = abstract(UniMoEConfig(decoder=model_config.decoder))
  on = _per_device_bytes_on(mesh_config, decoder, FSDP)
  off = _per_device_bytes_on(mesh_config, decoder, PLAIN)
  # tools/plan_memory.py --gin_file=models/unimoe_7b_{4e,8e}.gin [--no_fsdp], all 32 layers.
  assert (on, off) == {4: (2_496_151_552, 13_534_117_888), 8: (4_663_689_216, 13_536_215_040)}[
      experts
  ], (on, off)


# ---- loss and gradients (batch and loss of tests/partitioning_test.py) ----------------------


@pytest.mark.slow  # One 8-device and one 1-device value_and_grad compile each: ~20-60 s.
# Scanned layers, as the 7B files run them (the looped decoder's FSDP step agreed as well when
# this test also ran it: 20 s a case, dropped to keep the suite within its time).
@pytest.mark.parametrize('scan', [True], ids=['scan'])
# The expert x data mesh holds FSDP and expert sharding at once (data8 alone: 14-26 s more).
@pytest.mark.parametrize('mesh_name', ['data2_expert4'])
def test_fsdp_loss_and_grads_equal_single_device(mesh_name, scan):
  assert jax.device_count() == 8, 'conftest.py should give 8 host devices'
  cfg = decoder_config(scan=scan)
  model = Decoder(cfg)
  batch = sample_batch()
  init = lambda key: model.init(key, jnp.asarray(batch['decoder_input_tokens']))
  grad_fn = jax.value_and_grad(masked_loss_fn(model), has_aux=True)
  mesh = partitioning.make_mesh(MESHES[mesh_name])
  variables, shardings = partitioning.init_sharded(init, mesh, jax.random.PRNGKey(0), rules=FSDP)
  # Non-zero adapters, so that lora_a gets a gradient too.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 if p[-1].key == 'lora_b' else v, variables['params']
  )
  params = jax.device_put(params, shardings['params'])
  names = traverse_util.flatten_dict(
      nn.get_partition_spec(jax.eval_shape(init, jax.random.PRNGKey(0)))['params'], sep='/'
  )
  data = dict(mesh.shape)['data']
  split = 0
  for path, leaf in traverse_util.flatten_dict(params, sep='/').items():
    logical = tuple(names[path])
    if 'embed' in logical:  # Really stored split: at least `data` ways on 'embed'.
      dim = logical.index('embed')
      shard = leaf.addressable_shards[0].data.shape[dim]
      assert shard * data <= leaf.shape[dim], (path, leaf.shape, leaf.sharding.spec)
      split += 1
  assert split > 10

  batch_sharding = partitioning.logical_sharding(mesh, ('activation_batch', None), FSDP)
  sharded_batch = jax.device_put(batch, batch_sharding)
  started = time.time()
  with partitioning.mesh_context(mesh, FSDP):
    (loss, aux), grads = jax.jit(grad_fn, out_shardings=(None, shardings['params']))(
        params, sharded_batch
    )
  sharded_s = time.time() - started
  host_params = jax.tree_util.tree_map(np.asarray, params)
  (ref_loss, ref_aux), ref_grads = jax.jit(grad_fn)(host_params, batch)
  print(
      f'\n{mesh_name} {"scan" if scan else "loop"}: loss {float(loss):.6f} (1 device '
      f'{float(ref_loss):.6f}); sharded compile+run {sharded_s:.1f} s'
  )
  # float32 throughout: loss to rtol 1e-5; gradients to 1e-4 of each leaf's largest entry.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(aux['aux_loss'], ref_aux['aux_loss'], rtol=1e-5)
  assert float(ref_aux['aux_loss']) > 0
  flat_grads = traverse_util.flatten_dict(grads, sep='/')
  flat_ref = traverse_util.flatten_dict(ref_grads, sep='/')
  assert set(flat_grads) == set(flat_ref)
  flat_shardings = flat(shardings['params'])
  for path, g in flat_grads.items():
    assert g.sharding.spec == flat_shardings[path].spec, path  # Gradients stay split too.
    r = flat_ref[path]
    assert float(np.abs(r).max()) > 0, path  # Every parameter gets a gradient.
    np.testing.assert_allclose(
        np.asarray(g), r, rtol=1e-4, atol=1e-6 + 1e-4 * float(np.abs(r).max()), err_msg=path
    )


# ---- the compiled program: one layer's weights at a time ----------------------------------

_DTYPE_BYTES = {
    'pred': 1,
    's8': 1,
    'u8': 1,
    's16': 2,
    'u16': 2,
    'f16': 2,
    'bf16': 2,
    's32': 4,
    'u32': 4,
    'f32': 4,
    's64': 8,
    'u64': 8,
    'f64': 8,
}
_SHAPE = re.compile(r'\b(pred|[suf]\d+|bf16)\[([\d,]*)\]')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$')
_CALLED = re.compile(
    r'\b(?:body|condition|to_apply|calls|true_computation|false_computation)' r'=%([\w.\-]+)'
)
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')


def parse_hlo(hlo: str, op: str = 'all-gather'):
  """(`op`s, computations inside a while loop) of a compiled module's text.

  Each op is (computation, [(dtype, dims)] of its output, bytes of its output), `op` an HLO
  collective ('all-gather', 'all-reduce', 'reduce-scatter').
  A computation is inside a loop when a while's body (or condition) reaches it by calls.
  """
  computation, calls, bodies, gathers = None, {}, set(), []
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      computation = header.group(1)
      calls.setdefault(computation, set())
      continue
    if computation is None or '=' not in line:
      continue
    called = set(_CALLED.findall(line))
    for group in _BRANCHES.findall(line):
      called |= {c.strip().lstrip('%') for c in group.split(',') if c.strip()}
    calls[computation] |= called
    if re.search(r'\bwhile\(', line):
      bodies |= called
    found = re.search(r'=\s*(.+?)\s+' + op + r'(-start)?\(', line)
    if found:
      shapes = [
          (d, tuple(int(x) for x in dims.split(',') if x))
          for d, dims in _SHAPE.findall(found.group(1))
      ]
      if found.group(2) and op == 'all-gather':  # Its async start's output: operands, results.
        shapes = shapes[len(shapes) // 2 :]
      size = sum(_DTYPE_BYTES[d] * int(np.prod(dims, dtype=np.int64)) for d, dims in shapes)
      gathers.append((computation, shapes, size))
  in_loop, todo = set(), list(bodies)
  while todo:
    name = todo.pop()
    if name not in in_loop:
      in_loop.add(name)
      todo.extend(calls.get(name, ()))
  return gathers, in_loop


def _hlo_case(case, num_layers, mesh_name):
  """(config, mesh) of the HLO tests: 'dense' (SwiGLU FFNs) or 'moe' (every FFN 4-expert
  dropless), scanned, full remat (as the 7B files), no LoRA."""
  cfg = decoder_config(scan=True, num_layers=num_layers, moe_layers='all', lora=False, remat='full')
  if case == 'dense':
    cfg = dataclasses.replace(cfg, moe=None)
  return cfg, partitioning.make_mesh(MESHES[mesh_name])


def compile_grad(cfg, mesh, rules=FSDP, gather_everything_first=False):
  """Compiles value_and_grad of the tiny loss for abstract sharded params and batch.

  `gather_everything_first`: the negative control, a program that all-gathers every weight
  whole (the stacks included) before the decoder runs.
  """
  model = Decoder(cfg)
  batch = sample_batch()
  init = lambda key: model.init(key, jnp.asarray(batch['decoder_input_tokens']))
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = partitioning.params_shardings(mesh, abstract, rules)
  params = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.meta.unbox(abstract),
      shardings,
  )['params']
  rows = partitioning.logical_sharding(mesh, ('activation_batch', None), rules)
  args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in batch.items()}
  loss_fn = masked_loss_fn(model)
  if gather_everything_first:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    inner = loss_fn
    loss_fn = lambda p, b: inner(jax.lax.with_sharding_constraint(p, replicated), b)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  with partitioning.mesh_context(mesh, rules):
    compiled = (
        jax.jit(grad_fn, out_shardings=(None, shardings['params'])).lower(params, args).compile()
    )
  return compiled, abstract, shardings


def one_layer_at_a_time_violations(compiled, abstract, shardings, mesh, num_layers):
  """What breaks 'all-gathers carry one layer's weights at a time', as a list of strings.

  (1) An all-gather (or a gradient's all-reduce / reduce-scatter) whose output is larger
  than one layer's weights. (2) A stacked weight with an 'embed' axis with no all-gather of
  its one-layer slice (per-device, after the gather) inside a while loop. (3) An all-gather
  with as many elements as a stacked weight whole, or its gathered per-device share of all
  layers. Also returns the numbers printed.
  """
  gathers, in_loop = parse_hlo(compiled.as_text())
  leaves = flat(abstract)
  stacked = {k: v for k, v in leaves.items() if k.startswith('params/stacked_layers/')}
  assert stacked, 'the decoder did not scan'
  names = traverse_util.flatten_dict(nn.get_partition_spec(abstract), sep='/')
  specs = flat(shardings)
  sizes = dict(mesh.shape)
  layer_bytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in stacked.values())
  layer_bytes //= num_layers  # scan_period() is 1 here: one scan step is one layer.
  largest = max(size for _, _, size in gathers)
  in_loop_counts = {
      int(np.prod(dims)) for c, shapes, _ in gathers if c in in_loop for _, dims in shapes
  }
  out = []
  if largest > layer_bytes:
    out.append(f"an all-gather of {largest} bytes > one layer's weights ({layer_bytes})")
  for path, leaf in stacked.items():
    logical = tuple(names[path])
    if 'embed' not in logical:
      continue
    # One layer's slice, split on every mesh axis of its spec except those of 'embed'.
    spec = specs[path].spec
    kept = [
        a
        for i, entry in enumerate(spec)
        if logical[i] != 'embed'
        for a in partitioning._mesh_axes_of(entry)
    ]  # pylint: disable=protected-access
    gathered = int(np.prod(leaf.shape[1:])) // int(np.prod([sizes[a] for a in kept] or [1]))
    if gathered not in in_loop_counts:
      out.append(f'{path} {leaf.shape} {spec}: no all-gather of {gathered} elements in a loop')
    whole = int(np.prod(leaf.shape))
    for _, shapes, _ in gathers:
      if any(int(np.prod(d)) in (whole, gathered * num_layers) for _, d in shapes):
        out.append(f'{path} {leaf.shape}: gathered whole as {shapes}')
  # Gradients: XLA:CPU reduces them with all-reduce + slice (TPU / GPU passes turn that into
  # reduce-scatter); either way one layer's at a time.
  hlo = compiled.as_text()
  reductions = [
      size for op in ('all-reduce', 'reduce-scatter') for _, _, size in parse_hlo(hlo, op)[0]
  ]
  largest_reduction = max(reductions, default=0)
  if largest_reduction > layer_bytes:
    out.append(f"a gradient reduction of {largest_reduction} bytes > one layer's weights")
  stats = {
      'gathers': len(gathers),
      'in_loop': sum(c in in_loop for c, _, _ in gathers),
      'largest': largest,
      'largest_reduction': largest_reduction,
      'layer_bytes': layer_bytes,
      'checked': sum('embed' in tuple(names[k]) for k in stacked),
  }
  return out, stats


# An 8-device compile of a 6-layer scanned decoder (two for dense): 7-10 s each on 2 cores.
@pytest.mark.parametrize('case,mesh_name', [('dense', 'data8'), ('moe', 'data2_expert4')])
def test_scanned_fsdp_all_gathers_one_layer_at_a_time(case, mesh_name):
  """No all-gather carries more than one layer's weights: every stacked weight with an
  'embed' axis is all-gathered inside the layer loop, one layer's slice at a time (its
  per-device gathered size), and no all-gather anywhere holds a stacked weight whole.
  Negative control: the same check fails on a program that gathers every weight first."""
  # 6 layers: no stacked weight then has as many elements as another array of the program
  # (8 would make the stacked attention kernels [8, 64, 64] the size of the [64, 512] head).
  num_layers = 6
  cfg, mesh = _hlo_case(case, num_layers, mesh_name)
  compiled, abstract, shardings = compile_grad(cfg, mesh)
  violations, stats = one_layer_at_a_time_violations(
      compiled, abstract, shardings, mesh, num_layers
  )
  print(f'\n{case} on {mesh_name}: {stats}')
  assert not violations, violations
  assert stats['checked'] >= 6 and stats['in_loop'] >= stats['checked']
  if case == 'dense':  # The negative control (one more compile).
    compiled, _, _ = compile_grad(cfg, mesh, gather_everything_first=True)
    violations, stats = one_layer_at_a_time_violations(
        compiled, abstract, shardings, mesh, num_layers
    )
    print(f'gathering everything first: {stats}; {len(violations)} violations')
    assert any('> one layer' in v for v in violations), violations
    assert any('gathered whole' in v for v in violations), violations
