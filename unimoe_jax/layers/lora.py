"""Linear projections that can carry low-rank adapters, and merging adapters into weights.

A projection's kernel has shape `in_shape + out_shape` (e.g. `[embed, heads, head_dim]` for a
query projection). With an adapter it also has

    lora_a  in_shape + [rank]          (random init, as PEFT's kaiming-uniform)
    lora_b  [rank] + out_shape         (zero init, so a new adapter changes nothing)

and computes `x·kernel + (alpha / rank) · dropout(x)·lora_a·lora_b`.

Expert weights are stacked with a leading expert axis: kernel `[expert, in, out]`, lora_a
`[expert, in, rank]`, lora_b `[expert, rank, out]` (one adapter per expert). Those are created
by `moe/layer.py`; `merge_lora` handles both layouts.
"""

from typing import Any, Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import layer_stacking
from unimoe_jax.config import LoRAConfig

Initializer = Callable[..., jax.Array]
EXPERT_PROJECTIONS = ('wi_0', 'wi_1', 'wo')  # An expert's gate, up and down matrices.


class LoRADropout(NamedTuple):
  """Dropout on the LoRA input of each expert projection (training only).

  One independent mask per projection, as PEFT's per-layer dropout modules give.
  `dropout(h, name)` masks a whole `[rows, in]` input; `salt` (the fused expert loop passes
  the chunk's first row) draws an independent mask for each part of the rows, so a loop can
  redraw the same mask in its backward pass.
  """

  rate: float
  key: jax.Array

  def keep(self, shape, name: str, salt=None) -> jax.Array:
    """The boolean mask of projection `name` (and `salt`)."""
    key = jax.random.fold_in(self.key, EXPERT_PROJECTIONS.index(name))
    if salt is not None:
      key = jax.random.fold_in(key, salt)
    return jax.random.bernoulli(key, 1.0 - self.rate, shape)

  def apply(self, h: jax.Array, keep: jax.Array) -> jax.Array:
    """`h` masked by `keep` and rescaled (also the mask's backward, applied to a gradient)."""
    return jnp.where(keep, h / (1.0 - self.rate), 0).astype(h.dtype)

  def __call__(self, h: jax.Array, name: str, salt=None) -> jax.Array:
    return self.apply(h, self.keep(h.shape, name, salt))


def lora_a_init(fan_in_dims: int, batch_dims: int = 0) -> Initializer:
  """PEFT initialises A like torch's Linear (kaiming-uniform, a=sqrt(5)): U(-1/sqrt(fan_in), ..).

  The shape is `batch + in + [rank]`: `batch_dims` leading axes stack independent adapters
  (the expert axis of `[expert, in, rank]`) and are not part of the fan-in; the next
  `fan_in_dims` axes are.
  """

  def init(key, shape, dtype=jnp.float32):
    fan_in = int(np.prod(shape[batch_dims : batch_dims + fan_in_dims]))
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def default_kernel_init(fan_in_dims: int) -> Initializer:
  """LLaMA's initializer_range=0.02 normal init, whatever the kernel's shape."""
  del fan_in_dims
  return nn.initializers.normal(stddev=0.02)


def _matmul(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """Contracts x's last `n_in` axes with kernel's first `n_in` axes as one 2-D GEMM.

  Flattening to `[rows, in] @ [in, out]` matters on XLA:CPU, where a rank-3 dot is slower
  than the same work as a rank-2 dot (docs/benchmarks.md, "Numbers the code's comments rely on").
  """
  lead, in_shape, out_shape = x.shape[:-n_in], kernel.shape[:n_in], kernel.shape[n_in:]
  in_size, out_size = int(np.prod(in_shape)), int(np.prod(out_shape))
  y = x.reshape(-1, in_size) @ kernel.reshape(in_size, out_size)
  return y.reshape(lead + out_shape)


class LoRADense(nn.Module):
  """`y = x·W` over the last `len(in_shape)` axes of x, with an optional LoRA adapter.

  Attributes:
    in_shape: the contracted trailing shape of x, e.g. `(embed,)` or `(heads, head_dim)`.
    out_shape: the output feature shape, e.g. `(heads, head_dim)`.
    kernel_axes: logical names of `in_shape + out_shape`.
    lora: adapter config, or None for a plain projection.
    dtype: compute dtype; the kernel is cast to it (params stay `param_dtype`).
  """

  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  kernel_axes: Tuple[str, ...]
  lora: Optional[LoRAConfig] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Optional[Initializer] = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: `[..., *in_shape]` -> `[..., *out_shape]`."""
    n_in = len(self.in_shape)
    if tuple(x.shape[-n_in:]) != tuple(self.in_shape):
      raise ValueError(f'{self.name}: input trailing shape {x.shape[-n_in:]} != {self.in_shape}')
    init = self.kernel_init or default_kernel_init(n_in)
    kernel = self.param(
        'kernel',
        nn.with_logical_partitioning(init, self.kernel_axes),
        self.in_shape + self.out_shape,
        self.param_dtype,
    )
    x = x.astype(self.dtype)
    y = _matmul(x, kernel.astype(self.dtype), n_in)
    if self.lora is not None:
      in_axes, out_axes = self.kernel_axes[:n_in], self.kernel_axes[n_in:]
      a = self.param(
          'lora_a',
          nn.with_logical_partitioning(lora_a_init(n_in), in_axes + ('lora_rank',)),
          self.in_shape + (self.lora.rank,),
          self.param_dtype,
      )
      b = self.param(
          'lora_b',
          nn.with_logical_partitioning(nn.initializers.zeros, ('lora_rank',) + out_axes),
          (self.lora.rank,) + self.out_shape,
          self.param_dtype,
      )
      h = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic)
      h = _matmul(h, a.astype(self.dtype), n_in)
      y = y + self.lora.scale * _matmul(h, b.astype(self.dtype), 1)
    return y


def merge_lora(params: Any, scale: float) -> Any:
  """Returns `params` with every adapter folded into its kernel and the adapter removed.

  `scale` is `LoRAConfig.scale` (alpha / rank). Plain kernels get `tensordot(a, b)`; stacked
  expert kernels `[expert, in, out]` get a per-expert product. The result is applied with a
  config whose `lora` is None. Scanned decoder layers (`layer_stacking.py`) are merged per
  layer and come back stacked as they went in.
  """
  stacked = {v for v in layer_stacking.decoder_layouts(params).values() if v is not None}
  if not stacked:
    return _merge_looped(params, scale)
  if len(stacked) != 1:
    raise ValueError(f'merge_lora: decoders stacked in different ways: {sorted(stacked)}')
  period, blocks = stacked.pop()
  merged = _merge_looped(layer_stacking.to_looped(params), scale)
  return layer_stacking.to_stacked(merged, period, period * blocks)


def _merge_looped(params: Any, scale: float) -> Any:
  if not isinstance(params, dict):
    return params
  out = {}
  for name, value in params.items():
    out[name] = _merge_looped(value, scale) if isinstance(value, dict) else value
  if 'lora_a' in out and 'lora_b' in out and 'kernel' in out:
    a, b, kernel = out.pop('lora_a'), out.pop('lora_b'), out['kernel']
    if kernel.ndim == a.ndim + b.ndim - 2:
      delta = jnp.tensordot(a, b, axes=1)
    elif kernel.ndim == 3 and a.ndim == 3 and b.ndim == 3:  # [expert, in, out]
      delta = jnp.einsum('eir,ero->eio', a, b)
    else:
      raise ValueError(
          f'merge_lora: cannot combine lora_a {a.shape} and lora_b {b.shape} into '
          f'kernel {kernel.shape}'
      )
    out['kernel'] = (kernel + scale * delta.astype(jnp.float32)).astype(kernel.dtype)
  return out


def lora_targets(lora: Optional[LoRAConfig], target: str) -> Optional[LoRAConfig]:
  """The adapter config for one kind of projection, or None when `target` is not adapted."""
  return lora if lora is not None and target in lora.targets else None
