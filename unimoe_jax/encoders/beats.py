"""The BEATs audio encoder (Chen et al., 2022), the general-audio tower of Uni-MoE (audio variant).

Uni-MoE loads `BEATs_iter3_plus_AS2M.pt` (`finetuned_model=False`), keeps it frozen and feeds
`extract_features(fbank, padding_mask)[0]` (the last layer's tokens) to the Q-Former. This module
is that forward pass, in inference mode (dropout, layer drop and the layer-wise gradient decay
are training options and do nothing here).

Input: the normalised Kaldi filterbank `[batch, frames, 128]` float. The official preprocessing
(`BEATsProcessor`, done by unimoe_jax/media) is, per 16 kHz mono waveform in [-1, 1]:
    fbank = kaldi.fbank(waveform * 2**15, num_mel_bins=128, sample_frequency=16000,
                        frame_length=25, frame_shift=10)       # [frames, 128]
    fbank = (fbank - 15.41663) / (2 * 6.55582)
so 30 s of audio (480000 samples) gives 2998 frames.

Layout (official `BEATs.py` + `backbone.py`):
  patches: a 16x16 stride-16 convolution (no bias) over the `[frames, 128]` image; frames and
    mel bins are cut to a multiple of 16 (the convolution floors). Tokens are ordered time patch
    major, frequency patch minor: token `i` is time patch `i // 8`, mel patch `i % 8`.
  layer_norm (width embed_dim), post_extract_proj (only when embed_dim != encoder_embed_dim).
  padded tokens zeroed; + GELU(grouped conv positions) (kernel conv_pos, weight-normed).
  post-LN (layer_norm_first=False, BEATs): encoder LayerNorm, then layers
      x = LN(alpha * x + attn(x));  x = LN(alpha * x + fc2(gelu(fc1 x)))
    with alpha = (2 * encoder_layers) ** 0.25 under deep_norm, else 1.
  pre-LN (layer_norm_first=True): x += attn(LN x); x += mlp(LN x); encoder LayerNorm at the end.
  attention logits: q.k / sqrt(head_dim) + relative position bias. The bias table
    `[num_buckets, heads]` belongs to layer 0 and every layer reuses it (the official code ties
    the modules). With gru_rel_pos each layer scales the bias per query and head by
      a * (b * grep_a[h] - 1) + 2,  (a, b) = sigmoid(sum of 4 gate outputs each of
      grep_linear(q_h))  where q_h is the head's unscaled query projection.

Padding. `padding_mask` (True = padding) may have any length >= frames: Uni-MoE passes a
*waveform-sample* mask `[batch, 480000]`. The official code reduces it twice by "cut the tail to
a multiple of n, group into n equal runs, a run is padding only if all of it is": first to the
fbank frames, then to the tokens. The second step groups `frames // tokens` consecutive frames
(2 for >= 32 frames) per token *index*, not per patch: token `i` is padding iff frames
`2i, 2i+1` are. Both steps are reproduced exactly. Consequences (true of the official model):
  * with a tail of padding that starts on a multiple of 16 frames, the unpadded tokens are
    exactly those of the unpadded time patches, and they equal the output of running the model
    on the unpadded frames alone (positions are relative; padded tokens are zeroed before the
    positional convolution and never attended to);
  * otherwise the last unpadded time patch mixes in padded frames, and some of its tokens are
    marked padding while others are not.
Outputs at padded tokens are computed but meaningless. Uni-MoE drops the token mask and lets the
Q-Former attend to every token. A fully padded example gives finite values here (the official
code gives NaN).

Parameters (torch name in the official state dict -> ours):
  patch_embedding.weight [embed_dim, 1, 16, 16]   patch_embedding/kernel [16 (time), 16 (mel),
                                                  embed_dim] (bias only with conv_bias)
  layer_norm.*                                    layer_norm/{scale, bias}
  post_extract_proj.*                             post_extract_proj/{kernel, bias}
  encoder.pos_conv.0.{weight_g, weight_v, bias}   pos_conv/kernel [conv_pos, width/groups, width]
                                                  (weight norm folded at conversion), bias
  encoder.layer_norm.*                            encoder_layer_norm
  encoder.layers.0.self_attn.relative_attention_bias.weight  relative_attention_bias
                                                  [num_buckets, heads]
  encoder.layers.{i}.self_attn.{q,k,v,out}_proj   layers_{i}/self_attn/{query,key,value,out}
  encoder.layers.{i}.self_attn.grep_linear        layers_{i}/self_attn/gate ([head_dim, 8])
  encoder.layers.{i}.self_attn.grep_a [1,H,1,1]   layers_{i}/self_attn/gate_scale [heads]
  encoder.layers.{i}.{self_attn_layer_norm, final_layer_norm}   same names
  encoder.layers.{i}.{fc1, fc2}                   layers_{i}/mlp/{fc1, fc2}
"""

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import partitioning
from unimoe_jax.config import check_divisible, check_positive, from_table
from unimoe_jax.layers.encoder_blocks import ENCODER_HIDDEN_AXES
from unimoe_jax.layers.encoder_blocks import Dense, GeluMLP, LayerNorm, activation, default_init
from unimoe_jax.media.audio import BEATS_MEL_BINS

# Official `activation_fn` -> the shared ACTIVATIONS key. fairseq's 'gelu' is the exact erf form,
# 'gelu_accurate' (alias 'gelu_fast') the tanh approximation.
_OFFICIAL_ACTIVATIONS = {
    'gelu': 'gelu',
    'gelu_accurate': 'gelu_tanh',
    'gelu_fast': 'gelu_tanh',
    'relu': 'relu',
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BEATsConfig:
  """BEATs sizes, named as the official cfg dict. Defaults are BEATs iter3 (Uni-MoE's tower).

  Attributes:
    input_patch_size: side of the square patches over (frames, mel bins).
    embed_dim: patch embedding width.
    conv_bias: whether the patch convolution has a bias.
    encoder_layers, encoder_embed_dim, encoder_ffn_embed_dim, encoder_attention_heads: the
      transformer's sizes; tokens come out `encoder_embed_dim` wide.
    activation_fn: MLP activation, official spelling ('gelu', 'gelu_accurate', 'relu').
    layer_norm_first: pre-LN layers (final LayerNorm) instead of post-LN (first LayerNorm).
    deep_norm: post-LN residuals scaled by (2 * encoder_layers) ** 0.25.
    conv_pos, conv_pos_groups: kernel width and groups of the convolutional positions.
    relative_position_embedding, num_buckets, max_distance: the T5-style bucketed relative
      position bias (bidirectional: half the buckets per direction).
    gru_rel_pos: the per-query gate on the relative position bias.
    layer_wise_gradient_decay_ratio: training only (scales gradients, identity forward); kept
      so that official cfgs round-trip, ignored here.
    num_mel_bins: filterbank channels of the input (not in the official cfg; always 128 there).
    init_std: normal std of every projection kernel and the relative position table at
      initialisation (0.02, as the official init); tiny randomly initialised configurations
      need more (multimodal_tiny.gin). The convolutional positions keep their own init.
  """

  input_patch_size: int = 16
  embed_dim: int = 512
  conv_bias: bool = False
  encoder_layers: int = 12
  encoder_embed_dim: int = 768
  encoder_ffn_embed_dim: int = 3072
  encoder_attention_heads: int = 12
  activation_fn: str = 'gelu'
  layer_norm_first: bool = False
  deep_norm: bool = True
  conv_pos: int = 128
  conv_pos_groups: int = 16
  relative_position_embedding: bool = True
  num_buckets: int = 320
  max_distance: int = 800
  gru_rel_pos: bool = True
  layer_wise_gradient_decay_ratio: float = 0.6
  num_mel_bins: int = BEATS_MEL_BINS
  init_std: float = 0.02

  def __post_init__(self):
    check_positive(
        self,
        'input_patch_size',
        'embed_dim',
        'encoder_layers',
        'encoder_embed_dim',
        'encoder_ffn_embed_dim',
        'encoder_attention_heads',
        'conv_pos',
        'conv_pos_groups',
        'num_mel_bins',
    )
    check_divisible(self, 'encoder_embed_dim', 'encoder_attention_heads')
    check_divisible(self, 'encoder_embed_dim', 'conv_pos_groups')
    if self.num_mel_bins < self.input_patch_size:
      raise ValueError(
          f'BEATsConfig.num_mel_bins={self.num_mel_bins} is smaller than '
          f'input_patch_size={self.input_patch_size}'
      )
    if self.activation_fn not in _OFFICIAL_ACTIVATIONS:
      raise ValueError(
          f'BEATsConfig.activation_fn={self.activation_fn!r} is not supported; '
          f'choose one of {sorted(_OFFICIAL_ACTIVATIONS)}'
      )
    if self.deep_norm and self.layer_norm_first:
      raise ValueError(
          'BEATsConfig.deep_norm applies to post-LN layers only; it cannot be set '
          'with layer_norm_first (the official code asserts the same)'
      )
    if self.relative_position_embedding:
      if self.num_buckets < 4 or self.num_buckets % 2:
        raise ValueError(f'BEATsConfig.num_buckets={self.num_buckets} must be even and >= 4')
      if self.max_distance <= self.num_buckets // 4:
        raise ValueError(
            f'BEATsConfig.max_distance={self.max_distance} must exceed the exact '
            f'range num_buckets // 4 = {self.num_buckets // 4}'
        )
    if self.gru_rel_pos and not self.relative_position_embedding:
      raise ValueError(
          'BEATsConfig.gru_rel_pos gates the relative position bias; it needs '
          'relative_position_embedding=True'
      )

  @property
  def head_dim(self) -> int:
    return self.encoder_embed_dim // self.encoder_attention_heads

  @property
  def deep_norm_alpha(self) -> float:
    return (2 * self.encoder_layers) ** 0.25 if self.deep_norm else 1.0

  def num_tokens(self, num_frames: int) -> int:
    p = self.input_patch_size
    return (num_frames // p) * (self.num_mel_bins // p)

  @classmethod
  def from_official(cls, cfg: Mapping[str, Any], **overrides) -> 'BEATsConfig':
    return config_from_official(cfg, **overrides)


# The official BEATsConfig class defaults: an official cfg dict only lists what differs.
_OFFICIAL_DEFAULTS = dict(
    input_patch_size=-1,
    embed_dim=512,
    conv_bias=False,
    encoder_layers=12,
    encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12,
    activation_fn='gelu',
    layer_wise_gradient_decay_ratio=1.0,
    layer_norm_first=False,
    deep_norm=False,
    conv_pos=128,
    conv_pos_groups=16,
    relative_position_embedding=False,
    num_buckets=320,
    max_distance=1280,
    gru_rel_pos=False,
)

# Official cfg keys that do not change the inference forward pass of the encoder. The predictor
# keys describe the AudioSet classifier of fine-tuned checkpoints: we always return the encoder
# tokens (what Uni-MoE uses), and the converter drops the head.
OFFICIAL_TRAINING_KEYS = (
    'dropout',
    'attention_dropout',
    'activation_dropout',
    'encoder_layerdrop',
    'dropout_input',
    'finetuned_model',
    'predictor_dropout',
    'predictor_class',
)


def config_from_official(cfg: Mapping[str, Any], **overrides) -> BEATsConfig:
  """A BEATsConfig from the checkpoint's `cfg` dict (official class defaults fill the gaps).

  Training-only keys (`OFFICIAL_TRAINING_KEYS`) are ignored; any other key we do not know
  raises, since it could change the architecture.
  """
  unknown = sorted(set(cfg) - set(_OFFICIAL_DEFAULTS) - set(OFFICIAL_TRAINING_KEYS))
  if unknown:
    raise ValueError(f'config_from_official: unknown BEATs cfg keys {unknown}')
  fields = dict(_OFFICIAL_DEFAULTS)
  fields.update({k: v for k, v in cfg.items() if k in _OFFICIAL_DEFAULTS})
  fields.update(overrides)
  for key in (
      'conv_bias',
      'layer_norm_first',
      'deep_norm',
      'relative_position_embedding',
      'gru_rel_pos',
  ):
    fields[key] = bool(fields[key])
  return BEATsConfig(**fields)


def config_to_official(config: BEATsConfig) -> Dict[str, Any]:
  """`config_from_official`'s inverse: the official `cfg` dict, every architecture key of the
  official `BEATsConfig` spelled out (no reliance on its defaults) plus `finetuned_model=False`
  (no AudioSet head), so that `config_from_official(config_to_official(c)) == c` for any `c`
  with the default `init_std` (ours only: the official cfg has no such key). Dropout keys are
  left to the official defaults (they do nothing at inference).

  Raises ValueError when `num_mel_bins != 128`: the official cfg cannot say it, and official
  preprocessing always gives 128 bins.
  """
  if config.num_mel_bins != BEATS_MEL_BINS:
    raise ValueError(
        f'config_to_official: num_mel_bins={config.num_mel_bins} cannot be '
        'expressed in an official BEATs cfg (its fbank always has 128 bins)'
    )
  cfg = {key: getattr(config, key) for key in _OFFICIAL_DEFAULTS}
  cfg['finetuned_model'] = False
  return cfg


BEATS_SIZES = {
    'iter3': BEATsConfig(),
    'tiny': BEATsConfig(
        embed_dim=24,
        encoder_layers=2,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=48,
        encoder_attention_heads=4,
        conv_pos=8,
        conv_pos_groups=4,
        num_buckets=32,
        max_distance=64,
    ),
}


@gin.configurable
def named(size: str, **overrides) -> BEATsConfig:
  """`BEATS_SIZES[size]` with fields replaced (`config.from_table`)."""
  return from_table(BEATS_SIZES, size, overrides, 'BEATs')


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int, max_distance: int
) -> np.ndarray:
  """Bidirectional T5 buckets of `key - query` offsets (int array in, int32 array out).

  Half the buckets per direction (positive offsets take the upper half). Within a half,
  |offset| < num_buckets // 4 is its own bucket; larger offsets are spaced logarithmically up
  to max_distance and clipped to the half's last bucket. The logarithm is taken in float32 and
  truncated, as the official code does, so that the boundaries land where its buckets do.
  """
  rel = np.asarray(relative_position, np.int64)
  half = num_buckets // 2
  max_exact = half // 2
  buckets = np.where(rel > 0, half, 0)
  distance = np.abs(rel)
  with np.errstate(divide='ignore'):
    log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
  scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


def _all_within_groups(mask: jax.Array, groups: int) -> jax.Array:
  """`[batch, length] -> [batch, groups]`: cut the tail to a multiple of `groups`, then a
  group of `length // groups` consecutive entries is True only if all of them are."""
  length = mask.shape[1]
  if length < groups:
    raise ValueError(
        f'BEATs: padding_mask has {length} entries per example, fewer than the '
        f'{groups} frames/tokens it must cover'
    )
  per_group = length // groups
  return mask[:, : groups * per_group].reshape(mask.shape[0], groups, per_group).all(-1)


def token_padding_mask(padding_mask: jax.Array, num_frames: int, num_tokens: int) -> jax.Array:
  """The official two-step reduction: `[batch, any length >= frames]` -> `[batch, tokens]`."""
  frame_mask = _all_within_groups(jnp.asarray(padding_mask, bool), num_frames)
  return _all_within_groups(frame_mask, num_tokens)


class GatedRelativeAttention(nn.Module):
  """BEATs self-attention: `[batch, tokens, embed] -> [batch, tokens, embed]`.

  The shared MultiHeadAttention cannot be reused: the gate reads the query projection, which
  that block keeps inside. Projections are the shared Dense blocks with the same names and axes
  (query/key/value `[embed, heads, head_dim]`, out `[heads, head_dim, embed]`).

  `mask`: bool `[batch, 1, 1, tokens]` (True = attend). `position_bias`: float
  `[heads, tokens, tokens]` or None.
  """

  num_heads: int
  head_dim: int
  gru_rel_pos: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = default_init

  @nn.compact
  def __call__(
      self, x: jax.Array, mask: Optional[jax.Array], position_bias: Optional[jax.Array]
  ) -> jax.Array:
    batch, length, embed = x.shape
    h, hd = self.num_heads, self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    proj = lambda name: Dense(
        (embed,),
        (h, hd),
        ('embed', 'heads', 'head_dim'),  # pylint: disable=g-long-lambda
        name=name,
        **kw,
    )(x)
    q, k, v = (
        partitioning.with_sharding_constraint(proj(n), partitioning.HEAD_AXES)
        for n in ('query', 'key', 'value')
    )
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    logits = logits / np.float32(np.sqrt(hd))
    if position_bias is not None:
      bias = position_bias.astype(jnp.float32)[None]
      if self.gru_rel_pos:
        gate = Dense((hd,), (8,), ('head_dim', None), name='gate', **kw)(q)
        gate = jax.nn.sigmoid(gate.astype(jnp.float32).reshape(batch, length, h, 2, 4).sum(-1))
        gate_scale = self.param(
            'gate_scale',
            nn.with_logical_partitioning(nn.initializers.ones, ('heads',)),
            (h,),
            self.param_dtype,
        ).astype(jnp.float32)
        row_scale = gate[..., 0] * (gate[..., 1] * gate_scale - 1.0) + 2.0  # [b, q, h]
        bias = jnp.transpose(row_scale, (0, 2, 1))[..., None] * bias
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    out = partitioning.with_sharding_constraint(out, partitioning.HEAD_AXES)
    return Dense((h, hd), (embed,), ('heads', 'head_dim', 'embed'), name='out', **kw)(out)


class BEATsLayer(nn.Module):
  """One encoder layer (post-LN with deep-norm residuals, or pre-LN):
  `[batch, tokens, embed] -> [batch, tokens, embed]`."""

  config: BEATsConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, mask: Optional[jax.Array], position_bias: Optional[jax.Array]
  ) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.normal(cfg.init_std)
    attn = GatedRelativeAttention(
        cfg.encoder_attention_heads,
        cfg.head_dim,
        cfg.gru_rel_pos,
        kernel_init=init,
        name='self_attn',
        **kw,
    )
    attn_norm = LayerNorm(1e-5, name='self_attn_layer_norm', **kw)
    mlp = GeluMLP(
        cfg.encoder_ffn_embed_dim,
        act=_OFFICIAL_ACTIVATIONS[cfg.activation_fn],
        kernel_init=init,
        name='mlp',
        **kw,
    )
    mlp_norm = LayerNorm(1e-5, name='final_layer_norm', **kw)
    if cfg.layer_norm_first:
      x = x + attn(attn_norm(x), mask, position_bias)
      x = x + mlp(mlp_norm(x))
    else:
      alpha = cfg.deep_norm_alpha
      x = attn_norm(x * alpha + attn(x, mask, position_bias))
      x = mlp_norm(x * alpha + mlp(x))
    return partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)


class ConvPositions(nn.Module):
  """`GELU(grouped conv1d over time)`: `[batch, tokens, width] -> [batch, tokens, width]`.

  Zero padding of `kernel // 2` before and `kernel - 1 - kernel // 2` after keeps the length
  (the official conv pads both sides by kernel // 2 and drops the last output for even kernels).
  Kernel `[kernel, width / groups, width]`; the official weight norm is folded into it.
  """

  kernel_size: int
  groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    kernel = self.param(
        'kernel',
        nn.with_logical_partitioning(
            nn.initializers.normal(stddev=math.sqrt(4.0 / (self.kernel_size * width))),
            (None, None, 'embed'),
        ),
        (self.kernel_size, width // self.groups, width),
        self.param_dtype,
    )
    bias = self.param(
        'bias',
        nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
        (width,),
        self.param_dtype,
    )
    left = self.kernel_size // 2
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype),
        kernel.astype(self.dtype),
        window_strides=(1,),
        padding=[(left, self.kernel_size - 1 - left)],
        dimension_numbers=('NWC', 'WIO', 'NWC'),
        feature_group_count=self.groups,
    )
    return activation('gelu')(y + bias.astype(self.dtype))


class BEATs(nn.Module):
  """`__call__(fbank [batch, frames, num_mel_bins] float, padding_mask [batch, n] bool or None)
  -> (features [batch, tokens, encoder_embed_dim], token_padding_mask [batch, tokens] bool)`.

  `fbank` is already normalised (module docstring). `tokens = (frames // 16) * (128 // 16)`.
  `padding_mask`: True = padding, over frames or over waveform samples (any length >= frames);
  None means no padding (the returned mask is then all False).
  """

  config: BEATsConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, fbank: jax.Array, padding_mask: Optional[jax.Array] = None
  ) -> Tuple[jax.Array, jax.Array]:
    cfg = self.config
    if fbank.ndim != 3 or fbank.shape[2] != cfg.num_mel_bins:
      raise ValueError(
          f'BEATs: fbank must be [batch, frames, {cfg.num_mel_bins}] (time-major), '
          f'got shape {fbank.shape}'
      )
    batch, frames, mels = fbank.shape
    p = cfg.input_patch_size
    time_patches, mel_patches = frames // p, mels // p
    if time_patches == 0:
      raise ValueError(f'BEATs: {frames} frames is fewer than one {p}-frame patch')
    num_tokens = time_patches * mel_patches
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    patches = fbank[:, : time_patches * p, : mel_patches * p].astype(self.dtype)
    patches = patches.reshape(batch, time_patches, p, mel_patches, p).transpose(0, 1, 3, 2, 4)
    patches = patches.reshape(batch, num_tokens, p, p)
    init = nn.initializers.normal(cfg.init_std)
    x = Dense(
        (p, p),
        (cfg.embed_dim,),
        (None, None, 'embed'),
        use_bias=cfg.conv_bias,
        kernel_init=init,
        name='patch_embedding',
        **kw,
    )(patches)
    x = LayerNorm(1e-5, name='layer_norm', **kw)(x)
    if cfg.embed_dim != cfg.encoder_embed_dim:
      x = Dense(
          (cfg.embed_dim,),
          (cfg.encoder_embed_dim,),
          (None, 'embed'),
          kernel_init=init,
          name='post_extract_proj',
          **kw,
      )(x)
    x = partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)

    if padding_mask is None:
      token_mask = jnp.zeros((batch, num_tokens), bool)
      attend = None
    else:
      if padding_mask.ndim != 2 or padding_mask.shape[0] != batch:
        raise ValueError(
            f'BEATs: padding_mask must be [batch={batch}, length], got ' f'{padding_mask.shape}'
        )
      token_mask = token_padding_mask(padding_mask, frames, num_tokens)
      x = jnp.where(token_mask[..., None], jnp.zeros((), x.dtype), x)
      attend = ~token_mask[:, None, None, :]

    x = x + ConvPositions(cfg.conv_pos, cfg.conv_pos_groups, name='pos_conv', **kw)(x)
    final_norm = LayerNorm(1e-5, name='encoder_layer_norm', **kw)
    if not cfg.layer_norm_first:
      x = final_norm(x)

    position_bias = None
    if cfg.relative_position_embedding:
      table = self.param(
          'relative_attention_bias',
          nn.with_logical_partitioning(init, (None, 'heads')),
          (cfg.num_buckets, cfg.encoder_attention_heads),
          self.param_dtype,
      )
      offsets = np.arange(num_tokens)[None, :] - np.arange(num_tokens)[:, None]  # key - query
      buckets = relative_position_bucket(offsets, cfg.num_buckets, cfg.max_distance)
      position_bias = jnp.transpose(jnp.take(table, jnp.asarray(buckets), axis=0), (2, 0, 1))

    for i in range(cfg.encoder_layers):
      x = BEATsLayer(cfg, name=f'layers_{i}', **kw)(x, attend, position_bias)
    if cfg.layer_norm_first:
      x = final_norm(x)
    return x, token_mask
