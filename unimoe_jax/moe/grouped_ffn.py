"""The SwiGLU experts as one tiled loop: gate, up, silu and down of each row chunk together.

    swiglu(rows [P, embed], wi_0 [E, embed, mlp], wi_1 [E, embed, mlp], wo [E, mlp, embed],
           group_sizes [G], group_offset, tile) -> [P, embed]
    out[r] = wo[e](silu(wi_0[e] x[r]) * wi_1[e] x[r]),  e = g(r) - group_offset

Rows are in the tile-aligned expert-sorted layout of `dispatch.sort_by_expert(align=tile)`:
every group starts at a multiple of `tile` and holds a multiple of `tile` rows. Rows outside
the local groups (other shards' experts, trailing padding) come out zero.

Why this exists beside `grouped_matmul.gmm(backend='tiled')`: the three separate grouped
matmuls each fill an `[P, mlp]` output buffer (XLA:CPU zero-initialises every loop-carried
buffer), and their backward passes add three more plus an extra `[P, embed]` for each input
gradient. Here each chunk of rows runs the whole FFN while its activations are hot: the
forward writes the `[P, embed]` output and, only when differentiated, the gate and up
activations (the residuals); the hand-written backward writes one `[P, embed]` input
gradient and accumulates the three weight gradients per expert (megablox's tgmm, fused).
Same FLOPs as the unfused path, fewer full-size buffers and passes over memory.

Used by `dispatch.dropless_tokens` for the tiled backend when the experts carry no LoRA;
with LoRA it runs the unfused grouped matmuls (the adapters are extra matmuls per projection).
"""

import functools

import jax
import jax.numpy as jnp

from unimoe_jax.moe import grouped_matmul as gmm_lib


def _mm(a, b, contract=((1,), (0,))):
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _forward(x, wi_0, wi_1, wo, group_sizes, group_offset, tile, keep_residuals):
  m, d = x.shape
  f = wi_0.shape[2]
  dtype = x.dtype

  def chunk(w, start, end, pos, size, acc, carry):
    del start, end  # Aligned layout: each chunk holds rows of one group only.
    w0, w1, w2 = w
    xc = jax.lax.dynamic_slice_in_dim(x, pos, size)
    gate, up = _mm(xc, w0).astype(dtype), _mm(xc, w1).astype(dtype)
    y = _mm(jax.nn.silu(gate) * up, w2).astype(dtype)
    put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v, pos, 0)
    if not keep_residuals:
      return acc, (put(carry[0], y),)
    return acc, (put(carry[0], y), put(carry[1], gate), put(carry[2], up))

  carry = (jnp.zeros((m, d), dtype),)
  if keep_residuals:  # Only under differentiation: the backward pass reads gate and up.
    carry += (jnp.zeros((m, f), dtype), jnp.zeros((m, f), dtype))
  return gmm_lib.for_each_group_chunk(
      group_sizes, group_offset, wi_0.shape[0], tile, m, chunk, carry,
      group_start=lambda e: ((wi_0[e], wi_1[e], wo[e]), ()))


def _check(x, tile):
  if x.shape[0] % tile:
    raise ValueError(f'grouped_ffn.swiglu needs a row count that is a multiple of the tile '
                     f'({x.shape[0]} rows, tile {tile}); lay rows out with '
                     f'dispatch.sort_by_expert(align=tile)')


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def swiglu(x, wi_0, wi_1, wo, group_sizes, group_offset, tile):
  """See the module docstring. x `[P, embed]` (P a multiple of `tile`) -> `[P, embed]`."""
  _check(x, tile)
  return _forward(x, wi_0, wi_1, wo, group_sizes, group_offset, tile, False)[0]


def _swiglu_fwd(x, wi_0, wi_1, wo, group_sizes, group_offset, tile):
  _check(x, tile)
  out, gate, up = _forward(x, wi_0, wi_1, wo, group_sizes, group_offset, tile, True)
  return out, (x, wi_0, wi_1, wo, group_sizes, group_offset, gate, up)


def _swiglu_bwd(tile, residuals, dy):
  x, wi_0, wi_1, wo, group_sizes, group_offset, gate_all, up_all = residuals
  m, d = x.shape
  f = wi_0.shape[2]
  dtype = x.dtype
  dy = dy.astype(dtype)
  t = ((0,), (0,))  # a^T @ b over the chunk's rows: a weight gradient.
  tt = ((1,), (1,))  # a @ w^T: an input gradient.

  def chunk(w, start, end, pos, size, acc, dx):
    del start, end
    w0, w1, w2 = w
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, pos, size)
    xc, dyc = sl(x), sl(dy)
    gate, up = sl(gate_all).astype(jnp.float32), sl(up_all).astype(jnp.float32)
    sig = jax.nn.sigmoid(gate)
    act = gate * sig  # silu(gate)
    h = (act * up).astype(dtype)
    dh = _mm(dyc, w2, tt)  # [size, mlp]
    dup = (dh * act).astype(dtype)
    dgate = (dh * up * sig * (1 + gate * (1 - sig))).astype(dtype)  # silu' = s (1 + g (1 - s))
    dxc = _mm(dgate, w0, tt) + _mm(dup, w1, tt)
    dx = jax.lax.dynamic_update_slice_in_dim(dx, dxc.astype(dtype), pos, 0)
    d0, d1, d2 = acc
    return (d0 + _mm(xc, dgate, t), d1 + _mm(xc, dup, t), d2 + _mm(h, dyc, t)), dx

  def group_start(e):
    acc = (jnp.zeros((d, f), jnp.float32), jnp.zeros((d, f), jnp.float32),
           jnp.zeros((f, d), jnp.float32))
    return (wi_0[e], wi_1[e], wo[e]), acc

  def group_done(e, acc, carry):
    dx, dws = carry
    return dx, tuple(jax.lax.dynamic_update_index_in_dim(dw, a.astype(dw.dtype), e, 0)
                     for dw, a in zip(dws, acc))

  def chunk_with_dws(w, start, end, pos, size, acc, carry):
    dx, dws = carry
    acc, dx = chunk(w, start, end, pos, size, acc, dx)
    return acc, (dx, dws)

  dws = tuple(jnp.zeros(w.shape, w.dtype) for w in (wi_0, wi_1, wo))
  dx, (dw0, dw1, dwo) = gmm_lib.for_each_group_chunk(
      group_sizes, group_offset, wi_0.shape[0], tile, m, chunk_with_dws,
      (jnp.zeros((m, d), dtype), dws), group_start=group_start, group_done=group_done)
  return dx, dw0, dw1, dwo, None, None


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
