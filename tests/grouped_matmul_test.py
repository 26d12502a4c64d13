"""Every grouped-matmul backend equals the `jax.lax.ragged_dot` reference, forward and backward."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from unimoe_jax.moe import grouped_matmul as gmm_lib

M, K, N = 96, 24, 40

GROUP_SIZES = {
    'random': [17, 30, 0, 25, 24],
    'empty_groups': [0, 40, 0, 0, 56],
    'one_group_all_rows': [0, 0, 96, 0, 0],
    'rows_past_the_sum': [9, 14, 0, 21, 3],
    'all_empty': [0, 0, 0, 0, 0],
}


def _on_hopper_gpu():
  dev = jax.devices()[0]
  return dev.platform == 'gpu' and any(h in dev.device_kind for h in ('H100', 'H200', 'H800'))


def _backends():
  params = [pytest.param('tiled'), pytest.param('megablox', marks=pytest.mark.slow)]
  params.append(
      pytest.param(
          'mgpu',
          marks=pytest.mark.skipif(
              not _on_hopper_gpu(), reason='Mosaic GPU kernel needs a Hopper GPU (none here)'
          ),
      )
  )
  return params


def _case(sizes, transpose_rhs, local=None, dtype=jnp.float32):
  g = len(sizes)
  local = local or g
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(sum(sizes) + 7 * g), 3)
  x = jax.random.normal(kx, (M, K), dtype)
  w = jax.random.normal(kw, (local, N, K) if transpose_rhs else (local, K, N), dtype)
  ct = jax.random.normal(kc, (M, N), jnp.float32)
  return x, w, jnp.array(sizes, jnp.int32), ct


def _value_and_grads(
    backend, x, w, sizes, ct, transpose_rhs, offset=0, aligned=False, tpu_interpret=False
):
  """(out, dx, dw) of sum(gmm(x, w) * ct). Pallas kernels run in interpret mode: the
  generic one (`interpret=True`, a scan over the grid), or with `tpu_interpret` JAX's TPU
  interpret mode (`force_tpu_interpret_mode`: simulated TPU memories, buffers start as NaN,
  out-of-bounds reads raise)."""

  def loss(x, w):
    y = gmm_lib.gmm(
        x,
        w,
        sizes,
        backend=backend,
        transpose_rhs=transpose_rhs,
        group_offset=offset,
        tile=16,
        aligned=aligned,
        interpret=not tpu_interpret,
    )
    return jnp.sum(y.astype(jnp.float32) * ct), y

  with pltpu.force_tpu_interpret_mode() if tpu_interpret else contextlib.nullcontext():
    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
  return y, dx, dw


def _max_abs(a):
  """max |a| in numpy: XLA:CPU's reduce-max (jax 0.10.2) can drop NaNs (the max of a
  [131, 40] array whose last row is NaN came out -inf), so it would hide unwritten rows."""
  return float(np.abs(np.asarray(a, np.float32)).max(initial=0.0))


def _assert_close(got, ref, what):
  for name, g, r in zip(('out', 'dx', 'dw'), got, ref):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    assert np.isfinite(g).all(), f'{what} {name}: {np.sum(~np.isfinite(g))} non-finite values'
    scale = max(_max_abs(r), 1.0)
    err = _max_abs(g - r)
    assert err <= 1e-5 * scale, f'{what} {name}: max abs error {err} (scale {scale})'


@pytest.mark.parametrize('backend', _backends())
@pytest.mark.parametrize('case', sorted(GROUP_SIZES))
@pytest.mark.parametrize('transpose_rhs', [False, True])
def test_backend_equals_ragged_dot(backend, case, transpose_rhs):
  x, w, sizes, ct = _case(GROUP_SIZES[case], transpose_rhs)
  ref = _value_and_grads('ragged_dot', x, w, sizes, ct, transpose_rhs)
  got = _value_and_grads(backend, x, w, sizes, ct, transpose_rhs)
  _assert_close(got, ref, f'{backend}/{case}')
  assert _max_abs(ref[0]) > 0 or case == 'all_empty'


@pytest.mark.parametrize('backend', ['ragged_dot'] + _backends())
@pytest.mark.parametrize('offset', [0, 2])
def test_shard_of_groups_computes_only_its_rows(backend, offset):
  """`group_offset`: a shard holding groups [offset, offset + 2) of 5."""
  sizes = GROUP_SIZES['random']
  x, w, gs, ct = _case(sizes, False, local=2)
  got = _value_and_grads(backend, x, w, gs, ct, False, offset=offset)
  # Reference: all 5 groups with zero weights outside the shard.
  full = jnp.zeros((5, K, N)).at[offset : offset + 2].set(w)
  y, dx, dw_full = _value_and_grads('ragged_dot', x, full, gs, ct, False)
  _assert_close(got, (y, dx, dw_full[offset : offset + 2]), f'{backend}/offset={offset}')
  start, end = sum(sizes[:offset]), sum(sizes[: offset + 2])
  assert _max_abs(got[0][:start]) == 0
  assert _max_abs(got[0][end:]) == 0


# (rows, k, n, group sizes): a decode step's 1 and 2 rows, odd and prime row counts, just
# past megablox's 128-row tile (131) and just past 4096 (4097: 33 row tiles, the last holding
# one row, which lies past the groups' sum), and k / n that 128 does not divide (200) or does
# (256).
AWKWARD = {
    'rows_1': (1, 24, 40, [0, 1, 0]),
    'rows_2': (2, 24, 40, [1, 0, 1]),
    'rows_13_odd': (13, 24, 40, [5, 0, 8]),
    'rows_131_prime_past_tile': (131, 24, 40, [60, 0, 70]),
    'rows_200_k_200_n_136': (200, 200, 136, [90, 70, 40]),
    'rows_6_k_256_n_256': (6, 256, 256, [2, 3, 0]),
    'rows_4097_past_4096': (4097, 16, 24, [0, 2000, 0, 2096]),
}


@pytest.mark.parametrize(
    'backend', [pytest.param('tiled'), pytest.param('megablox', marks=pytest.mark.slow)]
)
@pytest.mark.parametrize('case', sorted(AWKWARD))
def test_awkward_shapes_equal_ragged_dot(backend, case):
  """Rows that no tile divides (megablox used to raise: '200 must be divisible by x-dimension
  tile size (128)'), k and n that 128 does not divide; rows past the groups' sum too."""
  m, k, n, sizes = AWKWARD[case]
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(m + k + n), 3)
  x = jax.random.normal(kx, (m, k))
  w = jax.random.normal(kw, (len(sizes), k, n))
  ct = jax.random.normal(kc, (m, n))
  gs = jnp.array(sizes, jnp.int32)
  ref = _value_and_grads('ragged_dot', x, w, gs, ct, False)
  got = _value_and_grads(backend, x, w, gs, ct, False)
  assert got[0].shape == (m, n)
  _assert_close(got, ref, f'{backend}/{case}')


# Row counts with empty groups (k=16, n=24 keep the 4097-row case fast in interpret mode), on
# all 4 groups or on a shard holding 2 of them: some shards hold only empty groups, and some
# rows lie past the groups' sum, in a row tile that a group also visits (6, 200) or in one of
# their own (4097).
SHARDED_EMPTY = {
    1: [0, 0, 1, 0],  # offset 0: the shard's groups are both empty.
    2: [1, 0, 0, 1],
    6: [0, 3, 0, 2],  # 1 row past the sum.
    200: [0, 90, 0, 70],  # 40 rows past the sum.
    4097: [0, 2000, 0, 2096],  # 1 row past the sum, alone in the 33rd 128-row tile.
}


# The kernel in the TPU interpreter (the one a TPU compiles); Pallas' generic interpreter
# ran the same 15 cases in ~30 s and is left to test_backend_equals_ragged_dot.
@pytest.mark.parametrize(
    'interpreter',
    [
        pytest.param(None, id='tiled'),
        pytest.param('tpu', id='megablox_tpu_interpret', marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize('offset', [None, 0, 2], ids=['all_groups', 'offset_0', 'offset_2'])
@pytest.mark.parametrize('rows', sorted(SHARDED_EMPTY))
def test_empty_groups_under_group_offset_equal_ragged_dot(interpreter, offset, rows):
  """out, dx and dw of all 4 groups, or of a shard (groups [offset, offset + 2)), equal
  ragged_dot over all 4 groups with zero weights outside the shard; max abs error <=
  1e-5 x max(1, max |ref|); rows outside the shard's groups exactly zero."""
  sizes = SHARDED_EMPTY[rows]
  k, n = 16, 24
  local = 4 if offset is None else 2
  first = offset or 0
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(rows + first), 3)
  x = jax.random.normal(kx, (rows, k))
  w = jax.random.normal(kw, (local, k, n))
  ct = jax.random.normal(kc, (rows, n))
  gs = jnp.array(sizes, jnp.int32)
  full = jnp.zeros((4, k, n)).at[first : first + local].set(w)
  y, dx, dw_full = _value_and_grads('ragged_dot', x, full, gs, ct, False)
  backend = 'tiled' if interpreter is None else 'megablox'
  got = _value_and_grads(
      backend, x, w, gs, ct, False, offset=first, tpu_interpret=interpreter == 'tpu'
  )
  assert [a.shape for a in got] == [(rows, n), (rows, k), (local, k, n)]
  _assert_close(got, (y, dx, dw_full[first : first + local]), f'{backend}/{interpreter}')
  start, end = sum(sizes[:first]), sum(sizes[: first + local])
  for a in got[:2]:  # Rows of other shards' groups and past the sum: exactly zero.
    assert _max_abs(a[:start]) == 0 and _max_abs(a[end:]) == 0
  if end > start:  # The shard has rows: the comparison is not vacuous.
    assert _max_abs(y[start:end]) > 0 and _max_abs(dw_full) > 0


@pytest.mark.parametrize('transpose_rhs', [False, True])
def test_tiled_aligned_layout(transpose_rhs):
  """Groups on tile boundaries (as sort_by_expert lays them out): no masking needed."""
  x, w, sizes, ct = _case([32, 0, 48, 16, 0], transpose_rhs)
  ref = _value_and_grads('ragged_dot', x, w, sizes, ct, transpose_rhs)
  got = _value_and_grads('tiled', x, w, sizes, ct, transpose_rhs, aligned=True)
  _assert_close(got, ref, 'tiled/aligned')


def test_unknown_backend_is_named():
  x, w, sizes, _ = _case(GROUP_SIZES['random'], False)
  with pytest.raises(ValueError, match="'cutlass'"):
    gmm_lib.gmm(x, w, sizes, backend='cutlass')


def test_default_backend_by_platform():
  assert gmm_lib.default_backend('tpu') == 'megablox'
  assert gmm_lib.default_backend('cpu') == 'tiled'
