"""Building blocks of the encoder-style transformers (CLIP, Whisper, Q-Former, BEATs).

Unlike the LLaMA decoder these towers use biased projections, LayerNorm and GELU MLPs. The
blocks here hold only what all of them share; each tower composes them in its own file.

Parameter names and logical axes:
  Dense            kernel `[in, out]` (axes given), bias `[out]` (the out axis)
  LayerNorm        scale, bias `[embed]` ('norm')
  MultiHeadAttention  query/key/value kernel `[embed, heads, head_dim]`
                   ('embed', 'heads', 'head_dim'), bias `[heads, head_dim]`; out kernel
                   `[heads, head_dim, embed]`, bias `[embed]`.
  GeluMLP          fc1 `[embed, mlp]`, fc2 `[mlp, embed]` (+ biases).
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import partitioning

Initializer = Any
# HF's initializer_range / init_std for these towers; each tower's config overrides it
# (`init_std`) where a narrow width needs more (see gin/models/multimodal_tiny.gin).
default_init = nn.initializers.normal(stddev=0.02)


class Dense(nn.Module):
  """`x · W (+ b)` over x's last `len(in_shape)` axes: `[..., *in_shape] -> [..., *out_shape]`."""

  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  kernel_axes: Tuple[str, ...]
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = default_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    if tuple(x.shape[-n_in:]) != tuple(self.in_shape):
      raise ValueError(f'{self.name}: input trailing shape {x.shape[-n_in:]} != {self.in_shape}')
    kernel = self.param(
        'kernel',
        nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        tuple(self.in_shape) + tuple(self.out_shape),
        self.param_dtype,
    )
    in_size, out_size = int(np.prod(self.in_shape)), int(np.prod(self.out_shape))
    lead = x.shape[:-n_in]
    # A 2-D GEMM: rank-3 dots ran slower on XLA:CPU (see layers/lora.py).
    y = x.astype(self.dtype).reshape(-1, in_size) @ kernel.astype(self.dtype).reshape(
        in_size, out_size
    )
    y = y.reshape(lead + tuple(self.out_shape))
    if self.use_bias:
      bias = self.param(
          'bias',
          nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[n_in:]),
          tuple(self.out_shape),
          self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm over the last axis; statistics in float32, output in `dtype`."""

  epsilon: float = 1e-5
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param(
        'scale',
        nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
        (d,),
        self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param(
          'bias',
          nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
          (d,),
          self.param_dtype,
      )
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # HF 'gelu' is the exact erf form.
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's activation.
    'relu': jax.nn.relu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


class GeluMLP(nn.Module):
  """`fc2(act(fc1 x))`: `[..., embed] -> [..., embed]` (act: a key of ACTIVATIONS)."""

  mlp_dim: int
  act: str = 'gelu'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = default_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    h = Dense((d,), (self.mlp_dim,), ('embed', 'mlp'), name='fc1', **kw)(x)
    h = activation(self.act)(h)
    h = partitioning.with_sharding_constraint(
        h, ('activation_batch', 'activation_length', 'activation_mlp')
    )
    return Dense((self.mlp_dim,), (d,), ('mlp', 'embed'), name='fc2', **kw)(h)


class MultiHeadAttention(nn.Module):
  """Self- or cross-attention with biased projections (no rotary).

  `__call__(x [batch, q_len, embed], kv [batch, kv_len, kv_embed] or None (self-attention),
  mask: bool broadcastable to [batch, heads, q_len, kv_len] (True = attend),
  bias: float broadcastable to the same, added to the logits)` -> `[batch, q_len, embed]`.

  Logits are `q·k / sqrt(head_dim)` with the softmax in float32. `use_bias` is per projection
  (query, key, value, out): Whisper's key projection has no bias.
  """

  num_heads: int
  head_dim: int
  use_bias: Sequence[bool] = (True, True, True, True)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = default_init

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      kv: Optional[jax.Array] = None,
      mask: Optional[jax.Array] = None,
      bias: Optional[jax.Array] = None,
  ) -> jax.Array:
    kv = x if kv is None else kv
    embed, kv_embed = x.shape[-1], kv.shape[-1]
    h, hd = self.num_heads, self.head_dim
    qb, kb, vb, ob = self.use_bias
    dense = lambda name, i, o, axes, b: Dense(
        i,
        o,
        axes,
        use_bias=b,
        dtype=self.dtype,  # pylint: disable=g-long-lambda
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        name=name,
    )
    q = dense('query', (embed,), (h, hd), ('embed', 'heads', 'head_dim'), qb)(x)
    k = dense('key', (kv_embed,), (h, hd), ('embed', 'heads', 'head_dim'), kb)(kv)
    v = dense('value', (kv_embed,), (h, hd), ('embed', 'heads', 'head_dim'), vb)(kv)
    q, k, v = (partitioning.with_sharding_constraint(t, partitioning.HEAD_AXES) for t in (q, k, v))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    logits = logits / np.sqrt(hd).astype(np.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    out = partitioning.with_sharding_constraint(out, partitioning.HEAD_AXES)
    return dense('out', (h, hd), (embed,), ('heads', 'head_dim', 'embed'), ob)(out)


# The logical axes of an encoder tower's hidden states `[batch, tokens, embed]`.
ENCODER_HIDDEN_AXES = ('activation_batch', 'activation_length', 'activation_embed')


class PreLNEncoderLayer(nn.Module):
  """The pre-LN block of the CLIP and Whisper encoders: `x + attn(norm1 x)`, then
  `+ mlp(norm2 ·)`; `[batch, tokens, embed]` in and out.

  `names` (first norm, attention, second norm, MLP) are the sub-modules' parameter names, which
  each tower keeps as its checkpoints have them; `attention_bias` is per projection (query, key,
  value, out), as `MultiHeadAttention.use_bias`.
  """

  num_heads: int
  head_dim: int
  mlp_dim: int
  act: str
  layer_norm_eps: float
  init_std: float
  names: Tuple[str, str, str, str]
  attention_bias: Sequence[bool] = (True, True, True, True)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm1, attention, norm2, mlp = self.names
    init = nn.initializers.normal(self.init_std)
    h = LayerNorm(self.layer_norm_eps, name=norm1, **kw)(x)
    x = x + MultiHeadAttention(
        self.num_heads,
        self.head_dim,
        use_bias=self.attention_bias,
        kernel_init=init,
        name=attention,
        **kw,
    )(h)
    x = partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)
    h = LayerNorm(self.layer_norm_eps, name=norm2, **kw)(x)
    x = x + GeluMLP(self.mlp_dim, act=self.act, kernel_init=init, name=mlp, **kw)(h)
    return partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)
