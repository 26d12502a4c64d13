"""UniMoE: modality encoders -> connectors -> soft tokens spliced at placeholders -> MoE decoder.

The batch is the project's one format (docs/architecture.md): t5x's decoder-only keys plus,
per modality m in ('image', 'video', 'speech', 'audio'),

    image_features   [batch, items, height, width, 3]         CLIP-normalised pixels
    video_features   [batch, items, frames, height, width, 3]  frames through the same tower
    speech_features  [batch, items, 2 * max_source_positions, n_mels]   Whisper log-mel
    audio_features   [batch, items, frames, 128]               normalised BEATs filterbank
    audio_feature_mask [batch, items, frames] bool (optional)  True on real frames
    <m>_mask         [batch, items] bool                       True on real items

Each real item becomes `num_soft_tokens(m)` soft tokens. The text holds exactly that many
placeholder ids (`<m>_token_id`) per item, in item order (the data pipeline expands each
`<image>` etc. to that many ids), so splicing is a gather by placeholder rank: the j-th
placeholder of modality m in a row takes soft token j of that row's items. This is the same
rule with packing (several examples per row), and every shape is static, so one batch shape
compiles once.

Compute: a modality missing from the batch dict (or with zero items) is not traced at all; one
that is present but has no real item anywhere in the batch is skipped at run time by a
`cond` on the batch-level presence. Encoders are frozen (`train_encoders=False`): their
outputs go through `stop_gradient`, so the backward pass never enters them.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import partitioning
from unimoe_jax.config import DecoderConfig
from unimoe_jax.connectors.projector import Projector
from unimoe_jax.connectors.qformer import QFormer, QFormerConfig
from unimoe_jax.connectors.whisper_aligner import WhisperAligner, WhisperAlignerConfig
from unimoe_jax.decoder import Decoder
from unimoe_jax.encoders.beats import BEATs, BEATsConfig
from unimoe_jax.encoders.clip import CLIPVisionConfig, CLIPVisionTower
from unimoe_jax.encoders.whisper import WhisperEncoder, WhisperEncoderConfig
from unimoe_jax.media.audio import AUDIO_PADDING_MODES
from unimoe_jax.modalities import MODALITIES


@gin.configurable
@dataclasses.dataclass(frozen=True)
class UniMoEConfig:
  """The whole model. A modality whose encoder config is None is not built.

  Attributes:
    decoder: the LLaMA/MoE decoder.
    vision: CLIP tower for images and video frames (LLaVA: ViT-L/14-336, layer -2, patches).
    vision_projector: LLaVA projector kind for image and video tokens ('linear',
      'mlp2x_gelu', ...); images and video share it, as in the official code.
    speech_encoder / speech_aligner / speech_projector: Whisper encoder, the Whisper-decoder
      aligner with learned queries, and its projector.
    audio_encoder / audio_qformer / audio_projector: BEATs, the Q-Former and its projector.
    image_token_id ... audio_token_id: placeholder ids: negative ids outside the vocabulary
      (LLaVA's IMAGE_TOKEN_INDEX is -200; the embedding lookup never sees them) or reserved
      vocabulary ids. Either way each is one token that the tokenizer never splits.
    train_encoders: False (the paper) stops gradients at the encoder outputs.
    audio_padding: how a clip shorter than its 30 s chunk is padded, and what the Q-Former
      sees (`media.audio.beats_chunk_features` makes the matching features):
      'official' (Uni_MoE_audio): the waveform is padded by repeating its last sample, BEATs
        gets the padding mask (reduced from samples to frames, then tokens), and the Q-Former
        attends to every BEATs token, padded ones included. What official checkpoints were
        trained with; the converter writes it for them.
      'masked' (ours): the fbank frames are zero-padded, and the Q-Former attends only to the
        tokens BEATs marks real, so a clip's soft tokens do not depend on how much padding
        follows it.
      The data (`ManifestConfig.audio_padding`) must use the same mode; `generate` and `score`
      follow this field.
  """

  decoder: DecoderConfig = DecoderConfig()
  vision: Optional[CLIPVisionConfig] = None
  vision_projector: str = 'mlp2x_gelu'
  speech_encoder: Optional[WhisperEncoderConfig] = None
  speech_aligner: Optional[WhisperAlignerConfig] = None
  speech_projector: str = 'linear'
  audio_encoder: Optional[BEATsConfig] = None
  audio_qformer: Optional[QFormerConfig] = None
  audio_projector: str = 'linear'
  image_token_id: int = -200
  video_token_id: int = -201
  speech_token_id: int = -202
  audio_token_id: int = -203
  train_encoders: bool = False
  audio_padding: str = 'official'

  def __post_init__(self):
    if self.audio_padding not in AUDIO_PADDING_MODES:
      raise ValueError(
          f'UniMoEConfig.audio_padding must be one of {AUDIO_PADDING_MODES}, got '
          f'{self.audio_padding!r}'
      )
    if (self.speech_encoder is None) != (self.speech_aligner is None):
      raise ValueError(
          'UniMoEConfig: speech_encoder and speech_aligner go together '
          f'(got speech_encoder={self.speech_encoder is not None}, '
          f'speech_aligner={self.speech_aligner is not None})'
      )
    if (self.audio_encoder is None) != (self.audio_qformer is None):
      raise ValueError('UniMoEConfig: audio_encoder and audio_qformer go together')
    if self.speech_encoder is not None and (
        self.speech_aligner.d_model != self.speech_encoder.d_model
    ):
      raise ValueError(
          f'UniMoEConfig: speech_aligner.d_model={self.speech_aligner.d_model} '
          f'must equal speech_encoder.d_model={self.speech_encoder.d_model}'
      )
    if self.audio_encoder is not None and (
        self.audio_qformer.encoder_hidden_size != self.audio_encoder.encoder_embed_dim
    ):
      raise ValueError(
          f'UniMoEConfig: audio_qformer.encoder_hidden_size='
          f'{self.audio_qformer.encoder_hidden_size} must equal '
          f'audio_encoder.encoder_embed_dim={self.audio_encoder.encoder_embed_dim}'
      )
    vocab = self.decoder.vocab_size
    for m in self.modalities:
      token = self.token_id(m)
      if token == 0 or token >= vocab:
        raise ValueError(
            f'UniMoEConfig.{m}_token_id must be a negative id (LLaVA style, e.g. '
            f'-200) or a reserved vocabulary id in [1, {vocab}) when the {m} '
            f'modality is built, got {token}'
        )
    ids = [self.token_id(m) for m in self.modalities]
    if len(set(ids)) != len(ids):
      raise ValueError(
          'UniMoEConfig: placeholder ids must differ, got ' f'{dict(zip(self.modalities, ids))}'
      )

  @property
  def modalities(self) -> Tuple[str, ...]:
    built = {
        'image': self.vision is not None,
        'video': self.vision is not None,
        'speech': self.speech_encoder is not None,
        'audio': self.audio_encoder is not None,
    }
    return tuple(m for m in MODALITIES if built[m])

  def token_id(self, modality: str) -> int:
    return getattr(self, f'{modality}_token_id')

  def num_soft_tokens(self, modality: str) -> int:
    """Soft tokens (= placeholder ids in the text) per item of `modality`."""
    if modality in ('image', 'video'):
      return self.vision.num_tokens
    if modality == 'speech':
      return self.speech_aligner.num_query_tokens
    if modality == 'audio':
      return self.audio_qformer.num_query_tokens
    raise ValueError(f'Unknown modality {modality!r}; expected one of {MODALITIES}')


def splice(
    embeddings: jax.Array, tokens: jax.Array, soft: jax.Array, placeholder_id: int
) -> jax.Array:
  """Puts soft tokens at the placeholder positions, in order.

  Args:
    embeddings: `[batch, length, embed]` token embeddings.
    tokens: `[batch, length]` int ids.
    soft: `[batch, n, embed]` soft tokens of the row (items flattened in order).
    placeholder_id: the id whose occurrences are replaced.
  Returns:
    `[batch, length, embed]`: the j-th occurrence of `placeholder_id` in a row holds
    `soft[row, j]`. Occurrences beyond `n` keep soft token n-1 (`check_placeholders` catches
    such batches before they reach the model).
  """
  is_placeholder = tokens == placeholder_id
  rank = jnp.cumsum(is_placeholder, axis=1, dtype=jnp.int32) - 1
  rank = jnp.clip(rank, 0, soft.shape[1] - 1)
  gathered = jnp.take_along_axis(soft, rank[..., None], axis=1)
  return jnp.where(is_placeholder[..., None], gathered.astype(embeddings.dtype), embeddings)


def check_placeholders(
    config: UniMoEConfig, batch: Mapping[str, Any], where: str = 'batch'
) -> None:
  """Host-side check that each row holds exactly `num_soft_tokens(m)` placeholders per real
  item of every modality (numpy; the training and evaluation loops run it on every batch before
  computing on it). Raises naming `where`, the row, the key and both counts.

  A mismatch means the data pipeline expanded each placeholder to another number of ids than
  the model makes soft tokens (its `ManifestConfig` / `TfdsSettings` `<m>_soft_tokens` against
  `UniMoEConfig.num_soft_tokens(m)`): `splice` would then pair soft tokens with the wrong
  placeholders without any error.
  """
  tokens = np.asarray(batch['decoder_input_tokens'])
  for m in MODALITIES:
    token_id = getattr(config, f'{m}_token_id')
    count = (tokens == token_id).sum(axis=1)
    mask_key = f'{m}_mask'
    items = (
        np.asarray(batch[mask_key]).sum(axis=1) if mask_key in batch else np.zeros(len(tokens), int)
    )
    if m not in config.modalities:
      if items.any():
        raise ValueError(f'{where}: has {m} items but the model has no {m} encoder')
      continue
    want = items * config.num_soft_tokens(m)
    bad = np.nonzero(count != want)[0]
    if bad.size:
      r = int(bad[0])
      per_item = (
          f'{int(count[r]) // int(items[r])} per item'
          if items[r] and count[r] % items[r] == 0
          else 'not a multiple of the items'
      )
      raise ValueError(
          f'{where}: row {r}: {int(count[r])} {m} placeholder tokens (id {token_id}, '
          f'{per_item}) in decoder_input_tokens, but {mask_key} has {int(items[r])} items x '
          f"{config.num_soft_tokens(m)} soft tokens = {int(want[r])}. The data's "
          f"{m}_soft_tokens (ManifestConfig / TfdsSettings) must equal the model's "
          f'UniMoEConfig.num_soft_tokens({m!r}) = {config.num_soft_tokens(m)}'
      )


class UniMoE(nn.Module):
  """`__call__(batch, deterministic)` -> (logits `[batch, length, vocab]` float32, aux)."""

  config: UniMoEConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = cfg.decoder.compute_dtype, cfg.decoder.weight_dtype
    embed = cfg.decoder.embed_dim
    self.decoder = Decoder(cfg.decoder)
    if cfg.vision is not None:
      self.vision_tower = CLIPVisionTower(cfg.vision, dtype=dtype, param_dtype=pdtype)
      self.vision_projector = Projector(
          cfg.vision_projector, embed, dtype=dtype, param_dtype=pdtype
      )
    if cfg.speech_encoder is not None:
      self.speech_encoder = WhisperEncoder(cfg.speech_encoder, dtype=dtype, param_dtype=pdtype)
      self.speech_aligner = WhisperAligner(cfg.speech_aligner, dtype=dtype, param_dtype=pdtype)
      self.speech_projector = Projector(
          cfg.speech_projector, embed, dtype=dtype, param_dtype=pdtype
      )
    if cfg.audio_encoder is not None:
      self.audio_encoder = BEATs(cfg.audio_encoder, dtype=dtype, param_dtype=pdtype)
      self.audio_qformer = QFormer(cfg.audio_qformer, dtype=dtype, param_dtype=pdtype)
      self.audio_projector = Projector(cfg.audio_projector, embed, dtype=dtype, param_dtype=pdtype)

  def _frozen(self, x):
    return x if self.config.train_encoders else jax.lax.stop_gradient(x)

  def _connect(
      self, modality: str, features: jax.Array, feature_mask: Optional[jax.Array]
  ) -> jax.Array:
    """One flat batch of items -> soft tokens `[items, num_soft_tokens, embed]`."""
    if modality == 'image':
      return self.vision_projector(self._frozen(self.vision_tower(features)))
    if modality == 'video':
      # The official code projects every frame, then averages over frames (not the reverse:
      # the two differ for an MLP projector).
      frames = self.vision_projector(self._frozen(self.vision_tower(features, pool_frames=False)))
      return jnp.mean(frames.astype(jnp.float32), axis=1).astype(frames.dtype)
    if modality == 'speech':
      return self.speech_projector(self.speech_aligner(self._frozen(self.speech_encoder(features))))
    padding = None if feature_mask is None else ~feature_mask
    states, token_padding = self.audio_encoder(features, padding)
    # 'official': Uni-MoE's Q-Former gets an all-ones encoder mask (audio_padding docstring).
    qformer_mask = None if self.config.audio_padding == 'official' else ~token_padding
    return self.audio_projector(self.audio_qformer(self._frozen(states), qformer_mask))

  def encode(self, batch: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
    """Soft tokens per modality present in `batch`: `{m: [batch, items * n_m, embed]}`.

    Items whose `<m>_mask` is False come out as zeros; a modality with no real item in the
    whole batch costs no encoder compute (a `cond`, except while initialising parameters).
    """
    cfg = self.config
    out = {}
    for m in cfg.modalities:
      key = f'{m}_features'
      if key not in batch or batch[key].shape[1] == 0:
        continue
      features, mask = batch[key], batch[f'{m}_mask'].astype(bool)
      b, items = mask.shape
      feature_mask = batch.get(f'{m}_feature_mask')
      flat = features.reshape((b * items,) + features.shape[2:])
      flat_mask = (
          None
          if feature_mask is None
          else feature_mask.reshape((b * items,) + feature_mask.shape[2:]).astype(bool)
      )
      n, d = cfg.num_soft_tokens(m), cfg.decoder.embed_dim

      def run(module, flat, flat_mask, m=m):
        return module._connect(m, flat, flat_mask)  # pylint: disable=protected-access

      def skip(module, flat, flat_mask, n=n, d=d):
        del module, flat_mask
        return jnp.zeros((flat.shape[0], n, d), cfg.decoder.compute_dtype)

      if self.is_initializing():
        soft = run(self, flat, flat_mask)
      else:
        soft = nn.cond(jnp.any(mask), run, skip, self, flat, flat_mask)
      soft = soft.reshape(b, items, n, d)
      soft = jnp.where(mask[:, :, None, None], soft, 0).reshape(b, items * n, d)
      out[m] = partitioning.with_sharding_constraint(
          soft, ('activation_batch', 'activation_length', 'activation_embed')
      )
    return out

  def embed(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Token embeddings with every modality's soft tokens spliced in: `[batch, length, embed]`."""
    tokens = batch['decoder_input_tokens']
    lookup = tokens
    for m in self.config.modalities:
      # Placeholder ids may lie outside the vocabulary: look up id 0 there (spliced over below).
      lookup = jnp.where(tokens == self.config.token_id(m), 0, lookup)
    x = self.decoder.embed(lookup)
    for m, soft in self.encode(batch).items():
      x = splice(x, tokens, soft, self.config.token_id(m))
    return x

  def __call__(
      self, batch: Mapping[str, jax.Array], deterministic: bool = True
  ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    segment_ids = batch.get('decoder_segment_ids')
    token_mask = None
    if segment_ids is None and 'decoder_target_tokens' in batch:
      # Unpacked rows end in padding (target 0; media placeholders are negative, real).
      token_mask = batch['decoder_target_tokens'] != 0
    return self.decoder(
        embeddings=self.embed(batch),
        segment_ids=segment_ids,
        positions=batch.get('decoder_positions'),
        token_mask=token_mask,
        deterministic=deterministic,
    )
