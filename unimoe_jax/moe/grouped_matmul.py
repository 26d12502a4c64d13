"""Grouped matrix multiply: rows sorted by group, each group meets its own weight matrix.

    gmm(x [m, k], w [groups, k, n], group_sizes [G]) -> [m, n]
    out[r] = x[r] @ w[g(r) - group_offset]    for rows of the groups this shard holds
    out[r] = 0                                for every other row

`group_sizes` counts rows of all G groups (sum <= m; rows past the sum belong to no group).
`w` holds groups `[group_offset, group_offset + w.shape[0])`; with experts sharded over a mesh
axis each shard passes its own slice of experts and its offset, and computes only their rows.

Backends (all with forward and backward, checked against 'ragged_dot' in tests):
  ragged_dot  `jax.lax.ragged_dot` with JAX autodiff. The reference. XLA:CPU computes every
              group for every row (about G times a dense matmul), so it is slow there.
  tiled       pure JAX, written here because XLA:CPU has no grouped-matmul kernel. Each group's
              row range is cut into a few power-of-two chunks of `tile` rows (binary
              decomposition of its length), so nearly all work runs as large dense GEMMs; rows
              of a neighbouring group inside a boundary chunk are masked. The backward pass is
              hand-written: `gmm` with the weights transposed for dx and a transposed grouped
              matmul (tgmm) for dw, as megablox does.
  megablox    `jax.experimental.pallas.ops.tpu.megablox.gmm` (TPU; `interpret=True` on CPU).
              Callers that do not pass `interpret` (the MoE layer, `MoEConfig.gmm_backend=
              'megablox'`) run it on CPU under JAX's own switch,
              `with jax.experimental.pallas.tpu.force_tpu_interpret_mode(): ...`, which
              interprets every pallas_call traced inside it (TPU interpret mode) and is part
              of jit's cache key (tests/moe_megablox_test.py).
  mgpu        `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` with
              `transposed_ragged_dot_mgpu` for dw (Mosaic GPU, Hopper only).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

BACKENDS = ('ragged_dot', 'tiled', 'megablox', 'mgpu')


def default_backend(platform: Optional[str] = None) -> str:
  """The backend for a platform: megablox on TPU, the tiled one elsewhere.

  On GPUs the Mosaic kernel needs a Hopper GPU and shapes that fit its blocks, so it is opt-in
  (`MoEConfig.gmm_backend = 'mgpu'`) until it has been measured on one.
  """
  platform = platform or jax.default_backend()
  return 'megablox' if platform == 'tpu' else 'tiled'


def choose_tile(rows: int, groups: int, smallest: int = 16, largest: int = 128) -> int:
  """Row tile for the tiled backend: about a quarter of an average group, a power of two.

  Each group is padded to a multiple of the tile, wasting half a tile per group on average,
  so small groups (few tokens, many experts) need small tiles; large tiles keep the GEMMs
  efficient once groups are big.
  """
  target = max(rows // (4 * groups), 1)
  tile = smallest
  while tile * 2 <= min(target, largest):
    tile *= 2
  return tile


def gmm(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str = 'tiled',
    group_offset=0,
    transpose_rhs: bool = False,
    tile: int = 128,
    aligned: bool = False,
    interpret: bool = False,
) -> jax.Array:
  """Grouped matmul; see the module docstring. `transpose_rhs`: w is `[groups, n, k]`.

  `aligned` promises that every group starts at a multiple of `tile` and holds a multiple of
  `tile` rows (as `dispatch.sort_by_expert(..., align=tile)` lays them out); the tiled
  backend then writes its chunks without masking or accumulating.
  """
  group_sizes = group_sizes.astype(jnp.int32)
  group_offset = jnp.asarray(group_offset, jnp.int32)
  if backend == 'ragged_dot':
    return _ragged_dot_gmm(x, w, group_sizes, group_offset, transpose_rhs)
  if backend == 'tiled':
    return _tiled_gmm(x, w, group_sizes, group_offset, transpose_rhs, tile, aligned)
  if backend == 'megablox':
    return _megablox_gmm(x, w, group_sizes, group_offset, transpose_rhs, interpret)
  if backend == 'mgpu':
    return _mgpu_gmm(x, w, group_sizes, group_offset, transpose_rhs)
  raise ValueError(f'Unknown grouped-matmul backend {backend!r}; choose one of {BACKENDS}')


# ----------------------------------------------------------------------------- ragged_dot


def _shard_rows(group_sizes, group_offset, local):
  """[lo, hi): the rows of groups [group_offset, group_offset + local)."""
  starts, ends = group_bounds(group_sizes)
  return starts[group_offset], ends[group_offset + local - 1]


def _rows_in(out, lo, hi):
  r = jnp.arange(out.shape[0])[:, None]
  return jnp.where((r >= lo) & (r < hi), out, 0)


def _prepend_zero_group(w, group_sizes, group_offset):
  """For kernels without a group offset: a leading zero matrix soaks up the rows before the
  shard, and rows after it fall past the end of the returned group sizes."""
  local = w.shape[0]
  sizes = jax.lax.dynamic_slice_in_dim(group_sizes, group_offset, local)
  before, _ = _shard_rows(group_sizes, group_offset, local)
  w = jnp.concatenate([jnp.zeros((1,) + w.shape[1:], w.dtype), w])
  return w, jnp.concatenate([before[None], sizes])


def _ragged_dot_gmm(x, w, group_sizes, group_offset, transpose_rhs):
  if transpose_rhs:
    w = jnp.swapaxes(w, 1, 2)
  if w.shape[0] != group_sizes.shape[0]:  # ragged_dot leaves rows past the sizes zero.
    w, group_sizes = _prepend_zero_group(w, group_sizes, group_offset)
  return jax.lax.ragged_dot(x, w, group_sizes)


# ----------------------------------------------------------------------------- tiled


def group_bounds(group_sizes):
  """`[G]` first rows and `[G]` ends (exclusive) of the groups."""
  ends = jnp.cumsum(group_sizes)
  return ends - group_sizes, ends


def _chunk_sizes(rows: int, tile: int):
  """Power-of-two multiples of `tile` up to the padded row count, largest first."""
  sizes, c = [], tile
  while c <= rows:
    sizes.append(c)
    c *= 2
  return sizes[::-1]


def _round_up(v, m):
  return (v + m - 1) // m * m


def _for_each_chunk(start, end, tile, rows, fn, carry):
  """Calls `carry = fn(pos, size, carry)` over chunks covering [start, end) (tile-aligned).

  The covered range is [floor(start / tile) * tile, that + round_up(end - that, tile)),
  split by the binary digits of its length: at most log2(rows / tile) + 1 chunks, each a
  static size, so each runs as one dense GEMM.
  """
  first = start // tile * tile
  length = jnp.where(end > start, _round_up(end - first, tile), 0)
  pos = first
  for size in _chunk_sizes(rows, tile):
    take = (length & size) != 0
    carry = jax.lax.cond(take, lambda c, p=pos, s=size: fn(p, s, c), lambda c: c, carry)
    pos = pos + jnp.where(take, size, 0)
  return carry


def for_each_group_chunk(
    group_sizes,
    group_offset,
    num_local: int,
    tile: int,
    rows: int,
    chunk_fn,
    carry,
    group_start=None,
    group_done=None,
    results=None,
):
  """The tiled loops: each local group's rows in a few static-size chunks.

  For local group e (rows [start, end) of group `group_offset + e`):
    ctx, acc = group_start(e)          per-group values (weight slices) and accumulators
    acc, carry = chunk_fn(ctx, start, end, pos, size, acc, carry)   per chunk
    results = group_done(e, acc, results)
  `carry` (row-sized buffers) flows through every chunk; `results` (per-group outputs such as
  weight gradients, which must start as zeros: empty groups are skipped) only through
  `group_done`, which keeps them out of the chunks' conditionals. `rows`: the (tile-padded)
  row count bounding the chunk sizes. Returns (carry, results).
  """
  starts, ends = group_bounds(group_sizes)
  group_start = group_start or (lambda e: ((), ()))

  def group(e, state):
    start, end = starts[group_offset + e], ends[group_offset + e]

    def run(state):
      carry, results = state
      ctx, acc = group_start(e)

      def chunk(pos, size, inner):
        return chunk_fn(ctx, start, end, pos, size, *inner)

      acc, carry = _for_each_chunk(start, end, tile, rows, chunk, (acc, carry))
      return carry, results if group_done is None else group_done(e, acc, results)

    # An empty group reads none of its weights (decoding routes a few tokens to few experts).
    return jax.lax.cond(end > start, run, lambda s: s, state)

  return jax.lax.fori_loop(0, num_local, group, (carry, results))


def _row_mask(pos, size, start, end):
  r = pos + jnp.arange(size)
  return ((r >= start) & (r < end))[:, None]


def _tiled_forward(x, w, group_sizes, group_offset, transpose_rhs, tile, aligned=False):
  """out[r] = x[r] @ w[g(r)] (or w[g(r)].T) for the local groups; zeros elsewhere."""
  m = x.shape[0]
  rows = _round_up(m, tile)
  xp = jnp.pad(x, ((0, rows - m), (0, 0)))
  n = w.shape[1] if transpose_rhs else w.shape[2]
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def chunk(we, start, end, pos, size, acc, out):
    y = jax.lax.dot_general(
        jax.lax.dynamic_slice_in_dim(xp, pos, size), we, dims, preferred_element_type=jnp.float32
    ).astype(out.dtype)
    if not aligned:  # A chunk may share its first or last tile with a neighbour group.
      cur = jax.lax.dynamic_slice_in_dim(out, pos, size)
      y = cur + jnp.where(_row_mask(pos, size, start, end), y, 0)
    return acc, jax.lax.dynamic_update_slice_in_dim(out, y, pos, 0)

  out, _ = for_each_group_chunk(
      group_sizes,
      group_offset,
      w.shape[0],
      tile,
      rows,
      chunk,
      jnp.zeros((rows, n), x.dtype),
      group_start=lambda e: (w[e], ()),
  )
  return out[:m]


def _tiled_tgmm(x, dy, group_sizes, group_offset, num_local, tile, aligned=False):
  """dw[e] = x_e^T @ dy_e over the rows of local group e: `[num_local, k, n]`, float32 sums."""
  m = x.shape[0]
  rows = _round_up(m, tile)
  xp = jnp.pad(x, ((0, rows - m), (0, 0)))
  dyp = jnp.pad(dy, ((0, rows - m), (0, 0)))
  k, n = x.shape[1], dy.shape[1]

  def chunk(ctx, start, end, pos, size, acc, carry):
    del ctx
    xs = jax.lax.dynamic_slice_in_dim(xp, pos, size)
    if not aligned:
      xs = jnp.where(_row_mask(pos, size, start, end), xs, 0)
    return (
        acc
        + jax.lax.dot_general(
            xs,
            jax.lax.dynamic_slice_in_dim(dyp, pos, size),
            (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        ),
        carry,
    )

  _, dw = for_each_group_chunk(
      group_sizes,
      group_offset,
      num_local,
      tile,
      rows,
      chunk,
      (),
      group_start=lambda e: ((), jnp.zeros((k, n), jnp.float32)),
      group_done=lambda e, acc, dw: jax.lax.dynamic_update_index_in_dim(dw, acc, e, 0),
      results=jnp.zeros((num_local, k, n), jnp.float32),
  )
  return dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tiled_gmm(x, w, group_sizes, group_offset, transpose_rhs, tile, aligned):
  return _tiled_forward(x, w, group_sizes, group_offset, transpose_rhs, tile, aligned)


def _tiled_gmm_fwd(x, w, group_sizes, group_offset, transpose_rhs, tile, aligned):
  out = _tiled_forward(x, w, group_sizes, group_offset, transpose_rhs, tile, aligned)
  return out, (x, w, group_sizes, group_offset)


def _tiled_gmm_bwd(transpose_rhs, tile, aligned, residuals, dy):
  x, w, group_sizes, group_offset = residuals
  dx = _tiled_forward(dy, w, group_sizes, group_offset, not transpose_rhs, tile, aligned)
  if transpose_rhs:  # w[e] is [n, k]: dw[e] = dy_e^T x_e.
    dw = _tiled_tgmm(dy, x, group_sizes, group_offset, w.shape[0], tile, aligned)
  else:
    dw = _tiled_tgmm(x, dy, group_sizes, group_offset, w.shape[0], tile, aligned)
  return dx.astype(x.dtype), dw.astype(w.dtype), None, None


_tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)


# ----------------------------------------------------------------------------- megablox


@jax.custom_vjp
def _keep_rows_grad(x, lo, hi):
  """Identity whose backward zeroes cotangent rows outside [lo, hi)."""
  del lo, hi
  return x


def _keep_rows_grad_fwd(x, lo, hi):
  return x, (lo, hi)


def _keep_rows_grad_bwd(residuals, g):
  lo, hi = residuals
  r = jnp.arange(g.shape[0])[:, None]
  return jnp.where((r >= lo) & (r < hi), g, 0), None, None


_keep_rows_grad.defvjp(_keep_rows_grad_fwd, _keep_rows_grad_bwd)


def _megablox_lane_tile(size: int) -> int:
  """megablox's k / n tile: 128 where it divides `size`, else the whole dimension (a block
  may span a full array dimension; megablox refuses a tile that does not divide it)."""
  return 128 if size % 128 == 0 else size


def _megablox_gmm(x, w, group_sizes, group_offset, transpose_rhs, interpret):
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox  # pylint: disable=g-import-not-at-top

  m, k = x.shape
  n = w.shape[1] if transpose_rhs else w.shape[2]
  # megablox needs the row count to be a multiple of its row tile: pad with zero rows, which
  # lie past sum(group_sizes) and so in no group (a decode step has 2 rows, a prompt any).
  row_tile = min(128, _round_up(m, 8))
  padded = _round_up(m, row_tile)
  tiling = (row_tile, _megablox_lane_tile(k), _megablox_lane_tile(n))
  sharded = w.shape[0] != group_sizes.shape[0]
  # Rows outside this shard's groups and past sum(group_sizes) must come out zero, in the
  # output and in dx. megablox does not promise that: a row past the sum keeps whatever the
  # buffer held (NaN in the generic Pallas interpreter; in TPU interpret mode NaN, or finite
  # garbage that is no group's product when a group shares its row tile), and jax 0.10.2
  # zeroes only the rows of other shards' groups (`_zero_uninitialized_memory`, sharded
  # calls only). Mask both; tests/grouped_matmul_test.py fails without either mask.
  lo, hi = _shard_rows(group_sizes, group_offset, w.shape[0])
  x = jnp.pad(_keep_rows_grad(x, lo, hi), ((0, padded - m), (0, 0)))
  out = megablox.gmm(
      x,
      w,
      group_sizes,
      x.dtype,
      tiling,
      group_offset if sharded else None,
      None,
      transpose_rhs,
      interpret,
  )
  return _rows_in(out[:m], lo, hi)


# ----------------------------------------------------------------------------- mgpu


def _mgpu_blocks(m, k, n):
  return dict(
      block_m=64, block_n=min(128, n), block_k=min(64, k), max_concurrent_steps=4, grid_block_n=1
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mgpu_core(x, w, group_sizes, transpose_rhs):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # pylint: disable=g-import-not-at-top

  n = w.shape[1] if transpose_rhs else w.shape[2]
  return ragged_dot_mgpu.ragged_dot(
      x,
      w,
      group_sizes=group_sizes,
      transpose_rhs=transpose_rhs,
      **_mgpu_blocks(x.shape[0], x.shape[1], n),
  )


def _mgpu_core_fwd(x, w, group_sizes, transpose_rhs):
  return _mgpu_core(x, w, group_sizes, transpose_rhs), (x, w, group_sizes)


def _mgpu_core_bwd(transpose_rhs, residuals, dy):
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu  # pylint: disable=g-import-not-at-top

  x, w, group_sizes = residuals
  dx = _mgpu_core(dy, w, group_sizes, not transpose_rhs)
  a, b = (dy, x) if transpose_rhs else (x, dy)
  dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(
      a, b, group_sizes=group_sizes, **_mgpu_blocks(a.shape[0], a.shape[1], b.shape[1])
  )
  return dx, dw.astype(w.dtype), None


_mgpu_core.defvjp(_mgpu_core_fwd, _mgpu_core_bwd)


def _mgpu_gmm(x, w, group_sizes, group_offset, transpose_rhs):
  # Like megablox, zero the rows the kernel does not write (outside this shard's groups), in
  # the output and in dx.
  lo, hi = _shard_rows(group_sizes, group_offset, w.shape[0])
  if w.shape[0] != group_sizes.shape[0]:
    w, group_sizes = _prepend_zero_group(w, group_sizes, group_offset)
  return _rows_in(_mgpu_core(_keep_rows_grad(x, lo, hi), w, group_sizes, transpose_rhs), lo, hi)
