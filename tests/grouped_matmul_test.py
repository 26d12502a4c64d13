"""Every grouped-matmul backend equals the `jax.lax.ragged_dot` reference, forward and backward."""

import jax
import jax.numpy as jnp
import pytest

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
  params.append(pytest.param('mgpu', marks=pytest.mark.skipif(
      not _on_hopper_gpu(), reason='Mosaic GPU kernel needs a Hopper GPU (none here)')))
  return params


def _case(sizes, transpose_rhs, local=None, dtype=jnp.float32):
  g = len(sizes)
  local = local or g
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(sum(sizes) + 7 * g), 3)
  x = jax.random.normal(kx, (M, K), dtype)
  w = jax.random.normal(kw, (local, N, K) if transpose_rhs else (local, K, N), dtype)
  ct = jax.random.normal(kc, (M, N), jnp.float32)
  return x, w, jnp.array(sizes, jnp.int32), ct


def _value_and_grads(backend, x, w, sizes, ct, transpose_rhs, offset=0, aligned=False):
  def loss(x, w):
    y = gmm_lib.gmm(x, w, sizes, backend=backend, transpose_rhs=transpose_rhs,
                    group_offset=offset, tile=16, aligned=aligned, interpret=True)
    return jnp.sum(y.astype(jnp.float32) * ct), y
  (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
  return y, dx, dw


def _assert_close(got, ref, what):
  for name, g, r in zip(('out', 'dx', 'dw'), got, ref):
    scale = max(float(jnp.abs(r).max()), 1.0)
    err = float(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)).max())
    assert err <= 1e-5 * scale, f'{what} {name}: max abs error {err} (scale {scale})'


@pytest.mark.parametrize('backend', _backends())
@pytest.mark.parametrize('case', sorted(GROUP_SIZES))
@pytest.mark.parametrize('transpose_rhs', [False, True])
def test_backend_equals_ragged_dot(backend, case, transpose_rhs):
  x, w, sizes, ct = _case(GROUP_SIZES[case], transpose_rhs)
  ref = _value_and_grads('ragged_dot', x, w, sizes, ct, transpose_rhs)
  got = _value_and_grads(backend, x, w, sizes, ct, transpose_rhs)
  _assert_close(got, ref, f'{backend}/{case}')
  assert float(jnp.abs(ref[0]).max()) > 0 or case == 'all_empty'


@pytest.mark.parametrize('backend', ['ragged_dot'] + _backends())
@pytest.mark.parametrize('offset', [0, 2])
def test_shard_of_groups_computes_only_its_rows(backend, offset):
  """`group_offset`: a shard holding groups [offset, offset + 2) of 5."""
  sizes = GROUP_SIZES['random']
  x, w, gs, ct = _case(sizes, False, local=2)
  got = _value_and_grads(backend, x, w, gs, ct, False, offset=offset)
  # Reference: all 5 groups with zero weights outside the shard.
  full = jnp.zeros((5, K, N)).at[offset:offset + 2].set(w)
  y, dx, dw_full = _value_and_grads('ragged_dot', x, full, gs, ct, False)
  _assert_close(got, (y, dx, dw_full[offset:offset + 2]), f'{backend}/offset={offset}')
  start, end = sum(sizes[:offset]), sum(sizes[:offset + 2])
  assert float(jnp.abs(got[0][:start]).max(initial=0)) == 0
  assert float(jnp.abs(got[0][end:]).max(initial=0)) == 0


# (rows, k, n, group sizes): a decode step's 1 and 2 rows, odd and prime row counts, just
# past megablox's 128-row tile, and k / n that 128 does not divide (200) or does (256).
AWKWARD = {
    'rows_1': (1, 24, 40, [0, 1, 0]),
    'rows_2': (2, 24, 40, [1, 0, 1]),
    'rows_13_odd': (13, 24, 40, [5, 0, 8]),
    'rows_131_prime_past_tile': (131, 24, 40, [60, 0, 70]),
    'rows_200_k_200_n_136': (200, 200, 136, [90, 70, 40]),
    'rows_6_k_256_n_256': (6, 256, 256, [2, 3, 0]),
}


@pytest.mark.parametrize('backend', [pytest.param('tiled'),
                                     pytest.param('megablox', marks=pytest.mark.slow)])
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
