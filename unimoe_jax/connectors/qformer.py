"""The BLIP-2 Q-Former that Uni-MoE uses to align BEATs audio features (query tokens only).

Uni-MoE's audio aligner (`Uni_MoE_audio/model/audio_aligner/`) builds a transformers
`Blip2QFormerModel` from BLIP-2's default Q-Former config (BERT-base: 12 post-LN layers of
width 768, cross-attention on every other layer, `encoder_hidden_size` = BEATs' 768) and feeds
it `query_tokens_size` = 50 learned query embeddings. No text goes in, so only the query path
of each layer exists here: self-attention over the queries, cross-attention to the encoder
frames on layers `i % cross_attention_frequency == 0`, and the query FFN. The linear projection
into the LLM that follows the Q-Former in the official aligner is not part of this module.

Parameter tree:

    query_tokens                                 [num_query, embed]
    embed_norm/{scale,bias}                      [embed]   (HF `layernorm`)
    layers_{i}/self_attention/{query,key,value,out}
    layers_{i}/self_attention_norm/{scale,bias}
    layers_{i}/cross_attention/{query,key,value,out}   only where i % frequency == 0;
                                       key/value kernels `[encoder_hidden, heads, head_dim]`
    layers_{i}/cross_attention_norm/{scale,bias}
    layers_{i}/mlp/{fc1,fc2}                     (HF `intermediate_query` / `output_query`)
    layers_{i}/mlp_norm/{scale,bias}
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from unimoe_jax import partitioning
from unimoe_jax.config import check_divisible, check_one_of, check_positive, from_table
from unimoe_jax.layers.encoder_blocks import ENCODER_HIDDEN_AXES
from unimoe_jax.layers.encoder_blocks import ACTIVATIONS, GeluMLP, LayerNorm, MultiHeadAttention


@gin.configurable
@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Sizes of a BLIP-2 Q-Former run on query tokens only.

  Attributes:
    hidden_size: width of the queries (and of the output).
    num_layers: BERT layers.
    num_heads: attention heads of both self- and cross-attention (head_dim = hidden/heads).
    intermediate_size: width of the query FFN.
    cross_attention_frequency: layer `i` cross-attends to the encoder iff `i % freq == 0`.
    encoder_hidden_size: width of the encoder features attended to (BEATs: 768).
    num_query_tokens: learned queries, i.e. output tokens per example.
    layer_norm_eps: epsilon of every LayerNorm.
    act: FFN activation, a key of `layers.encoder_blocks.ACTIVATIONS`.
    init_std: normal std of every kernel, and query at initialisation
      (HF's 0.02); tiny randomly initialised configurations need more (multimodal_tiny.gin).
  """

  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 768
  num_query_tokens: int = 32
  layer_norm_eps: float = 1e-12
  act: str = 'gelu'
  init_std: float = 0.02

  def __post_init__(self):
    check_positive(
        self,
        'hidden_size',
        'num_layers',
        'num_heads',
        'intermediate_size',
        'cross_attention_frequency',
        'encoder_hidden_size',
        'num_query_tokens',
        'layer_norm_eps',
    )
    check_divisible(self, 'hidden_size', 'num_heads')
    check_one_of(self, 'act', ACTIVATIONS)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def has_cross_attention(self, layer_idx: int) -> bool:
    return layer_idx % self.cross_attention_frequency == 0


QFORMER_SIZES = {
    # Uni-MoE audio: BLIP-2's default Q-Former config (the defaults) over BEATs (width 768, the
    # default encoder_hidden_size), with the aligner's `query_tokens_size` default of 50 queries.
    'uni-moe-audio': QFormerConfig(num_query_tokens=50),
    'tiny': QFormerConfig(
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        intermediate_size=48,
        encoder_hidden_size=24,
        num_query_tokens=8,
    ),
}


@gin.configurable
def named(size: str, **overrides) -> QFormerConfig:
  """`QFORMER_SIZES[size]` with fields replaced (`config.from_table`)."""
  return from_table(QFORMER_SIZES, size, overrides, 'Q-Former')


class QFormerLayer(nn.Module):
  """One post-LN BERT layer on the queries: `[batch, num_query, hidden]` -> same.

  `encoder_states [batch, frames, encoder_hidden]` and `cross_mask` (bool, broadcastable to
  `[batch, heads, num_query, frames]`) are used only when the layer has cross-attention.
  """

  config: QFormerConfig
  has_cross_attention: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, encoder_states: jax.Array, cross_mask: Optional[jax.Array]
  ) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: LayerNorm(cfg.layer_norm_eps, name=name, **kw)  # pylint: disable=unnecessary-lambda-assignment
    init = nn.initializers.normal(cfg.init_std)
    attention = lambda name: MultiHeadAttention(
        cfg.num_heads,
        cfg.head_dim,
        kernel_init=init,  # pylint: disable=g-long-lambda
        name=name,
        **kw,
    )

    x = norm('self_attention_norm')(x + attention('self_attention')(x))
    x = partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)
    if self.has_cross_attention:
      h = attention('cross_attention')(x, kv=encoder_states, mask=cross_mask)
      x = norm('cross_attention_norm')(x + h)
      x = partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)
    h = GeluMLP(cfg.intermediate_size, cfg.act, kernel_init=init, name='mlp', **kw)(x)
    x = norm('mlp_norm')(x + h)
    return partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)


class QFormer(nn.Module):
  """Learned queries that read encoder frames: `[batch, frames, encoder_hidden]` ->
  `[batch, num_query, hidden]` (in `dtype`)."""

  config: QFormerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, encoder_states: jax.Array, encoder_mask: Optional[jax.Array] = None
  ) -> jax.Array:
    """Runs the Q-Former.

    Args:
      encoder_states: `[batch, frames, encoder_hidden_size]` encoder features.
      encoder_mask: `[batch, frames]` bool, True = a real frame; None attends to every frame.
        An example with no real frame gives a finite output that no frame influences.
    Returns:
      `[batch, num_query_tokens, hidden_size]` in `dtype`.
    """
    cfg = self.config
    batch, frames, width = encoder_states.shape
    if width != cfg.encoder_hidden_size:
      raise ValueError(
          f'QFormer: encoder_states width {width} != '
          f'encoder_hidden_size {cfg.encoder_hidden_size}'
      )
    query_tokens = self.param(
        'query_tokens',
        nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ('query_tokens', 'embed')
        ),
        (cfg.num_query_tokens, cfg.hidden_size),
        self.param_dtype,
    )

    encoder_states = encoder_states.astype(self.dtype)
    cross_mask = None
    if encoder_mask is not None:
      if encoder_mask.shape != (batch, frames):
        raise ValueError(
            f'QFormer: encoder_mask shape {encoder_mask.shape} != ' f'{(batch, frames)}'
        )
      encoder_mask = encoder_mask.astype(bool)
      # Masked logits are replaced, so masked frames get exactly zero weight whenever a row has
      # one real frame. A row with none attends uniformly to all of them; zeroing the frames
      # makes that output the same whatever the padding holds.
      encoder_states = jnp.where(
          encoder_mask[:, :, None], encoder_states, jnp.zeros((), self.dtype)
      )
      cross_mask = encoder_mask[:, None, None, :]
    encoder_states = partitioning.with_sharding_constraint(encoder_states, ENCODER_HIDDEN_AXES)

    x = jnp.broadcast_to(
        query_tokens.astype(self.dtype)[None], (batch, cfg.num_query_tokens, cfg.hidden_size)
    )
    x = LayerNorm(
        cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name='embed_norm'
    )(x)
    x = partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)
    for i in range(cfg.num_layers):
      x = QFormerLayer(
          cfg,
          cfg.has_cross_attention(i),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f'layers_{i}',
      )(x, encoder_states, cross_mask)
    return x
