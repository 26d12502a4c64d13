"""Dropless MoE with experts sharded over a mesh axis: the weights never leave their shard.

Under `jax.shard_map`, each device on the `expert` axis

  1. all-gathers the tokens (and their routing) of its expert-axis peers,
  2. sorts all of them by expert and runs the grouped matmuls for *its own* experts only
     (`gmm(..., group_offset=shard * local_experts)`; other rows stay zero, uncomputed),
  3. un-sorts, weights and sums its partial outputs, and
  4. reduce-scatters them back, so each device ends with the full output of its own tokens.

Why all-gather + reduce-scatter rather than `jax.lax.ragged_all_to_all`: the collectives are
dense, static-shaped and supported on every backend (CPU included, where the tests run), and
their transposes are each other, so the backward pass needs nothing hand-written. Each device
moves `(n - 1) / n` of its expert-axis peers' tokens, which a ragged all-to-all would cut to
the routed ones; that trade only pays once the expert axis is large. And `ragged_all_to_all`
does not run on XLA:CPU (jax 0.10.2: "HLO opcode `ragged-all-to-all` is not supported by
XLA:CPU ThunkEmitter"), so it could not be measured against this one here.

If the expert `mlp` dimension is also split (tensor parallelism on `model`), the partial
outputs are summed over `model` before un-sorting.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from unimoe_jax.moe import dispatch as dispatch_lib
from unimoe_jax.partitioning import ExpertParallelAxes


def _expert_specs(experts, axes: ExpertParallelAxes):
  """PartitionSpecs of the expert weights inside the shard_map, from their logical axes
  (`dispatch.EXPERT_MATRIX_AXES`): 'expert' on the expert mesh axis, 'mlp' on the model axis
  when it is split, every other axis whole (under FSDP the weights' 'embed' data shards are
  gathered on entry: each device runs its experts on all of its gathered tokens)."""
  mesh_axis = {'expert': axes.expert, 'mlp': axes.model}
  specs = {}
  for name, params in experts.items():
    leaf_axes = dispatch_lib.expert_leaf_axes(*dispatch_lib.EXPERT_MATRIX_AXES[name])
    specs[name] = {leaf: P(*(mesh_axis.get(axis) for axis in leaf_axes[leaf])) for leaf in params}
  return specs


def dropless(
    x,
    weights,
    indices,
    experts,
    *,
    axes: ExpertParallelAxes,
    backend='tiled',
    tile=0,
    fuse_ffn=True,
    lora_scale=0.0,
    dropout=None,
):
  """Same contract as `dispatch.dropless` (shapes in `dispatch.py`), expert-parallel."""
  num_experts = experts['wi_0']['kernel'].shape[0]
  shards = dict(axes.mesh.shape)[axes.expert]
  if num_experts % shards:
    raise ValueError(
        f'MoEConfig.num_experts={num_experts} is not divisible by the '
        f'{shards} devices of mesh axis {axes.expert!r}'
    )
  local = num_experts // shards
  tokens_split = axes.expert in axes.batch
  batch_spec = P(axes.batch or None, None, None)
  data_axes = tuple(a for a in axes.batch if a != axes.expert)  # Shards of distinct tokens.

  def body(x, weights, indices, experts):
    if tokens_split:  # Bring in the peers' tokens; weights stay put.
      x, weights, indices = (
          jax.lax.all_gather(a, axes.expert, axis=0, tiled=True) for a in (x, weights, indices)
      )
    b, l, d = x.shape
    k = indices.shape[-1]
    shard_dropout = dropout
    if dropout is not None and data_axes:
      # The key reaches every device alike; unfolded, each data shard would drop the same
      # positions of its own tokens. Peers on the expert axis keep one key: they hold the
      # same gathered tokens, and each applies the masks of its own experts' rows.
      shard_dropout = dropout._replace(
          key=jax.random.fold_in(dropout.key, jax.lax.axis_index(data_axes))
      )
    reduce_rows = None
    if axes.model is not None:
      reduce_rows = lambda rows: jax.lax.psum(rows, axes.model)
    y = dispatch_lib.dropless_tokens(
        x.reshape(b * l, d),
        weights.reshape(b * l, k),
        indices.reshape(b * l, k),
        experts,
        num_experts=num_experts,
        backend=backend,
        tile=tile,
        fuse_ffn=fuse_ffn,
        group_offset=jax.lax.axis_index(axes.expert) * local,
        lora_scale=lora_scale,
        dropout=shard_dropout,
        reduce_rows=reduce_rows,
    ).reshape(b, l, d)
    if tokens_split:
      return jax.lax.psum_scatter(y, axes.expert, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, axes.expert)

  y = jax.shard_map(
      body,
      mesh=axes.mesh,
      in_specs=(batch_spec, batch_spec, batch_spec, _expert_specs(experts, axes)),
      out_specs=batch_spec,
      # The grouped-matmul loops carry zero-initialised buffers that become
      # device-varying; vma typing would reject those loop carries.
      check_vma=False,
  )(x, weights, indices, experts)
  return y, jnp.ones(indices.shape, jnp.bool_)
