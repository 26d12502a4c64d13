"""The Whisper speech encoder (Radford et al., 2022), the speech tower of Uni-MoE.

Uni-MoE keeps this tower frozen and takes its final output (`mm_audio_select_layer = 0` picks
`last_hidden_state`, i.e. after the final LayerNorm). One 30 s chunk of 16 kHz audio is
`[3000, 80]` log-mel frames and becomes 1500 tokens of width 768 (whisper-small).

Layout (Hugging Face `WhisperEncoder`):
  conv1 (kernel 3, pad 1) -> GELU -> conv2 (kernel 3, stride 2, pad 1) -> GELU
  + fixed sinusoidal positions (computed here, never a parameter)
  pre-LN layers: x += attn(LN(x)); x += fc2(gelu(fc1(LN(x))))   (key projection without bias)
  final LayerNorm.

Parameters:
  conv1 / conv2   Dense kernel `[3, in, embed]` (taps, input channels, output channels), bias
                  `[embed]`: a convolution is a Dense over the 3-frame windows.
  layers_{i}      attn_norm, attn (MultiHeadAttention), mlp_norm, mlp (GeluMLP)
  final_norm      LayerNorm.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import partitioning
from unimoe_jax.config import check_divisible, check_one_of, check_positive, from_table
from unimoe_jax.layers.encoder_blocks import ACTIVATIONS, ENCODER_HIDDEN_AXES, Dense, LayerNorm
from unimoe_jax.layers.encoder_blocks import PreLNEncoderLayer, activation

# Whisper's attention projections (query, key, value, out): the key has no bias, in the encoder
# and in the decoder (connectors/whisper_aligner.py).
WHISPER_ATTENTION_BIAS = (True, False, True, True)


@dataclasses.dataclass(frozen=True)
class WhisperStackConfig:
  """The sizes a Whisper encoder and the decoder stack of the same checkpoint share: a Whisper
  decoder has its encoder's width, depth, heads and FFN, and the speech aligner
  (`connectors/whisper_aligner.py`) is that decoder. Not configured by gin itself: bind the
  fields of `WhisperEncoderConfig` or `WhisperAlignerConfig`.

  Attributes:
    d_model: width of the tokens.
    num_layers, num_heads, ffn_dim: the transformer's sizes.
    act: MLP activation (a key of layers.encoder_blocks.ACTIVATIONS; Whisper uses exact 'gelu').
    layer_norm_eps: LayerNorm epsilon (torch's default 1e-5 in Whisper).
    init_std: normal std of every kernel (and the aligner's queries and positions) at
      initialisation (HF's `init_std`, 0.02). Only a randomly initialised stack (the CPU
      demo's) depends on it: at width 32, 0.02 leaves the encoder stem's output a few percent
      of the positional embedding, so every output is nearly the same whatever the audio
      (gin/models/multimodal_tiny.gin widens it).
  """

  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  ffn_dim: int = 3072
  act: str = 'gelu'
  layer_norm_eps: float = 1e-5
  init_std: float = 0.02

  def __post_init__(self):
    check_positive(self, 'd_model', 'num_layers', 'num_heads', 'ffn_dim')
    check_divisible(self, 'd_model', 'num_heads')
    check_one_of(self, 'act', ACTIVATIONS)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


@gin.configurable
@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig(WhisperStackConfig):
  """Sizes of a Whisper encoder: `WhisperStackConfig`'s, and

  Attributes:
    num_mel_bins: log-mel channels of the input (80 for whisper-small).
    max_source_positions: output tokens; the input must have exactly twice as many frames.
  """

  num_mel_bins: int = 80
  max_source_positions: int = 1500

  def __post_init__(self):
    super().__post_init__()
    check_positive(self, 'num_mel_bins', 'max_source_positions')
    if self.d_model % 2:
      raise ValueError(
          f'WhisperEncoderConfig.d_model={self.d_model} must be even '
          '(half the sinusoid channels are sines, half cosines)'
      )

  @property
  def num_frames(self) -> int:
    """Log-mel frames the encoder takes: conv2 halves the time axis."""
    return 2 * self.max_source_positions


# 'tiny' keeps the real input shape (the default 80 mels and 1500 positions: 3000 frames, as the
# feature extractor produces) with toy widths, so that pipelines can be tested end to end on CPU.
WHISPER_SIZES = {
    'whisper-small': WhisperEncoderConfig(),  # The defaults are whisper-small's sizes.
    'tiny': WhisperEncoderConfig(d_model=32, num_layers=2, num_heads=4, ffn_dim=64),
}


@gin.configurable
def named(size: str, **overrides) -> WhisperEncoderConfig:
  """`WHISPER_SIZES[size]` with fields replaced (`config.from_table`)."""
  return from_table(WHISPER_SIZES, size, overrides, 'Whisper encoder')


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  """Whisper's fixed positions `[length, channels]` float32: sines then cosines.

  The argument `position * inv_timescale` is rounded to float32 as in the reference (and the
  released checkpoints); with float64 arguments late positions would drift by ~1e-4.
  """
  if channels % 2:
    raise ValueError(f'sinusoids: channels={channels} must be even')
  increment = np.log(max_timescale) / (channels // 2 - 1)
  inv_timescales = np.exp(np.float32(-increment) * np.arange(channels // 2, dtype=np.float32))
  scaled_time = (
      np.arange(length, dtype=np.float32)[:, None] * inv_timescales.astype(np.float32)[None, :]
  )
  scaled_time = scaled_time.astype(np.float64)
  return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


def conv1d_windows(x: jax.Array, kernel_size: int, stride: int, padding: int) -> jax.Array:
  """`[batch, time, channels] -> [batch, out_time, kernel_size, channels]` (zero padding).

  Gathering the taps and applying a Dense is a 1-D convolution done as one 2-D GEMM.
  """
  time = x.shape[1]
  out_time = (time + 2 * padding - kernel_size) // stride + 1
  x = jnp.pad(x, ((0, 0), (padding, padding), (0, 0)))
  span = stride * (out_time - 1) + 1
  taps = [x[:, k : k + span : stride] for k in range(kernel_size)]
  return jnp.stack(taps, axis=2)


def whisper_encoder_layer(cfg: WhisperEncoderConfig, **kwargs) -> PreLNEncoderLayer:
  """Whisper's pre-LN encoder block (its key projection has no bias)."""
  return PreLNEncoderLayer(
      cfg.num_heads,
      cfg.head_dim,
      cfg.ffn_dim,
      cfg.act,
      cfg.layer_norm_eps,
      cfg.init_std,
      names=('attn_norm', 'attn', 'mlp_norm', 'mlp'),
      attention_bias=WHISPER_ATTENTION_BIAS,
      **kwargs,
  )


class WhisperEncoder(nn.Module):
  """`__call__(log_mel [batch, frames, n_mels] float) -> [batch, frames // 2, d_model]`.

  `frames` must be `2 * config.max_source_positions` (3000 for 30 s): Whisper pads every chunk
  to 30 s and its positions are fixed to that length.
  """

  config: WhisperEncoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, log_mel: jax.Array) -> jax.Array:
    cfg = self.config
    if log_mel.ndim != 3 or log_mel.shape[2] != cfg.num_mel_bins:
      raise ValueError(
          f'WhisperEncoder: log_mel must be [batch, frames, n_mels={cfg.num_mel_bins}]'
          f' (time-major), got shape {log_mel.shape}'
      )
    if log_mel.shape[1] != cfg.num_frames:
      raise ValueError(
          f'WhisperEncoder: expected {cfg.num_frames} log-mel frames '
          f'(2 * max_source_positions={cfg.max_source_positions}), got '
          f'{log_mel.shape[1]}; pad or trim the features to {cfg.num_frames} frames'
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gelu = activation('gelu')  # The stem uses exact GELU whatever `act` the layers use.
    x = log_mel.astype(self.dtype)
    init = nn.initializers.normal(cfg.init_std)
    # The stem: two kernel-3 convolutions (conv2 halves the time axis), each followed by GELU.
    for name, in_channels, stride in (('conv1', cfg.num_mel_bins, 1), ('conv2', cfg.d_model, 2)):
      conv = Dense(
          (3, in_channels), (cfg.d_model,), (None, None, 'embed'), name=name, kernel_init=init, **kw
      )
      x = gelu(conv(conv1d_windows(x, 3, stride=stride, padding=1)))
    positions = sinusoids(cfg.max_source_positions, cfg.d_model)
    x = x + jnp.asarray(positions, self.dtype)[None]
    x = partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)
    for i in range(cfg.num_layers):
      x = whisper_encoder_layer(cfg, name=f'layers_{i}', **kw)(x)
    return LayerNorm(cfg.layer_norm_eps, name='final_norm', **kw)(x)
