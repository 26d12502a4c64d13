"""Three ways to run the selected experts on the tokens, behind one signature.

    y, kept = dispatch(mode, x, weights, indices, experts, ...)

  x        `[batch, length, embed]` token activations (compute dtype)
  weights  `[batch, length, k]` float32 routing weights (sum to 1 per token)
  indices  `[batch, length, k]` int32 selected experts
  experts  {'wi_0'|'wi_1'|'wo': {'kernel': [E, in, out], optional 'lora_a', 'lora_b'}}
  y        `[batch, length, embed]`: sum over kept choices of weight × expert(x)
  kept     `[batch, length, k]` bool: which (token, choice) assignments were computed

Modes:
  dense     every expert on every token (E× the work); the reference for tests.
  capacity  GShard/Switch one-hot dispatch into `[expert, group, capacity, embed]` buffers;
            assignments beyond an expert's capacity are dropped (that choice adds nothing, the
            token still has the residual path). Experts shard on the `expert` mesh axis and XLA
            moves tokens with all-to-alls.
  dropless  sort the (token, choice) rows by expert and run grouped matmuls
            (`grouped_matmul.gmm`, backend by platform); nothing is dropped.

All three share `expert_ffn`, so they differ only in how rows reach the expert matrices.
"""

import math
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from unimoe_jax import partitioning
from unimoe_jax.layers.lora import LoRADropout
from unimoe_jax.moe import grouped_ffn
from unimoe_jax.moe import grouped_matmul as gmm_lib
from unimoe_jax.moe import routing

# The logical axes of the expert weights (the `experts` dict above), by matrix and leaf: the
# one table that the parameters (moe/layer.py ExpertWeights) and the expert-parallel
# shard_map's PartitionSpecs (moe/expert_parallel.py) both read.
EXPERT_MATRIX_AXES = {'wi_0': ('embed', 'mlp'), 'wi_1': ('embed', 'mlp'), 'wo': ('mlp', 'embed')}


def expert_leaf_axes(in_axis: str, out_axis: str) -> Dict[str, Tuple[str, str, str]]:
  """{'kernel' | 'lora_a' | 'lora_b': logical axes} of one stacked matrix `[expert, in, out]`
  with its per-expert adapters `[expert, in, rank]` and `[expert, rank, out]`."""
  return {
      'kernel': ('expert', in_axis, out_axis),
      'lora_a': ('expert', in_axis, 'lora_rank'),
      'lora_b': ('expert', 'lora_rank', out_axis),
  }


Matmul = Callable[[jax.Array, jax.Array], jax.Array]


def expert_ffn(
    experts: Dict[str, Dict[str, jax.Array]],
    x: jax.Array,
    matmul: Matmul,
    lora_scale: float = 0.0,
    dropout: Optional[LoRADropout] = None,
) -> jax.Array:
  """SwiGLU of each expert on its rows: `wo(silu(wi_0 x) * wi_1 x)` (+ per-expert LoRA).

  `matmul(rows, w)` multiplies rows by a stacked `[E, in, out]` weight; it decides which
  expert each row meets (a batched einsum, or a grouped matmul over sorted rows).
  `dropout(h, name)` drops the LoRA input of projection `name` (training only).
  """

  def proj(name, h):
    p = experts[name]
    y = matmul(h, p['kernel'])
    if 'lora_a' in p:
      hd = dropout(h, name) if dropout is not None else h
      y = y + lora_scale * matmul(matmul(hd, p['lora_a']), p['lora_b'])
    return y

  # Gate and up stay two matmuls: fusing them through a concatenated [E, in, 2 * mlp] weight
  # ran ~5% faster on XLA:CPU but the split copies added ~1/3 to the temporary memory.
  gate, up = proj('wi_0', x), proj('wi_1', x)
  return proj('wo', jax.nn.silu(gate) * up)


def _batched_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x `[E, n, in]` × w `[E, in, out]` -> `[E, n, out]`."""
  return jnp.einsum('eni,eio->eno', x, w)


def dense(x, weights, indices, experts, *, lora_scale=0.0, dropout=None):
  """Every expert on every token, combined with the routing weights."""
  b, l, d = x.shape
  num_experts = experts['wi_0']['kernel'].shape[0]
  xt = x.reshape(b * l, d)
  ye = expert_ffn(
      experts, jnp.broadcast_to(xt, (num_experts,) + xt.shape), _batched_matmul, lora_scale, dropout
  )  # [E, T, D]
  combine = jnp.einsum(
      'tke,tk->te',
      jax.nn.one_hot(indices.reshape(b * l, -1), num_experts),
      weights.reshape(b * l, -1),
  )
  y = jnp.einsum('te,etd->td', combine.astype(ye.dtype), ye)
  return y.reshape(b, l, d), jnp.ones(indices.shape, jnp.bool_)


def expert_capacity(
    group_size: int, k: int, num_experts: int, capacity_factor: float, min_capacity: int
) -> int:
  """Buffer rows per expert and group: ceil(capacity_factor * group_size * k / E), bounded."""
  cap = int(math.ceil(capacity_factor * group_size * k / num_experts))
  return max(min(max(cap, min_capacity), group_size * k), 1)


def capacity_positions(
    indices: jax.Array, num_experts: int, token_mask: Optional[jax.Array] = None
) -> jax.Array:
  """Each assignment's slot in its expert's buffer, within a routing group.

  Priority is choice-major (GShard): every token's first choice is placed before any token's
  second choice; within a choice, earlier tokens first.

  Args:
    indices: `[G, S, k]` selected experts per group.
    token_mask: optional `[G, S]`; tokens with 0 (padding) take no slot.
  Returns:
    `[G, S, k]` int32 positions (0-based) in the chosen expert's buffer; masked tokens get
    a position past any capacity.
  """
  g, s, k = indices.shape
  one_hot = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)  # [G, S, k, E]
  if token_mask is not None:
    one_hot = one_hot * token_mask.astype(jnp.int32)[:, :, None, None]
  choice_major = one_hot.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)
  slots = jnp.cumsum(choice_major, axis=1) - 1
  slots = jnp.sum(slots * choice_major, axis=-1).reshape(g, k, s).transpose(0, 2, 1)
  if token_mask is not None:
    slots = jnp.where(token_mask[:, :, None] > 0, slots, s * k)
  return slots


def capacity(
    x,
    weights,
    indices,
    experts,
    *,
    capacity_factor=1.25,
    min_capacity=4,
    group_size=0,
    token_mask=None,
    renormalize=False,
    lora_scale=0.0,
    dropout=None,
):
  """GShard-style dispatch with a capacity per expert and routing group.

  Groups are `group_size` consecutive tokens of the flattened batch (0: one per sequence), so
  they shard with the batch; the capacity is per group. `token_mask` `[batch, length]` (1 for
  real tokens) keeps padding out of the buffers: padding is never computed. `renormalize`
  rescales each token's kept weights to sum to 1 after the drops (DeepSpeed's top2gating;
  `routing.renormalize_kept`); otherwise a dropped choice just adds nothing.
  """
  b, l, d = x.shape
  k = indices.shape[-1]
  num_experts = experts['wi_0']['kernel'].shape[0]
  s = group_size or l
  if (b * l) % s:
    raise ValueError(
        f'MoEConfig.group_size={group_size} does not divide the {b * l} tokens '
        f'of a [{b}, {l}] batch'
    )
  g = b * l // s
  cap = expert_capacity(s, k, num_experts, capacity_factor, min_capacity)
  xg, wg, ig = x.reshape(g, s, d), weights.reshape(g, s, k), indices.reshape(g, s, k)
  mask = None if token_mask is None else token_mask.reshape(g, s)
  slots = capacity_positions(ig, num_experts, mask)
  kept = slots < cap
  if renormalize:
    wg = routing.renormalize_kept(wg, kept)
  expert_hot = jax.nn.one_hot(ig, num_experts, dtype=x.dtype) * kept[..., None].astype(x.dtype)
  slot_hot = jax.nn.one_hot(slots, cap, dtype=x.dtype)  # Out-of-range slots give all zeros.
  dispatch_mask = jnp.einsum('gske,gskc->gsec', expert_hot, slot_hot)
  combine = jnp.einsum('gske,gskc,gsk->gsec', expert_hot, slot_hot, wg.astype(x.dtype))

  xe = jnp.einsum('gsec,gsd->egcd', dispatch_mask, xg)
  xe = partitioning.with_sharding_constraint(
      xe, ('activation_exp', 'activation_group', 'activation_capacity', 'activation_embed')
  )
  ye = expert_ffn(
      experts, xe.reshape(num_experts, g * cap, d), _batched_matmul, lora_scale, dropout
  ).reshape(num_experts, g, cap, d)
  ye = partitioning.with_sharding_constraint(
      ye, ('activation_exp', 'activation_group', 'activation_capacity', 'activation_embed')
  )
  y = jnp.einsum('gsec,egcd->gsd', combine, ye)
  return y.reshape(b, l, d), kept.reshape(b, l, k)


@jax.custom_vjp
def gather_token_rows(x, src, dest, k):
  """Token rows in the expert-sorted layout: row r holds token `src[r] // k`.

  `src[r] == T * k` marks a padding row (zeros). The backward pass is a gather too: token t
  sums the gradients of its k rows, found through `dest` (no scatter-add).
  """
  del dest
  x_ext = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
  return x_ext[jnp.minimum(src // k, x.shape[0])]


def _gather_token_rows_fwd(x, src, dest, k):
  return gather_token_rows(x, src, dest, k), (dest, k, x.shape[0])


def _gather_token_rows_bwd(residuals, g):
  dest, k, t = residuals
  return g[dest].reshape(t, k, -1).sum(axis=1), None, None, None


gather_token_rows.defvjp(_gather_token_rows_fwd, _gather_token_rows_bwd)


@jax.custom_vjp
def gather_assignment_rows(rows, dest, src):
  """`rows[dest]`: back from the sorted layout to (token, choice) order, `[T * k, embed]`.

  Its backward is the gather `g[src]` (zeros for padding rows), not a scatter.
  """
  del src
  return rows[dest]


def _gather_assignment_rows_fwd(rows, dest, src):
  return rows[dest], (src,)


def _gather_assignment_rows_bwd(residuals, g):
  (src,) = residuals
  g_ext = jnp.concatenate([g, jnp.zeros((1, g.shape[1]), g.dtype)])
  return g_ext[src], None, None


gather_assignment_rows.defvjp(_gather_assignment_rows_fwd, _gather_assignment_rows_bwd)


def sort_by_expert(indices: jax.Array, num_experts: int, align: int = 1):
  """The expert-sorted row layout of the flattened (token, choice) assignments.

  Each expert's rows start at a multiple of `align` (padding rows in between), so a tiled
  grouped matmul meets no tile shared by two experts.

  Args:
    indices: `[..., k]` selected experts; A = its size.
  Returns:
    src `[P]` int32: the assignment at each row, or A for a padding row;
    dest `[A]` int32: the row of each assignment;
    group_sizes `[E]` int32: rows per expert, padding included (multiples of `align`).
    P = round_up(A + E * (align - 1), align), a static bound.
  """
  flat = indices.reshape(-1).astype(jnp.int32)
  a = flat.shape[0]
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  if align == 1:
    return order, jnp.argsort(order).astype(jnp.int32), counts
  padded = (counts + align - 1) // align * align
  padded_starts = jnp.cumsum(padded) - padded
  starts = jnp.cumsum(counts) - counts
  expert_of_sorted = flat[order]
  row_of_sorted = (
      padded_starts[expert_of_sorted] + jnp.arange(a, dtype=jnp.int32) - starts[expert_of_sorted]
  )
  p = (a + num_experts * (align - 1) + align - 1) // align * align
  src = jnp.full((p,), a, jnp.int32).at[row_of_sorted].set(order)
  dest = jnp.zeros((a,), jnp.int32).at[order].set(row_of_sorted)
  return src, dest, padded


def dropless_tokens(
    x,
    weights,
    indices,
    experts,
    *,
    num_experts,
    backend='tiled',
    tile=0,
    fuse_ffn=True,
    group_offset=0,
    lora_scale=0.0,
    dropout=None,
    reduce_rows=None,
):
  """The dropless MoE on flat tokens: x `[T, embed]`, weights/indices `[T, k]` -> `[T, embed]`.

  Sorts (token, choice) rows by expert, runs the experts as grouped matmuls, un-sorts, and
  sums over the k choices weighted by the routing weights (applied after the down
  projection). Tokens move by gathers only. `experts` may hold a shard of the experts
  starting at `group_offset` out of `num_experts`; rows of other experts then contribute
  zeros. `reduce_rows` (e.g. a psum over a tensor-parallel axis) runs on the expert outputs
  before un-sorting.
  `tile` 0 picks the tiled backend's row tile from the shape (`grouped_matmul.choose_tile`).
  `fuse_ffn`: the tiled backend runs the experts (and their LoRA adapters) as one fused
  SwiGLU loop (`grouped_ffn.swiglu`) instead of separate grouped matmuls.
  """
  t, d = x.shape
  k = indices.shape[-1]
  tile = tile or gmm_lib.choose_tile(indices.size, num_experts)
  align = tile if backend == 'tiled' else 1
  src, dest, group_sizes = sort_by_expert(indices, num_experts, align)
  rows = gather_token_rows(x, src, dest, k)

  def matmul(h, w):
    return gmm_lib.gmm(
        h, w, group_sizes, backend=backend, tile=tile, group_offset=group_offset, aligned=align > 1
    )

  if fuse_ffn and backend == 'tiled':
    out_rows = grouped_ffn.swiglu(
        rows, experts, group_sizes, group_offset, tile, lora_scale, dropout
    )
  else:
    out_rows = expert_ffn(experts, rows, matmul, lora_scale, dropout)
  if reduce_rows is not None:
    out_rows = reduce_rows(out_rows)
  per_choice = gather_assignment_rows(out_rows, dest, src).reshape(t, k, d)
  return jnp.einsum('tkd,tk->td', per_choice, weights.astype(per_choice.dtype))


def dropless(
    x,
    weights,
    indices,
    experts,
    *,
    backend='tiled',
    tile=0,
    fuse_ffn=True,
    lora_scale=0.0,
    dropout=None,
):
  """Dropless dispatch on one device (see `dropless_tokens`); nothing is dropped."""
  b, l, d = x.shape
  k = indices.shape[-1]
  y = dropless_tokens(
      x.reshape(b * l, d),
      weights.reshape(b * l, k),
      indices.reshape(b * l, k),
      experts,
      num_experts=experts['wi_0']['kernel'].shape[0],
      backend=backend,
      tile=tile,
      fuse_ffn=fuse_ffn,
      lora_scale=lora_scale,
      dropout=dropout,
  )
  return y.reshape(b, l, d), jnp.ones(indices.shape, jnp.bool_)


def dispatch(
    mode: str,
    x: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    experts: Dict[str, Any],
    **options,
) -> Tuple[jax.Array, jax.Array]:
  """Runs `mode` ('dense' | 'capacity' | 'dropless'); see the module docstring for shapes.

  `options`: lora_scale, dropout; for 'capacity' capacity_factor, min_capacity, group_size,
  token_mask, renormalize; for 'dropless' backend, tile and fuse_ffn (see `grouped_matmul.py`,
  `grouped_ffn.py`).
  """
  if mode == 'dense':
    return dense(
        x,
        weights,
        indices,
        experts,
        lora_scale=options.get('lora_scale', 0.0),
        dropout=options.get('dropout'),
    )
  if mode == 'dropless':
    return dropless(x, weights, indices, experts, **options)
  if mode == 'capacity':
    return capacity(x, weights, indices, experts, **options)
  raise ValueError(f"Unknown MoE dispatch mode {mode!r}; use 'dense', 'capacity' or 'dropless'")
