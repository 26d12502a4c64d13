"""The sparse MoE feed-forward block: router + stacked SwiGLU experts + a dispatch path."""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimoe_jax import partitioning
from unimoe_jax.config import LoRAConfig, MoEConfig
from unimoe_jax.layers.lora import LoRADropout, default_kernel_init, lora_a_init
from unimoe_jax.moe import dispatch as dispatch_lib
from unimoe_jax.moe import expert_parallel
from unimoe_jax.moe import grouped_matmul as gmm_lib
from unimoe_jax.moe import routing


class ExpertWeights(nn.Module):
  """One stacked expert matrix `[expert, in, out]` and, optionally, per-expert adapters.

  Returns the arrays (cast to `dtype`) instead of applying them: the dispatch path decides
  which rows meet which expert.
  """

  num_experts: int
  in_dim: int
  out_dim: int
  axes: Tuple[str, str]
  lora: Optional[LoRAConfig] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> Dict[str, jax.Array]:
    e, i, o = self.num_experts, self.in_dim, self.out_dim
    leaf_axes = dispatch_lib.expert_leaf_axes(*self.axes)
    kernel = self.param(
        'kernel',
        nn.with_logical_partitioning(default_kernel_init(1), leaf_axes['kernel']),
        (e, i, o),
        self.param_dtype,
    )
    out = {'kernel': kernel.astype(self.dtype)}
    if self.lora is not None:
      # One adapter per expert: fan-in `in` (not expert x in), U(+-1/sqrt(in)) as PEFT/loralib.
      a = self.param(
          'lora_a',
          nn.with_logical_partitioning(lora_a_init(1, batch_dims=1), leaf_axes['lora_a']),
          (e, i, self.lora.rank),
          self.param_dtype,
      )
      b = self.param(
          'lora_b',
          nn.with_logical_partitioning(nn.initializers.zeros, leaf_axes['lora_b']),
          (e, self.lora.rank, o),
          self.param_dtype,
      )
      out['lora_a'], out['lora_b'] = a.astype(self.dtype), b.astype(self.dtype)
    return out


class MoEFeedForward(nn.Module):
  """x: `[batch, length, embed]` -> (`[batch, length, embed]`, aux).

  aux holds float32 scalars `load_balance_loss`, `router_z_loss`, `drop_fraction`,
  `router_entropy`, `aux_loss` (the two losses times their gin coefficients) and the vector
  `expert_fraction` `[expert]`.

  The router runs in `config.router_dtype`. With `config.second_expert_sampling` the second
  expert is drawn (DeepSpeed top2gating) in training and inference alike, with noise from the
  'router' rng stream when the caller gives one, else keyed by each token's logits
  (`routing.content_gumbel_noise`).
  """

  config: MoEConfig
  mlp_dim: int
  lora: Optional[LoRAConfig] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, padding_mask: Optional[jax.Array] = None, deterministic: bool = True
  ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """padding_mask: optional `[batch, length]`, 1 for real tokens. Padding takes no part in
    the router statistics and losses, and no expert capacity ('capacity' dispatch)."""
    cfg = self.config
    b, l, d = x.shape
    router_kernel = self.param(
        'router',
        nn.with_logical_partitioning(default_kernel_init(1), ('embed', 'expert_router')),
        (d, cfg.num_experts),
        self.param_dtype,
    )
    router_dtype = cfg.router_compute_dtype
    router_in = x.astype(jnp.float32)
    if cfg.router_jitter > 0 and not deterministic:
      # Switch-style jitter: noise on the router input only; the experts see the clean x.
      noise = jax.random.uniform(
          self.make_rng('dropout'),
          router_in.shape,
          jnp.float32,
          1.0 - cfg.router_jitter,
          1.0 + cfg.router_jitter,
      )
      router_in = router_in * noise
    # The official 4-expert gate is a Linear in the model dtype: input, weight and logits in
    # router_dtype (float32 accumulation, as a bf16 GEMM on GPU).
    logits = jnp.einsum(
        'bld,de->ble',
        router_in.astype(router_dtype),
        router_kernel.astype(router_dtype),
        preferred_element_type=jnp.float32,
    ).astype(router_dtype)
    logits = partitioning.with_sharding_constraint(
        logits, ('activation_batch', 'activation_length', None)
    )
    flat_logits = logits.reshape(b * l, -1)
    if cfg.second_expert_sampling:
      if self.has_rng('router'):
        gumbel = routing.gumbel_noise(self.make_rng('router'), flat_logits.shape)
      else:
        gumbel = routing.content_gumbel_noise(flat_logits)
      weights, indices = routing.top2_sampled_routing(flat_logits, gumbel)
    else:
      weights, indices = routing.top_k_routing(flat_logits, cfg.num_experts_per_tok)
    if router_dtype != jnp.float32:
      # The official gate casts its softmax weights back to the model dtype.
      weights = weights.astype(router_dtype).astype(jnp.float32)

    # Collected only under mutable=['intermediates'] (training/routing_report.py).
    self.sow('intermediates', 'router_indices', indices.reshape(b, l, -1))

    lora = self.lora
    sizes = {'embed': d, 'mlp': self.mlp_dim}
    experts = {
        name: ExpertWeights(
            cfg.num_experts,
            sizes[axes[0]],
            sizes[axes[1]],
            axes,
            lora=lora,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )()
        for name, axes in dispatch_lib.EXPERT_MATRIX_AXES.items()
    }
    options = {}
    if lora is not None:
      options['lora_scale'] = lora.scale
      if lora.dropout > 0 and not deterministic:
        options['dropout'] = LoRADropout(lora.dropout, self.make_rng('dropout'))
    if cfg.dispatch == 'dropless':
      backend = cfg.gmm_backend
      options.update(
          backend=gmm_lib.default_backend() if backend == 'auto' else backend,
          tile=cfg.gmm_tile,
          fuse_ffn=cfg.fuse_ffn,
      )
    if cfg.dispatch == 'capacity':
      options.update(
          capacity_factor=cfg.capacity_factor,
          min_capacity=cfg.min_capacity,
          group_size=cfg.group_size,
          token_mask=padding_mask,
          renormalize=cfg.renormalize_after_drops,
      )
    k = cfg.num_experts_per_tok
    args = (x.astype(self.dtype), weights.reshape(b, l, k), indices.reshape(b, l, k), experts)
    ep_axes = partitioning.expert_parallel_axes() if cfg.dispatch == 'dropless' else None
    if ep_axes is not None:
      y, kept = expert_parallel.dropless(*args, axes=ep_axes, **options)
    else:
      y, kept = dispatch_lib.dispatch(cfg.dispatch, *args, **options)
    y = partitioning.with_sharding_constraint(
        y, ('activation_batch', 'activation_length', 'activation_embed')
    )

    mask = None if padding_mask is None else padding_mask.reshape(b * l)
    aux = routing.router_aux(
        flat_logits, indices, kept.reshape(b * l, k), mask, cfg.load_balance_loss_form
    )
    aux['aux_loss'] = (
        cfg.load_balance_loss_coef * aux['load_balance_loss']
        + cfg.router_z_loss_coef * aux['router_z_loss']
    )
    return y.astype(self.dtype), aux
