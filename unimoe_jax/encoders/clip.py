"""CLIP ViT vision tower as LLaVA / Uni-MoE use it, for images and (frame-averaged) video.

LLaVA does not take CLIP's final output: it takes one hidden state, `hidden_states[select_layer]`
of Hugging Face's `CLIPVisionModel(..., output_hidden_states=True)`, where index 0 is the
embeddings after `pre_layrnorm` and index i the output of encoder layer i. With the usual
`select_layer=-2` the last layer does not contribute, so this tower builds only the layers up to
the selected one. For the same reason CLIP's `post_layernorm` has no parameters here.

Parameters (logical axes):
  patch_embedding.kernel    `[patch, patch, 3, width]` (None, None, None, 'embed'), no bias
  class_embedding           `[width]` ('embed',)
  position_embedding        `[num_patches + 1, width]` (None, 'embed')
  pre_layernorm             LayerNorm
  layers_{i}                layer_norm1, attention, layer_norm2, mlp (fc1/fc2, quick GELU)
"""

import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from unimoe_jax import partitioning
from unimoe_jax.config import check_divisible, check_one_of, check_positive, from_table
from unimoe_jax.layers.encoder_blocks import ACTIVATIONS, ENCODER_HIDDEN_AXES, Dense, LayerNorm
from unimoe_jax.layers.encoder_blocks import PreLNEncoderLayer

SELECT_FEATURES = ('patch', 'cls_patch')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """A CLIP ViT and which of its hidden states LLaVA reads.

  Attributes:
    image_size: input height = width in pixels.
    patch_size: side of the square patches (the stride of CLIP's patch convolution).
    width, num_layers, num_heads, mlp_dim: the ViT's sizes (`num_layers` is the checkpoint's
      full depth; only `num_used_layers` of them are built).
    layer_norm_eps: epsilon of every LayerNorm.
    act: MLP activation (a key of layers.encoder_blocks.ACTIVATIONS; CLIP uses 'quick_gelu').
    select_layer: LLaVA's `mm_vision_select_layer`, an index into the `num_layers + 1` hidden
      states (0: embeddings after pre-LN, i: output of layer i; negative counts from the end).
    select_feature: 'patch' drops the class token, 'cls_patch' keeps it in front.
    init_std: normal std of every kernel and embedding at initialisation (HF's
      initializer_range, 0.02); tiny randomly initialised configurations need more
      (multimodal_tiny.gin).
  """

  image_size: int = 336
  patch_size: int = 14
  width: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  layer_norm_eps: float = 1e-5
  act: str = 'quick_gelu'
  select_layer: int = -2
  select_feature: str = 'patch'
  init_std: float = 0.02

  def __post_init__(self):
    check_positive(self, 'image_size', 'patch_size', 'width', 'num_layers', 'num_heads', 'mlp_dim')
    check_divisible(self, 'image_size', 'patch_size')
    check_divisible(self, 'width', 'num_heads')
    check_one_of(self, 'act', ACTIVATIONS)
    if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
      raise ValueError(
          f'CLIPVisionConfig.select_layer={self.select_layer} is outside '
          f'[{-(self.num_layers + 1)}, {self.num_layers}] (there are '
          f'num_layers + 1 = {self.num_layers + 1} hidden states)'
      )
    if self.select_feature not in SELECT_FEATURES:
      raise ValueError(
          f'CLIPVisionConfig.select_feature must be one of {SELECT_FEATURES}, '
          f'got {self.select_feature!r}'
      )

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @property
  def num_positions(self) -> int:
    return self.num_patches + 1  # The class token has a position too.

  @property
  def num_tokens(self) -> int:
    return self.num_patches + (1 if self.select_feature == 'cls_patch' else 0)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def num_used_layers(self) -> int:
    """Encoder layers that feed the selected hidden state (= its non-negative index)."""
    return self.select_layer % (self.num_layers + 1)


CLIP_SIZES = {
    # openai/clip-vit-large-patch14-336, the vision tower of LLaVA-1.5 and Uni-MoE.
    'vit-l-14-336': CLIPVisionConfig(),
    'tiny': CLIPVisionConfig(
        image_size=32, patch_size=8, width=64, num_layers=3, num_heads=4, mlp_dim=128
    ),
}


@gin.configurable
def named(size: str, **overrides) -> CLIPVisionConfig:
  """`CLIP_SIZES[size]` with fields replaced (`config.from_table`)."""
  return from_table(CLIP_SIZES, size, overrides, 'CLIP')


def clip_encoder_layer(cfg: CLIPVisionConfig, **kwargs) -> PreLNEncoderLayer:
  """CLIP's pre-LN block, its parameters named as transformers' CLIPEncoderLayer's."""
  return PreLNEncoderLayer(
      cfg.num_heads,
      cfg.head_dim,
      cfg.mlp_dim,
      cfg.act,
      cfg.layer_norm_eps,
      cfg.init_std,
      names=('layer_norm1', 'attention', 'layer_norm2', 'mlp'),
      **kwargs,
  )


class CLIPVisionTower(nn.Module):
  """CLIP-normalised pixels -> LLaVA's selected CLIP hidden state.

  `__call__(pixels)`:
    pixels `[batch, image_size, image_size, 3]` float -> `[batch, num_tokens, width]` in `dtype`.
    pixels `[batch, frames, image_size, image_size, 3]` (video) -> every frame goes through the
      tower, then the frames are averaged (in float32): `[batch, num_tokens, width]`.
      With `pool_frames=False` the frames are kept: `[batch, frames, num_tokens, width]`.

  Note on video: the official Uni-MoE code averages frames *after* the mm_projector
  (`encode_images` = tower + projector, then `mean(dim=0)`). That equals averaging here only for
  a linear projector; for 'mlp2x_gelu' call with `pool_frames=False`, project, then average.
  """

  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __call__(self, pixels: jax.Array, pool_frames: bool = True) -> jax.Array:
    if pixels.ndim == 4:
      return self.encode_images(pixels)
    if pixels.ndim != 5:
      raise ValueError(
          f'CLIPVisionTower: pixels must be [batch, H, W, 3] or '
          f'[batch, frames, H, W, 3], got shape {pixels.shape}'
      )
    batch, frames = pixels.shape[:2]
    feats = self.encode_images(pixels.reshape((batch * frames,) + pixels.shape[2:]))
    feats = feats.reshape((batch, frames) + feats.shape[1:])
    if not pool_frames:
      return feats
    pooled = jnp.mean(feats.astype(jnp.float32), axis=1).astype(self.dtype)
    return partitioning.with_sharding_constraint(pooled, ENCODER_HIDDEN_AXES)

  @nn.compact
  def encode_images(self, pixels: jax.Array) -> jax.Array:
    """`[batch, image_size, image_size, 3]` -> `[batch, num_tokens, width]`."""
    cfg = self.config
    batch, height, width, channels = pixels.shape
    if (height, width, channels) != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(
          f'CLIPVisionTower: expected [batch, {cfg.image_size}, {cfg.image_size}, 3] '
          f'pixels, got {pixels.shape}'
      )

    p, g = cfg.patch_size, cfg.grid_size
    # Row-major patch order, as the flattened output of CLIP's strided convolution.
    patches = pixels.reshape(batch, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, g * g, p, p, 3)
    x = Dense(
        (p, p, 3),
        (cfg.width,),
        (None, None, None, 'embed'),
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.normal(cfg.init_std),
        name='patch_embedding',
    )(patches)

    init = nn.initializers.normal(cfg.init_std)
    cls = self.param(
        'class_embedding',
        nn.with_logical_partitioning(init, ('embed',)),
        (cfg.width,),
        self.param_dtype,
    )
    pos = self.param(
        'position_embedding',
        nn.with_logical_partitioning(init, (None, 'embed')),
        (cfg.num_positions, cfg.width),
        self.param_dtype,
    )
    cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
    x = partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)
    x = LayerNorm(
        cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name='pre_layernorm'
    )(x)

    for i in range(cfg.num_used_layers):
      x = clip_encoder_layer(
          cfg, dtype=self.dtype, param_dtype=self.param_dtype, name=f'layers_{i}'
      )(x)

    if cfg.select_feature == 'patch':
      x = x[:, 1:]
    return partitioning.with_sharding_constraint(x, ENCODER_HIDDEN_AXES)
