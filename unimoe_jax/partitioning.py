"""The one place that knows about the device mesh.

Every parameter and key activation in the model carries *logical* axis names ('embed', 'mlp',
'expert', 'activation_batch', ...). This module maps them to the three mesh axes

    data    data parallelism (batch)
    expert  expert parallelism (the leading axis of stacked expert weights)
    model   tensor parallelism (heads, mlp, vocab)

and builds the mesh. Nothing else in the code base names a mesh axis.

Two rule sets, chosen by the gin switch `partitioning.logical_axis_rules.fsdp`, and any rule
replaced from gin with `partitioning.logical_axis_rules.overrides`:

- `LOGICAL_AXIS_RULES` (fsdp=False, the default): parameters are split on `expert` (expert
  weights) and `model` (heads, mlp, vocab) only, and replicated over `data`.
- `FSDP_LOGICAL_AXIS_RULES` (fsdp=True): fully sharded data parallelism (MaxText's `fsdp`) on
  top of that. The parameter axis 'embed' is split over `data` x `expert` (every device that
  holds a slice of the batch) and, in expert weights, whose `expert` mesh axis is already
  taken by their 'expert' axis, over `data` alone. Parameters and their optimizer moments
  (optax moments carry the same logical names) are stored 1/(data x expert) or 1/data per
  device; XLA all-gathers a weight where a layer uses it and reduce-scatters its gradient.
  With scanned layers (`DecoderConfig.scan_layers`, stacked on the replicated 'layers' axis)
  that is one layer's slice per scan step (tests/fsdp_test.py reads the compiled HLO); the
  expert-parallel `shard_map` (moe/expert_parallel.py) takes expert weights whole over
  `data`, so each layer gathers its own experts' data shards on entry. Norm scales ('norm')
  and the small LoRA matrices without an 'embed' axis stay replicated over `data`;
  activations keep 'activation_embed' -> None.

Every caller that does not pass `rules` reads `logical_axis_rules()` at call time, so one gin
binding switches our trainer, evaluator, inference, tools/plan_memory.py and (through
`t5x_adapter.logical_axis_rules`) t5x's partitioner. A dimension whose size the mesh axes do
not divide is an error naming the parameter (`params_shardings`): jax cannot place uneven
shards, and quietly replicating a large weight would defeat the plan.

Outside the expert layers the batch is split over `data` *and* `expert` (as in GShard and
MaxText): devices on the expert axis would otherwise repeat the attention work. Inside the
capacity-based MoE layer, dispatched tokens `[expert, groups, capacity, embed]` put experts on
`expert` and groups on `data`, so XLA moves tokens with an all-to-all.
"""

import contextlib
import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'expert', 'model')

Rules = Tuple[Tuple[str, Any], ...]

# The logical axes of per-head activations `[batch, length, heads, head_dim]`: the queries and
# the attention output of every attention (the decoder's, the towers', the connectors'); the
# encoder towers' keys and values too (head_dim is never split). The decoder's grouped-query
# keys and values have their own heads: KV_HEAD_AXES.
HEAD_AXES = ('activation_batch', 'activation_length', 'activation_heads', None)
KV_HEAD_AXES = ('activation_batch', 'activation_length', 'activation_kv_heads', None)

# (logical axis, mesh axis or axes or None). flax assigns rules in this order (a priority list):
# where one array has two names whose rules want the same mesh axis, the earlier rule wins and
# the later name takes its next rule that is still free, else stays replicated.
LOGICAL_AXIS_RULES: Tuple[Tuple[str, Any], ...] = (
    # Activations.
    ('activation_batch', ('data', 'expert')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'model'),
    ('activation_kv_heads', 'model'),
    ('activation_mlp', 'model'),
    ('activation_vocab', 'model'),
    ('activation_exp', 'expert'),  # The expert axis of dispatched tokens.
    ('activation_group', 'data'),  # Routing groups once experts hold the `expert` axis.
    ('activation_capacity', None),
    # Parameters.
    ('vocab', 'model'),
    ('embed', None),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv_heads', 'model'),
    ('head_dim', None),
    ('expert', 'expert'),
    ('expert_router', None),  # The router's output axis is tiny: replicate it.
    ('lora_rank', None),
    ('norm', None),
    ('query_tokens', None),  # Learned query tokens of the Q-Former: few rows, replicated.
    ('layers', None),  # The stacking axis of scanned layers (DecoderConfig.scan_layers).
    # The decoding KV cache (layers/attention.py).
    ('cache_batch', ('data', 'expert')),
    ('cache_length', None),
    ('cache_kv_heads', 'model'),
    ('cache_head_dim', None),
)


def _fsdp_rules(rules: Rules) -> Rules:
  """`rules` with the parameter axis 'embed' split over data x expert, else over data.

  The two 'embed' rules go right after the 'expert' rule: flax assigns rules in order, so an
  expert weight `[expert, embed, mlp]` has `expert` taken by the time 'embed' is placed and
  falls through to `data`; a weight without an 'expert' axis takes data x expert.
  """
  out = []
  for name, target in rules:
    if name == 'embed':
      continue
    out.append((name, target))
    if name == 'expert':
      out += [('embed', ('data', 'expert')), ('embed', 'data')]
  if len(out) != len(rules) + 1:
    raise ValueError("FSDP rules need exactly one 'embed' and one 'expert' rule")
  return tuple(out)


FSDP_LOGICAL_AXIS_RULES: Rules = _fsdp_rules(LOGICAL_AXIS_RULES)


def override_rules(rules: Rules, overrides: Sequence[Tuple[str, Any]]) -> Rules:
  """`rules` with each (logical axis, mesh axes) of `overrides` replacing every rule of that
  logical axis, at the place of its first one (flax reads the rules in order), or appended
  when `rules` has none. Mesh axes: None, one of MESH_AXES, or a sequence of them."""
  out = list(rules)
  for entry in overrides:
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(
          f'partitioning.logical_axis_rules.overrides: {entry!r} is not a pair '
          "(logical axis name, mesh axes), e.g. ('activation_length', 'model')"
      )
    name, target = entry
    if isinstance(target, (list, tuple)):
      target = tuple(target)
    unknown = [
        a
        for a in (target if isinstance(target, tuple) else (target,))
        if a is not None and a not in MESH_AXES
    ]
    if unknown:
      raise ValueError(
          f'partitioning.logical_axis_rules.overrides: {name!r} -> {target!r} names mesh '
          f'axes {unknown} that are not among {MESH_AXES}'
      )
    places = [i for i, (rule_name, _) in enumerate(out) if rule_name == name]
    if places:
      out[places[0]] = (name, target)
      out = [rule for i, rule in enumerate(out) if i not in places[1:]]
    else:
      out.append((name, target))
  return tuple(out)


@gin.configurable
def logical_axis_rules(fsdp: bool = False, overrides: Sequence[Tuple[str, Any]] = ()) -> Rules:
  """The logical-to-mesh axis rules in force: `FSDP_LOGICAL_AXIS_RULES` with `fsdp`, else
  `LOGICAL_AXIS_RULES`, then `overrides` (`override_rules`). Bind
  `partitioning.logical_axis_rules.fsdp = True` in gin (the 7B model files do) to shard
  parameters and optimizer state over the batch axes, and for example
  `partitioning.logical_axis_rules.overrides = [('activation_length', 'model')]` to change one
  rule without copying the table."""
  rules = FSDP_LOGICAL_AXIS_RULES if fsdp else LOGICAL_AXIS_RULES
  return override_rules(rules, overrides) if overrides else rules


def _rules(rules: Optional[Rules]) -> Rules:
  return logical_axis_rules() if rules is None else rules


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; -1 on one axis takes the devices left over (like t5x's `model_parallel_submesh`).

  With the default every device is on `data`.
  """

  data: int = -1
  expert: int = 1
  model: int = 1

  def shape(self, num_devices: int) -> Tuple[int, int, int]:
    dims = [self.data, self.expert, self.model]
    if dims.count(-1) > 1:
      raise ValueError(f'MeshConfig: at most one axis may be -1, got {dims}')
    known = int(np.prod([d for d in dims if d != -1]))
    if any(d == 0 or d < -1 for d in dims) or num_devices % known:
      raise ValueError(
          f'MeshConfig(data={self.data}, expert={self.expert}, model={self.model}) '
          f'does not divide the {num_devices} available devices'
      )
    dims = [num_devices // known if d == -1 else d for d in dims]
    if int(np.prod(dims)) != num_devices:
      raise ValueError(
          f'MeshConfig(data={self.data}, expert={self.expert}, model={self.model}) '
          f'uses {int(np.prod(dims))} devices but {num_devices} are available'
      )
    return tuple(dims)


def make_mesh(
    config: Optional[MeshConfig] = None, devices: Optional[Sequence[jax.Device]] = None
) -> Mesh:
  """Builds the ('data', 'expert', 'model') mesh over `devices` (default: all devices)."""
  config = config or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def logical_to_mesh_spec(
    logical_axes: Sequence[Optional[str]], rules: Optional[Rules] = None
) -> PartitionSpec:
  return nn.logical_to_mesh_axes(tuple(logical_axes), _rules(rules))


def logical_sharding(
    mesh: Mesh, logical_axes: Sequence[Optional[str]], rules: Optional[Rules] = None
) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, rules))


def batch_sharding(mesh: Mesh, ndim: int, rules: Optional[Rules] = None) -> NamedSharding:
  """Sharding of a batch array of rank `ndim`: rows split like 'activation_batch'."""
  spec = logical_to_mesh_spec(('activation_batch',), rules)
  return NamedSharding(mesh, PartitionSpec(*spec, *([None] * (ndim - 1))))


def _mesh_axes_of(entry) -> Tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def check_divisible(abstract_variables, shardings) -> None:
  """Raises a ValueError naming every parameter whose sharded dimension the mesh does not
  divide (its path, shape, logical axes and mesh axes), where jax would only report an
  `IndivisibleError` for an anonymous array."""
  logical = nn.get_partition_spec(abstract_variables)
  values = nn.meta.unbox(abstract_variables)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  flat_logical = dict(jax.tree_util.tree_flatten_with_path(logical, is_leaf=is_spec)[0])
  flat_shardings = dict(jax.tree_util.tree_flatten_with_path(shardings)[0])
  problems, mesh_shape = [], None
  for path, value in jax.tree_util.tree_flatten_with_path(values)[0]:
    sharding = flat_shardings.get(path)
    if not isinstance(sharding, NamedSharding) or not hasattr(value, 'shape'):
      continue
    sizes = dict(sharding.mesh.shape)
    for dim, (size, entry) in enumerate(zip(value.shape, sharding.spec)):
      axes = _mesh_axes_of(entry)
      parts = int(np.prod([sizes[a] for a in axes])) if axes else 1
      if size % parts:
        mesh_shape = dict(sizes)
        names = tuple(flat_logical.get(path, PartitionSpec()))
        problems.append(
            f'{jax.tree_util.keystr(path)}: shape {tuple(value.shape)}, logical axes {names}, '
            f'mesh axes {tuple(sharding.spec)}: dimension {dim} ({size}) is not divisible by '
            f'the {parts} devices of {axes}'
        )
  if problems:
    raise ValueError(
        'parameters cannot be split evenly over the mesh '
        f'{mesh_shape} (with '
        "partitioning.logical_axis_rules.fsdp = True, 'embed' is split over data x expert, "
        'or data for expert weights: choose a MESH whose axes divide it, or turn FSDP off):\n  '
        + '\n  '.join(problems)
    )


def params_shardings(mesh: Mesh, abstract_variables, rules: Optional[Rules] = None):
  """NamedShardings for a (boxed) variable tree, e.g. from `jax.eval_shape(model.init, ...)`.

  Raises a ValueError naming each parameter whose sharded dimension the mesh does not divide.
  """
  logical_specs = nn.get_partition_spec(abstract_variables)
  shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, _rules(rules))
  check_divisible(abstract_variables, shardings)
  return shardings


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args, rules: Optional[Rules] = None):
  """Runs `init_fn(*args)` under jit so that each variable is created on its own shards.

  `init_fn` returns a flax variable tree whose leaves may be `nn.LogicallyPartitioned` boxes.
  Returns `(variables, shardings)` with the boxes removed; no variable is ever materialised
  whole on one device.
  """
  rules = _rules(rules)
  abstract = jax.eval_shape(init_fn, *args)
  shardings = params_shardings(mesh, abstract, rules)

  def unboxed_init(*a):
    return nn.meta.unbox(init_fn(*a))

  with mesh_context(mesh, rules):
    variables = jax.jit(unboxed_init, out_shardings=shardings)(*args)
  return variables, shardings


def with_sharding_constraint(x, logical_axes: Sequence[Optional[str]]):
  """Constrains an activation by logical axes; a no-op outside a mesh / rules context."""
  return nn.with_logical_constraint(x, tuple(logical_axes))


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Optional[Rules] = None):
  """Makes `mesh` current and activates the logical axis rules (default: those in force,
  `logical_axis_rules()`), for tracing and running.

  Uses `jax.set_mesh` where this jax has it (the `with mesh:` form is deprecated there).
  """
  rules = _rules(rules)
  mesh_cm = jax.set_mesh(mesh) if hasattr(jax, 'set_mesh') else mesh
  with mesh_cm, nn.logical_axis_rules(rules):
    yield mesh


@dataclasses.dataclass(frozen=True)
class ExpertParallelAxes:
  """Mesh axes that the expert-parallel MoE path maps over (see moe/expert_parallel.py)."""

  mesh: Any
  batch: Tuple[str, ...]  # Mesh axes of the token batch.
  expert: str  # Mesh axis of the expert dimension of expert weights.
  model: Optional[str]  # Mesh axis of the expert `mlp` dimension, if it is split.


def _legacy_context_mesh() -> Optional[Mesh]:
  """The mesh of a `with mesh:` block, which `get_abstract_mesh` does not see.

  t5x's partitioner runs every partitioned function inside `with mesh:` (and
  `flax.linen.partitioning.axis_rules`), so under t5x's binaries this is how the MoE layer
  learns that experts are split. jax has no public getter for it; t5x reads the same state.
  """
  try:
    from jax._src import mesh as jax_mesh  # pylint: disable=g-import-not-at-top

    return jax_mesh.thread_resources.env.physical_mesh
  except (ImportError, AttributeError):
    return None


def expert_parallel_axes() -> Optional[ExpertParallelAxes]:
  """The active mesh's axes for expert parallelism, or None when experts are not split.

  Reads the mesh set by `mesh_context` (or `jax.set_mesh`, or t5x's `with mesh:`) and the
  active logical axis rules, so the MoE layer never names a mesh axis itself.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    mesh = _legacy_context_mesh()
  if mesh is None or mesh.empty:
    return None
  rules = nn.get_logical_axis_rules()
  if not rules:
    return None

  def axes_of(name):
    spec = nn.logical_to_mesh_axes((name,), rules)[0]
    if spec is None:
      return ()
    return tuple(spec) if isinstance(spec, (tuple, list)) else (spec,)

  sizes = dict(mesh.shape)
  expert = axes_of('expert')
  if len(expert) != 1 or sizes.get(expert[0], 1) == 1:
    return None
  model = axes_of('mlp')
  model = model[0] if len(model) == 1 and sizes.get(model[0], 1) > 1 else None
  return ExpertParallelAxes(
      mesh=mesh, batch=axes_of('activation_batch'), expert=expert[0], model=model
  )
