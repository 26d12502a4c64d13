"""The SwiGLU experts as one tiled loop: gate, up, silu and down of each row chunk together.

    swiglu(rows [P, embed], experts, group_sizes [G], group_offset, tile, lora_scale, dropout)
        -> [P, embed]
    out[r] = down_e(silu(gate_e(x[r])) * up_e(x[r])),  e = g(r) - group_offset
    proj_e(h) = h @ kernel[e]  (+ lora_scale * drop(h) @ lora_a[e] @ lora_b[e])

`experts` is the `{'wi_0'|'wi_1'|'wo': {'kernel', optional 'lora_a', 'lora_b'}}` dict of
`dispatch.py` (gate, up, down), each `[E_local, in, out]`. Rows are in the tile-aligned
expert-sorted layout of `dispatch.sort_by_expert(align=tile)`: every group starts at a
multiple of `tile` and holds a multiple of `tile` rows. Rows outside the local groups (other
shards' experts, trailing padding) come out zero.

Why this exists beside `grouped_matmul.gmm(backend='tiled')`: three (nine with LoRA) separate
grouped matmuls each fill a full-size output buffer (XLA:CPU zero-initialises every
loop-carried buffer), and their backward passes add as many again. Here each chunk of rows
runs the whole FFN while its activations are hot: the forward writes the `[P, embed]` output
and, only when differentiated, the gate and up activations (the residuals); the hand-written
backward writes one `[P, embed]` input gradient and accumulates every weight gradient per
expert in the same loop (megablox's tgmm, fused). Gradients nobody asks for (a frozen
kernel under LoRA) are dropped by XLA's dead-code elimination. Same FLOPs as the unfused
path; LoRA dropout masks are drawn per chunk (`LoRADropout(..., salt=chunk start)`), so they
differ from the unfused path's draws but follow the same distribution.
"""

import functools

import jax
import jax.numpy as jnp

from unimoe_jax.layers.lora import EXPERT_PROJECTIONS, LoRADropout
from unimoe_jax.moe import grouped_matmul as gmm_lib

_T = ((0,), (0,))  # a^T @ b over a chunk's rows: a weight gradient.
_TT = ((1,), (1,))  # a @ w^T: an input gradient.


def _mm(a, b, contract=((1,), (0,))):
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _proj(p, h, name, pos, scale, drop):
  """One projection of a chunk, float32: `[size, in] -> [size, out]`."""
  y = _mm(h, p['kernel'])
  if 'lora_a' in p:
    hd = h if drop is None else drop(h, name, salt=pos)
    z = _mm(hd, p['lora_a']).astype(h.dtype)
    y = y + scale * _mm(z, p['lora_b'])
  return y


def _proj_bwd(p, h, g, name, pos, scale, drop):
  """(dh float32 `[size, in]`, {leaf: float32 weight gradient}) of `_proj` for cotangent g."""
  dh = _mm(g, p['kernel'], _TT)
  grads = {'kernel': _mm(h, g, _T)}
  if 'lora_a' in p:
    masked = lambda a: a
    if drop is not None:  # The forward's mask, drawn once here for h and for its gradient.
      keep = drop.keep(h.shape, name, salt=pos)
      masked = lambda a: drop.apply(a, keep)
    hd = masked(h)
    z = _mm(hd, p['lora_a']).astype(h.dtype)
    gs = (scale * g).astype(h.dtype)
    dz = _mm(gs, p['lora_b'], _TT).astype(h.dtype)  # [size, rank]
    grads['lora_b'] = _mm(z, gs, _T)
    grads['lora_a'] = _mm(hd, dz, _T)
    dh = dh + masked(_mm(dz, p['lora_a'], _TT))
  return dh, grads


def _dropout(key, rate):
  return None if key is None or rate == 0 else LoRADropout(rate, key)


def _slice_experts(experts, e):
  return jax.tree_util.tree_map(lambda a: a[e], experts)


def _num_local(experts):
  return experts['wi_0']['kernel'].shape[0]


def _forward(x, experts, group_sizes, group_offset, key, tile, scale, rate, keep_residuals):
  m, d = x.shape
  f = experts['wi_0']['kernel'].shape[2]
  dtype = x.dtype

  drop = _dropout(key, rate)

  def chunk(w, start, end, pos, size, acc, carry):
    del start, end  # Aligned layout: each chunk holds rows of one group only.
    xc = jax.lax.dynamic_slice_in_dim(x, pos, size)
    proj = lambda name, h: _proj(w[name], h, name, pos, scale, drop).astype(dtype)
    gate, up = proj('wi_0', xc), proj('wi_1', xc)
    y = proj('wo', jax.nn.silu(gate) * up)
    put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v, pos, 0)
    if not keep_residuals:
      return acc, (put(carry[0], y),)
    return acc, (put(carry[0], y), put(carry[1], gate), put(carry[2], up))

  carry = (jnp.zeros((m, d), dtype),)
  if keep_residuals:  # Only under differentiation: the backward pass reads gate and up.
    carry += (jnp.zeros((m, f), dtype), jnp.zeros((m, f), dtype))
  return gmm_lib.for_each_group_chunk(
      group_sizes,
      group_offset,
      _num_local(experts),
      tile,
      m,
      chunk,
      carry,
      group_start=lambda e: (_slice_experts(experts, e), ()),
  )[0]


def _check(x, experts, tile):
  if x.shape[0] % tile:
    raise ValueError(
        f'grouped_ffn.swiglu needs a row count that is a multiple of the tile '
        f'({x.shape[0]} rows, tile {tile}); lay rows out with '
        f'dispatch.sort_by_expert(align=tile)'
    )
  if sorted(experts) != sorted(EXPERT_PROJECTIONS):
    raise ValueError(
        f'grouped_ffn.swiglu needs experts {EXPERT_PROJECTIONS}, ' f'got {sorted(experts)}'
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _swiglu(x, experts, group_sizes, group_offset, key, tile, scale, rate):
  return _forward(x, experts, group_sizes, group_offset, key, tile, scale, rate, False)[0]


def _swiglu_fwd(x, experts, group_sizes, group_offset, key, tile, scale, rate):
  out, gate, up = _forward(x, experts, group_sizes, group_offset, key, tile, scale, rate, True)
  return out, (x, experts, group_sizes, group_offset, key, gate, up)


def _swiglu_bwd(tile, scale, rate, residuals, dy):
  x, experts, group_sizes, group_offset, key, gate_all, up_all = residuals
  m, d = x.shape
  dtype = x.dtype
  dy = dy.astype(dtype)
  drop = _dropout(key, rate)

  def chunk(w, start, end, pos, size, acc, dx):
    del start, end
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, pos, size)
    xc, dyc = sl(x), sl(dy)
    gate, up = sl(gate_all).astype(jnp.float32), sl(up_all).astype(jnp.float32)
    sig = jax.nn.sigmoid(gate)
    act = gate * sig  # silu(gate)
    bwd = lambda name, h, g: _proj_bwd(w[name], h, g, name, pos, scale, drop)
    dh, g_wo = bwd('wo', (act * up).astype(dtype), dyc)
    dup = (dh * act).astype(dtype)
    dgate = (dh * up * sig * (1 + gate * (1 - sig))).astype(dtype)  # silu' = s (1 + g (1 - s))
    dx_gate, g_wi_0 = bwd('wi_0', xc, dgate)
    dx_up, g_wi_1 = bwd('wi_1', xc, dup)
    dx = jax.lax.dynamic_update_slice_in_dim(dx, (dx_gate + dx_up).astype(dtype), pos, 0)
    acc = jax.tree_util.tree_map(jnp.add, acc, {'wi_0': g_wi_0, 'wi_1': g_wi_1, 'wo': g_wo})
    return acc, dx

  def group_start(e):
    w = _slice_experts(experts, e)
    return w, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), w)

  def group_done(e, acc, dws):
    put = lambda dw, a: jax.lax.dynamic_update_index_in_dim(dw, a.astype(dw.dtype), e, 0)
    return jax.tree_util.tree_map(put, dws, acc)

  dx, dws = gmm_lib.for_each_group_chunk(
      group_sizes,
      group_offset,
      _num_local(experts),
      tile,
      m,
      chunk,
      jnp.zeros((m, d), dtype),
      group_start=group_start,
      group_done=group_done,
      results=jax.tree_util.tree_map(jnp.zeros_like, experts),
  )
  return dx, dws, None, None, None


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(x, experts, group_sizes, group_offset, tile, lora_scale=0.0, dropout=None):
  """See the module docstring. x `[P, embed]` (P a multiple of `tile`) -> `[P, embed]`.

  `dropout`: a `layers.lora.LoRADropout` (rate and key) for the LoRA inputs, or None.
  """
  _check(x, experts, tile)
  key, rate = (None, 0.0) if dropout is None else (dropout.key, float(dropout.rate))
  return _swiglu(
      x,
      experts,
      group_sizes,
      jnp.asarray(group_offset, jnp.int32),
      key,
      tile,
      float(lora_scale),
      rate,
  )
