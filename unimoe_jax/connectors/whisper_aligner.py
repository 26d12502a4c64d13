"""Uni-MoE's speech aligner: learned query tokens read the Whisper encoder through a Whisper
decoder.

The official code (`Uni_MoE_speech/model/audio_aligner/whisper_decoder.py`, `llava_arch.py`)
loads `WhisperModel.from_pretrained(...).decoder` and calls it as

    decoder(inputs_embeds=query_tokens.expand(batch, -1, -1), encoder_hidden_states=encoder_out)

so, exactly as Hugging Face's `WhisperDecoder` does with `inputs_embeds`:
  * the queries get the decoder's *learned* positions 0 .. num_query-1 added (no embedding scale),
  * self-attention among the queries is CAUSAL (the decoder always builds its causal mask;
    query i sees queries 0..i), with no padding mask,
  * cross-attention sees every encoder frame (the official code passes no encoder mask;
    `encoder_mask` here is an extension for padded inputs, default None = the official path),
  * pre-LN layers and the decoder's final LayerNorm; the token embedding is never used.
Uni-MoE runs one 30 s chunk at a time, so `num_query_tokens` (50) tokens come out per chunk.
Whisper-small has no dropout (all rates 0.0), so none is applied. The projection to the LLM
width is a separate module (connectors/projector.py).

Parameters:
  query_tokens         `[num_query, d_model]` (None, 'embed')
  position_embedding   `[max_target_positions, d_model]` (None, 'embed'): the whole learned table
                       of the checkpoint; only the first num_query rows are read.
  layers_{i}           self_attn_norm, self_attn, cross_attn_norm, cross_attn, mlp_norm, mlp
  final_norm           LayerNorm.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import partitioning
from unimoe_jax.config import check_positive, from_table
from unimoe_jax.encoders.whisper import WHISPER_ATTENTION_BIAS, WHISPER_SIZES, WhisperStackConfig
from unimoe_jax.layers.encoder_blocks import ENCODER_HIDDEN_AXES
from unimoe_jax.layers.encoder_blocks import GeluMLP, LayerNorm, MultiHeadAttention


@gin.configurable
@dataclasses.dataclass(frozen=True)
class WhisperAlignerConfig(WhisperStackConfig):
  """Sizes of the query-token Whisper decoder: `WhisperStackConfig`'s (the Whisper checkpoint's
  `d_model`, `decoder_layers`, `decoder_attention_heads`, `decoder_ffn_dim`), and

  Attributes:
    num_query_tokens: learned queries, i.e. output tokens per audio chunk (the official
      `query_tokens_size` default is 50).
    max_target_positions: rows of the learned position table (448 in Whisper).
    causal: causal self-attention among the queries. True is what the official code does (it
      runs Hugging Face's WhisperDecoder, which is always causal); False lets every query see
      every other.
  """

  num_query_tokens: int = 50
  max_target_positions: int = 448
  causal: bool = True

  def __post_init__(self):
    super().__post_init__()
    check_positive(self, 'num_query_tokens', 'max_target_positions')
    if self.num_query_tokens > self.max_target_positions:
      raise ValueError(
          f'WhisperAlignerConfig.num_query_tokens={self.num_query_tokens} exceeds '
          f'max_target_positions={self.max_target_positions} (one learned position '
          'per query)'
      )


def _decoder_of(size: str, **own) -> WhisperAlignerConfig:
  """The aligner on the decoder of Whisper `size`: a Whisper decoder has its encoder's sizes
  (every `WhisperStackConfig` field of WHISPER_SIZES[size]), so only the query count and
  positions (`own`, else the defaults) are its own."""
  encoder = WHISPER_SIZES[size]
  stack = {f.name: getattr(encoder, f.name) for f in dataclasses.fields(WhisperStackConfig)}
  return WhisperAlignerConfig(**stack, **own)


ALIGNER_SIZES = {
    'whisper-small': _decoder_of('whisper-small'),  # The defaults: 50 queries, 448 positions.
    'tiny': _decoder_of('tiny', num_query_tokens=8, max_target_positions=16),
}


@gin.configurable
def named(size: str, **overrides) -> WhisperAlignerConfig:
  """`ALIGNER_SIZES[size]` with fields replaced (`config.from_table`)."""
  return from_table(ALIGNER_SIZES, size, overrides, 'Whisper aligner')


class WhisperAlignerLayer(nn.Module):
  """Pre-LN causal self-attention, cross-attention, MLP: `[batch, queries, embed]` in and out."""

  config: WhisperAlignerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      encoder_out: jax.Array,
      self_mask: Optional[jax.Array],
      cross_mask: Optional[jax.Array],
  ) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.normal(cfg.init_std)
    attention = lambda name: MultiHeadAttention(  # pylint: disable=g-long-lambda
        cfg.num_heads,
        cfg.head_dim,
        use_bias=WHISPER_ATTENTION_BIAS,
        kernel_init=init,
        name=name,
        **kw,
    )
    h = LayerNorm(cfg.layer_norm_eps, name='self_attn_norm', **kw)(x)
    x = x + attention('self_attn')(h, mask=self_mask)
    h = LayerNorm(cfg.layer_norm_eps, name='cross_attn_norm', **kw)(x)
    x = x + attention('cross_attn')(h, kv=encoder_out, mask=cross_mask)
    h = LayerNorm(cfg.layer_norm_eps, name='mlp_norm', **kw)(x)
    x = x + GeluMLP(cfg.ffn_dim, act=cfg.act, kernel_init=init, name='mlp', **kw)(h)
    return partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)


class WhisperAligner(nn.Module):
  """`__call__(encoder_out [batch, frames, d_model], encoder_mask [batch, frames] bool or None)
  -> [batch, num_query_tokens, d_model]`.

  `encoder_mask` True marks frames to attend to; None attends to all (the official behaviour).
  """

  config: WhisperAlignerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encoder_out: jax.Array, encoder_mask: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.config
    if encoder_out.ndim != 3:
      raise ValueError(
          f'WhisperAligner: encoder_out must be [batch, frames, d_model], got '
          f'shape {encoder_out.shape}'
      )
    batch, frames = encoder_out.shape[:2]
    cross_mask = None
    if encoder_mask is not None:
      if encoder_mask.shape != (batch, frames):
        raise ValueError(
            f'WhisperAligner: encoder_mask shape {encoder_mask.shape} != '
            f'[batch, frames] = {(batch, frames)}'
        )
      cross_mask = encoder_mask.astype(bool)[:, None, None, :]
    n = cfg.num_query_tokens
    self_mask = None
    if cfg.causal:
      self_mask = jnp.asarray(np.tril(np.ones((n, n), bool)))[None, None]

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    queries = self.param(
        'query_tokens',
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), (None, 'embed')),
        (n, cfg.d_model),
        self.param_dtype,
    )
    positions = self.param(
        'position_embedding',
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), (None, 'embed')),
        (cfg.max_target_positions, cfg.d_model),
        self.param_dtype,
    )
    x = (queries + positions[:n]).astype(self.dtype)
    x = jnp.broadcast_to(x[None], (batch, n, cfg.d_model))
    x = partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)
    encoder_out = partitioning.with_sharding_constraint(
        encoder_out.astype(self.dtype), ENCODER_HIDDEN_AXES
    )
    for i in range(cfg.num_layers):
      x = WhisperAlignerLayer(cfg, name=f'layers_{i}', **kw)(x, encoder_out, self_mask, cross_mask)
    return LayerNorm(cfg.layer_norm_eps, name='final_norm', **kw)(x)
