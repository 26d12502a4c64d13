"""The LLaMA decoder; any subset of its layers has a sparse MoE FFN instead of the dense one.

Parameter tree (t5x/flaxformer names, so that conversion maps read like a table):

    token_embedder/embedding                [vocab, embed]
    layers_{i}/pre_attention_norm/scale     [embed]
    layers_{i}/attention/{query,key,value,out}/kernel
    layers_{i}/pre_mlp_norm/scale           [embed]
    layers_{i}/mlp/{wi_0,wi_1,wo}/kernel    dense layers
    layers_{i}/moe/router                   [embed, expert]     MoE layers
    layers_{i}/moe/{wi_0,wi_1,wo}/kernel    [expert, in, out]
    decoder_norm/scale                      [embed]
    logits_dense/kernel                     [embed, vocab]      untied output head

With `DecoderConfig.scan_layers` the layers run under `nn.scan` in blocks of
p = `scan_period()` layers, and `layers_{j*p + r}/...` is stored as slice j of
`stacked_layers/offset_{r}/...` (a leading 'layers' axis of size num_layers / p); see
`layer_stacking.py`, the one place that converts between the two layouts.
"""

import logging

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from unimoe_jax import partitioning
from unimoe_jax import layer_stacking
from unimoe_jax.config import REMAT_SAVED_NAMES, DecoderConfig
from unimoe_jax.layers.attention import Attention, causal_segment_mask
from unimoe_jax.layers.lora import LoRADense, lora_targets
from unimoe_jax.layers.mlp import SwiGLU
from unimoe_jax.layers.norm import RMSNorm
from unimoe_jax.moe.layer import MoEFeedForward

_ACTIVATION_AXES = ('activation_batch', 'activation_length', 'activation_embed')


class DecoderLayer(nn.Module):
  """Pre-norm block: `x + attn(norm(x))`, then `x + ffn(norm(x))` (dense or MoE)."""

  config: DecoderConfig
  use_moe: bool = False

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      positions: Optional[jax.Array],
      mask: Optional[jax.Array],
      padding_mask: Optional[jax.Array],
      deterministic: bool,
      decode: bool = False,
      prefill: bool = False,
      prefill_lengths: Optional[jax.Array] = None,
      max_decode_length: Optional[int] = None,
  ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    cfg = self.config
    dtype, pdtype = cfg.compute_dtype, cfg.weight_dtype
    h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name='pre_attention_norm')(x)
    h = Attention(
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.resolved_head_dim,
        cfg.rope_theta,
        cfg.lora,
        dtype,
        pdtype,
        name='attention',
    )(h, positions, mask, deterministic, decode, prefill, prefill_lengths, max_decode_length)
    x = partitioning.with_sharding_constraint(x + h, _ACTIVATION_AXES)
    h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name='pre_mlp_norm')(x)
    if self.use_moe:
      h, aux = MoEFeedForward(
          cfg.moe, cfg.mlp_dim, lora_targets(cfg.lora, 'experts'), dtype, pdtype, name='moe'
      )(h, padding_mask, deterministic)
      h = checkpoint_name(h, 'moe_out')
    else:
      h = SwiGLU(cfg.mlp_dim, lora_targets(cfg.lora, 'mlp'), dtype, pdtype, name='mlp')(
          h, deterministic
      )
      aux = {}
    x = partitioning.with_sharding_constraint(x + h, _ACTIVATION_AXES)
    return x, aux


class DecoderBlock(nn.Module):
  """`len(kinds)` consecutive layers (kinds[r]: layer r has an MoE FFN), the body of the scan.

  Called like `DecoderLayer`; returns the new x and `{str(r): aux}` for its MoE layers.
  """

  config: DecoderConfig
  kinds: Tuple[bool, ...]

  @nn.compact
  def __call__(self, x, *layer_args):
    """`layer_args`: DecoderLayer's arguments after `x`, all of them (nn.scan broadcasts each)."""
    aux_by_offset = {}
    for r, use_moe in enumerate(self.kinds):
      x, aux = DecoderLayer(self.config, use_moe, name=layer_stacking.offset_name(r))(
          x, *layer_args
      )
      if aux:
        aux_by_offset[str(r)] = aux
    return x, aux_by_offset


def _remat(layer_cls, policy: str, scanned: bool):
  if policy == 'none':
    return layer_cls
  checkpoint_policy = {
      'full': None,
      'dots_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      'projections': jax.checkpoint_policies.save_only_these_names(*REMAT_SAVED_NAMES),
  }[policy]
  # deterministic, decode, prefill and max_decode_length (arguments 5, 6, 7 and 9, counting
  # self) decide Python control flow and shapes: keep them static. Inside a scan the loop
  # already keeps XLA from merging the recomputation with the forward pass, so the CSE
  # barriers (slower) are only needed in the unrolled loop.
  return nn.remat(
      layer_cls, policy=checkpoint_policy, static_argnums=(5, 6, 7, 9), prevent_cse=not scanned
  )


def combine_aux(per_layer: Dict[int, Dict[str, jax.Array]]) -> Dict[str, jax.Array]:
  """Sums losses over MoE layers, averages statistics, and keeps per-layer expert loads."""
  if not per_layer:
    return {}
  out = {}
  n = len(per_layer)
  for key in ('aux_loss', 'load_balance_loss', 'router_z_loss'):
    out[key] = sum(a[key] for a in per_layer.values())
  for key in ('drop_fraction', 'router_entropy'):
    out[key] = sum(a[key] for a in per_layer.values()) / n
  out['expert_fraction'] = jnp.stack([a['expert_fraction'] for a in per_layer.values()])
  return out


class Decoder(nn.Module):
  """Tokens (or precomputed embeddings) -> float32 logits and MoE aux outputs."""

  config: DecoderConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = nn.Embed(
        cfg.vocab_size,
        cfg.embed_dim,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ('vocab', 'embed')
        ),
    )
    kinds = cfg.layer_kinds()
    period = cfg.scan_period()
    if cfg.scan_layers and period is None:
      logging.warning(
          'DecoderConfig.scan_layers: the MoE layers %s repeat with no period '
          'shorter than the %d layers; running the layers as a loop',
          cfg.moe_layer_indices(),
          cfg.num_layers,
      )
    if period is None:
      layer_cls = _remat(DecoderLayer, cfg.remat, scanned=False)
      self.layers = [
          layer_cls(cfg, use_moe=kind, name=f'layers_{i}') for i, kind in enumerate(kinds)
      ]
      self.stacked_layers = None
    else:
      self.layers = []
      self.stacked_layers = nn.scan(
          _remat(DecoderBlock, cfg.remat, scanned=True),
          variable_axes={'params': 0, 'cache': 0, 'intermediates': 0},
          split_rngs={'params': True, 'dropout': True, 'router': True},
          in_axes=(nn.broadcast,) * 8,
          length=cfg.num_layers // period,
          metadata_params={nn.PARTITION_NAME: layer_stacking.LAYERS_AXIS},
      )(cfg, kinds[:period], name=layer_stacking.STACKED)
    self.decoder_norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype)
    self.logits_dense = LoRADense(
        (cfg.embed_dim,),
        (cfg.vocab_size,),
        ('embed', 'vocab'),
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
    )

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens `[batch, length]` int -> `[batch, length, embed]` in the compute dtype."""
    return self.token_embedder(tokens)

  def __call__(
      self,
      tokens: Optional[jax.Array] = None,
      *,
      embeddings: Optional[jax.Array] = None,
      segment_ids: Optional[jax.Array] = None,
      positions: Optional[jax.Array] = None,
      token_mask: Optional[jax.Array] = None,
      deterministic: bool = True,
      decode: bool = False,
      prefill: bool = False,
      prefill_lengths: Optional[jax.Array] = None,
      max_decode_length: Optional[int] = None,
  ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Runs the decoder.

    Incremental decoding (flax collection 'cache', see `Attention` and `init_cache`) has two
    phases. `prefill=True` runs a whole prompt `[batch, prompt_len]` (tokens or embeddings,
    right-padded; rows may differ in length) like the plain call and writes its keys/values
    at cache positions `[0, prompt_len)`; `prefill_lengths` `[batch]` sets each row's next
    cache position (default `prompt_len`; t5x's decoder-only models pass the prompt length
    minus one and feed the last prompt token as the first step). Then `decode=True` runs one
    token per row (`[batch, 1]`) at the row's cache position, its rotary position and causal
    mask coming from the cache; `positions` and `segment_ids` must then be None. Call with
    `mutable=['cache']`.

    Args:
      tokens: `[batch, length]` int32 ids, or None when `embeddings` is given (the multimodal
        model splices media soft tokens into the embeddings first).
      embeddings: `[batch, length, embed]`.
      segment_ids: `[batch, length]` packed-segment ids (0 = padding), t5x's
        `decoder_segment_ids`. None: one sequence per row, no padding mask.
      positions: `[batch, length]` t5x's `decoder_positions`; default `arange(length)`.
      token_mask: `[batch, length]` bool, True on real tokens, for an unpacked batch
        (`segment_ids` None): padding then takes no part in the MoE layers' router statistics,
        losses and capacity. Attention needs no mask there (padding is at the end of a row).
      deterministic: False in training (dropout, router jitter).
      decode: one cached step; `tokens` / `embeddings` of length 1.
      prefill: write the prompt into the cache.
      prefill_lengths: `[batch]` int32, prefill only.
      max_decode_length: cache length when the cache is created (inside `init`).
    Returns:
      logits `[batch, length, vocab]` float32, and the MoE aux dict (`combine_aux`).
    """
    if embeddings is None:
      if tokens is None:
        raise ValueError('Decoder needs tokens or embeddings')
      embeddings = self.embed(tokens)
    x = embeddings.astype(self.config.compute_dtype)
    b, l, _ = x.shape
    x = partitioning.with_sharding_constraint(x, _ACTIVATION_AXES)
    if decode and prefill:
      raise ValueError('Decoder: decode and prefill are exclusive phases')
    if decode:
      if positions is not None or segment_ids is not None or token_mask is not None:
        raise ValueError(
            'Decoder: decode takes positions from the cache; pass no positions, '
            'segment_ids or token_mask'
        )
      mask = padding_mask = None
    else:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
      mask = causal_segment_mask(l, segment_ids)
      padding_mask = token_mask if segment_ids is None else (segment_ids > 0)
      if prefill and prefill_lengths is not None and segment_ids is None:
        # Right padding of short prompts takes no part in router statistics or capacity.
        padding_mask = jnp.arange(l)[None, :] < prefill_lengths[:, None]
    # DecoderLayer's arguments after x, positional: nn.scan broadcasts them by position.
    layer_args = (
        positions,
        mask,
        padding_mask,
        deterministic,
        decode,
        prefill,
        prefill_lengths,
        max_decode_length,
    )
    per_layer = {}
    for i, layer in enumerate(self.layers):
      x, aux = layer(x, *layer_args)
      if aux:
        per_layer[i] = aux
    if self.stacked_layers is not None:
      x, stacked_aux = self.stacked_layers(x, *layer_args)
      period = self.config.scan_period()
      for r, aux in stacked_aux.items():  # Each leaf `[num_layers / period, ...]`.
        for j in range(self.config.num_layers // period):
          per_layer[j * period + int(r)] = jax.tree_util.tree_map(lambda a, j=j: a[j], aux)
      per_layer = dict(sorted(per_layer.items()))
    x = self.decoder_norm(x)
    logits = self.logits_dense(x).astype(jnp.float32)
    logits = partitioning.with_sharding_constraint(
        logits, ('activation_batch', 'activation_length', 'activation_vocab')
    )
    return logits, combine_aux(per_layer)

  @nn.nowrap
  def init_cache(self, batch: int, max_length: int) -> Dict[str, Any]:
    """A zero cache for `batch` rows of up to `max_length` positions (no parameters built).

    Returns the 'cache' collection (`{'layers_i': {'attention': {cached_key, cached_value,
    cache_index}}}`, or `{'stacked_layers': {'offset_r': ...}}` with a leading 'layers' axis
    when the layers are scanned; leaves boxed with their logical axes); pass it as
    `apply({'params': p, 'cache': cache}, ..., prefill=True, mutable=['cache'])`.
    """

    def make():
      tokens = jnp.zeros((batch, 1), jnp.int32)
      return self.init(jax.random.PRNGKey(0), tokens, prefill=True, max_decode_length=max_length)[
          'cache'
      ]

    shapes = jax.eval_shape(make)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
