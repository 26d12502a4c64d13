"""The one place that knows about the device mesh.

Every parameter and key activation in the model carries *logical* axis names ('embed', 'mlp',
'expert', 'activation_batch', ...). This module maps them to the three mesh axes

    data    data parallelism (batch)
    expert  expert parallelism (the leading axis of stacked expert weights)
    model   tensor parallelism (heads, mlp, vocab)

and builds the mesh. Nothing else in the code base names a mesh axis.

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

# (logical axis, mesh axis or axes or None). Order matters only where one logical array has two
# names that map to the same mesh axis: flax then keeps the first and replicates the second.
LOGICAL_AXIS_RULES: Tuple[Tuple[str, Any], ...] = (
    # Activations.
    ('activation_batch', ('data', 'expert')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'model'),
    ('activation_kv_heads', 'model'),
    ('activation_mlp', 'model'),
    ('activation_vocab', 'model'),
    ('activation_exp', 'expert'),       # The expert axis of dispatched tokens.
    ('activation_group', 'data'),       # Routing groups once experts hold the `expert` axis.
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
    ('query_tokens', None),   # Learned query tokens of the Q-Former: few rows, replicated.
    # The decoding KV cache (layers/attention.py).
    ('cache_batch', ('data', 'expert')),
    ('cache_length', None),
    ('cache_kv_heads', 'model'),
    ('cache_head_dim', None),
)


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
      raise ValueError(f'MeshConfig(data={self.data}, expert={self.expert}, model={self.model}) '
                       f'does not divide the {num_devices} available devices')
    dims = [num_devices // known if d == -1 else d for d in dims]
    if int(np.prod(dims)) != num_devices:
      raise ValueError(f'MeshConfig(data={self.data}, expert={self.expert}, model={self.model}) '
                       f'uses {int(np.prod(dims))} devices but {num_devices} are available')
    return tuple(dims)


def make_mesh(config: Optional[MeshConfig] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ('data', 'expert', 'model') mesh over `devices` (default: all devices)."""
  config = config or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def logical_to_mesh_spec(logical_axes: Sequence[Optional[str]],
                         rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
  return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]],
                     rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, rules))


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of a batch array of rank `ndim`: rows split like 'activation_batch'."""
  spec = logical_to_mesh_spec(('activation_batch',), rules)
  return NamedSharding(mesh, PartitionSpec(*spec, *([None] * (ndim - 1))))


def params_shardings(mesh: Mesh, abstract_variables, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a (boxed) variable tree, e.g. from `jax.eval_shape(model.init, ...)`."""
  logical_specs = nn.get_partition_spec(abstract_variables)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args, rules=LOGICAL_AXIS_RULES):
  """Runs `init_fn(*args)` under jit so that each variable is created on its own shards.

  `init_fn` returns a flax variable tree whose leaves may be `nn.LogicallyPartitioned` boxes.
  Returns `(variables, shardings)` with the boxes removed; no variable is ever materialised
  whole on one device.
  """
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
def mesh_context(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Makes `mesh` current and activates the logical axis rules, for tracing and running.

  Uses `jax.set_mesh` where this jax has it (the `with mesh:` form is deprecated there).
  """
  mesh_cm = jax.set_mesh(mesh) if hasattr(jax, 'set_mesh') else mesh
  with mesh_cm, nn.logical_axis_rules(rules):
    yield mesh


@dataclasses.dataclass(frozen=True)
class ExpertParallelAxes:
  """Mesh axes that the expert-parallel MoE path maps over (see moe/expert_parallel.py)."""
  mesh: Any
  batch: Tuple[str, ...]   # Mesh axes of the token batch.
  expert: str              # Mesh axis of the expert dimension of expert weights.
  model: Optional[str]     # Mesh axis of the expert `mlp` dimension, if it is split.


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
  return ExpertParallelAxes(mesh=mesh, batch=axes_of('activation_batch'), expert=expert[0],
                            model=model)
