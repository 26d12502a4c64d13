"""Model configuration: frozen, gin-configurable dataclasses that hold every size.

A config is plain data. Modules read it; nothing mutates it. Gin binds the fields, e.g.

    DecoderConfig.num_layers = 2
    MoEConfig.num_experts = 4

Each size is written once, in a Python table (`SIZES` here, `CLIP_SIZES`, `WHISPER_SIZES`, ...
beside each tower). Gin files name a size and bind fields on top of it:

    DECODER_CONFIG = @config.named()
    config.named.size = 'llama-7b'
    config.DecoderConfig.scan_layers = True

`from_table` is how every `named` factory reads its table.
"""

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import gin
import jax.numpy as jnp

from unimoe_jax.moe.grouped_matmul import BACKENDS as GMM_BACKENDS

DISPATCH_MODES = ('dense', 'capacity', 'dropless')
# MoEConfig.layers patterns; 'every_other' is an alias of 'odd'.
MOE_LAYER_PATTERNS = ('all', 'even', 'odd', 'every_other')
LOAD_BALANCE_LOSS_FORMS = ('topk', 'top1')
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'projections')
# The activations the 'projections' remat policy keeps (names given with checkpoint_name in
# layers/attention.py, layers/mlp.py and moe/layer.py).
REMAT_SAVED_NAMES = (
    'query_proj',
    'key_proj',
    'value_proj',
    'attention_out',
    'mlp_wi_0',
    'mlp_wi_1',
    'mlp_wo',
    'moe_out',
)


SizedConfig = TypeVar('SizedConfig')


def from_table(
    table: Mapping[str, SizedConfig], size: str, overrides: Mapping[str, Any], what: str
) -> SizedConfig:
  """`table[size]` with gin's bindings of its class, then `overrides`, replacing fields.

  This is what calling the config class under gin gives, started from a named size instead of
  the class defaults: a gin file that names a size (`config.named.size = 'llama-7b'`) still
  honours class bindings from other files and flags (`config.DecoderConfig.scan_layers = True`,
  `--gin.config.DecoderConfig.num_layers=4`), in the scope the factory is called in.
  (`dataclasses.replace` alone would not: it passes every field, so gin injects none.)
  Unknown sizes raise KeyError naming `what` and the known sizes.
  """
  if size not in table:
    raise KeyError(f'Unknown {what} size {size!r}; known sizes: {sorted(table)}')
  base = table[size]
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
  return type(base)(**{**fields, **gin.get_bindings(type(base)), **overrides})


def check_positive(config, *fields: str) -> None:
  """Raises ValueError for the first of `fields` of `config` that is not > 0.

  The message names the field as `<ConfigClass>.<field>`, so that every config reports a bad
  size the same way (its `__post_init__` calls this with its size fields).
  """
  for field in fields:
    value = getattr(config, field)
    if value <= 0:
      raise ValueError(f'{type(config).__name__}.{field} must be positive, got {value}')


def check_divisible(config, field: str, by: str) -> None:
  """Raises ValueError when `config.<field>` is not a multiple of `config.<by>`, naming both as
  `<ConfigClass>.<field>=... is not divisible by <by>=...`."""
  value, divisor = getattr(config, field), getattr(config, by)
  if value % divisor:
    raise ValueError(f'{type(config).__name__}.{field}={value} is not divisible by {by}={divisor}')


def check_one_of(config, field: str, choices) -> None:
  """Raises ValueError when `config.<field>` is not in `choices`, naming the field."""
  value = getattr(config, field)
  if value not in choices:
    raise ValueError(
        f'{type(config).__name__}.{field} must be one of {sorted(choices)}, got {value!r}'
    )


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank adapters (Hu et al., 2021), as the official Uni-MoE stage 3 sets them with PEFT.

  `targets` chooses where adapters go: any of 'query', 'key', 'value', 'out' (attention),
  'mlp' (dense FFN matrices) and 'experts' (every expert's matrices, one adapter per expert).
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  targets: Tuple[str, ...] = ('query', 'key', 'value', 'out', 'mlp', 'experts')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def __post_init__(self):
    check_positive(self, 'rank')
    unknown = set(self.targets) - {'query', 'key', 'value', 'out', 'mlp', 'experts'}
    if unknown:
      raise ValueError(f'LoRAConfig.targets has unknown entries {sorted(unknown)}')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """A sparse mixture-of-experts FFN (the official `model/moe/moe.py` rule, plus GShard options).

  Attributes:
    num_experts: experts per MoE layer.
    num_experts_per_tok: top-k.
    layers: which decoder layers get an MoE FFN: 'all', 'even' (0, 2, 4, ...: the official
      `Uni_MoE_audio` / `Uni_MoE_speech_dp`, `Layer_num % 2 == 0`, and the 8e model's
      `moe_stride` 2), 'odd' (1, 3, 5, ..., as in GShard/Switch; 'every_other' is an alias
      kept for existing gin files), or an explicit sequence of layer indices.
    dispatch: 'dense' (reference: every expert on every token), 'capacity' (GShard one-hot
      dispatch with a capacity factor; overflow tokens dropped) or 'dropless' (sort by expert
      and a grouped matmul).
    capacity_factor: capacity per expert = ceil(capacity_factor * group_size * k / num_experts).
    min_capacity: lower bound for the capacity above.
    group_size: tokens per routing group for 'capacity'; 0 means one group per sequence.
    router_jitter: multiplicative uniform noise on the router input in training
      (Mixtral's `router_jitter_noise`); 0 disables it.
    load_balance_loss_coef: weight of the Switch load-balancing loss in the training loss.
    load_balance_loss_form: 'topk' (`E * sum_e P_e * f_e`, f_e the fraction of all k
      choices that go to e: it balances the load the experts actually compute; 1 under
      uniform routing) or 'top1' (f_e counts only each token's first choice: the official 8e
      / DeepSpeed `top2gating` `l_aux = mean(me * ce) * E * E`; the converted 8e config sets
      it). Padding is excluded from both.
    router_dtype: dtype of the router matmul and its logits. 'float32' by default: bfloat16
      logits keep 8 mantissa bits, so near ties flip top-k choices from rounding alone
      (Switch / ST-MoE keep the router in float32). The official 4-expert `gate` is a Linear
      in the model dtype (bfloat16 at release) and its weights are cast back to that dtype,
      which the converter reproduces by setting this to the model dtype. Top-k softmax, aux
      losses and statistics are float32 whatever this is.
    second_expert_sampling: DeepSpeed `top2gating(top2_2nd_expert_sampling=True)` (the
      official 8e model): softmax over all experts, 1st expert = argmax, 2nd = argmax of the
      logits plus Gumbel noise with the 1st masked out, weights p_i / (p_1 + p_2). Needs
      k = 2. It samples at inference too, as DeepSpeed does: the noise comes from the flax
      rng stream 'router' (`models.py` passes one with the dropout rng), or, when no 'router'
      rng is given (evaluation, decoding), from a key hashed from each token's router logits:
      deterministic, independent across tokens, layers and decoding steps.
    renormalize_after_drops: 'capacity' dispatch only: rescale the weights of each token's
      kept choices to sum to 1 after capacity drops (DeepSpeed divides by the kept
      probabilities); False keeps the pre-drop weights (GShard/T5X: a dropped choice just
      adds nothing). A token with every choice dropped gets weight 0 either way.
    router_z_loss_coef: weight of the ST-MoE router z-loss.
    gmm_backend: grouped matmul of the 'dropless' path: 'auto' (by platform: megablox on
      TPU, the tiled pure-JAX one elsewhere), 'ragged_dot', 'tiled', 'megablox' or 'mgpu'.
    gmm_tile: row tile of the 'tiled' backend; 0 picks it from the shape
      (`grouped_matmul.choose_tile`: 128 rows for large groups, down to 16 for small ones).
    fuse_ffn: with the 'tiled' backend, run each expert's whole SwiGLU (and its LoRA
      adapters) per chunk of rows in one loop with a hand-written backward
      (`moe/grouped_ffn.py`; same result, fewer full-size buffers); False runs separate
      grouped matmuls.
  """

  num_experts: int = 4
  num_experts_per_tok: int = 2
  layers: Union[str, Tuple[int, ...]] = 'all'
  dispatch: str = 'dropless'
  capacity_factor: float = 1.25
  min_capacity: int = 4
  group_size: int = 0
  router_jitter: float = 0.0
  load_balance_loss_coef: float = 0.0
  router_z_loss_coef: float = 0.0
  load_balance_loss_form: str = 'topk'
  router_dtype: str = 'float32'
  second_expert_sampling: bool = False
  renormalize_after_drops: bool = False
  gmm_backend: str = 'auto'
  gmm_tile: int = 0
  fuse_ffn: bool = True

  def __post_init__(self):
    backends = ('auto', *GMM_BACKENDS)
    if self.gmm_backend not in backends:
      raise ValueError(
          f'MoEConfig.gmm_backend must be one of {backends}, ' f'got {self.gmm_backend!r}'
      )
    if self.dispatch not in DISPATCH_MODES:
      raise ValueError(f'MoEConfig.dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}')
    if not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ValueError(
          f'MoEConfig.num_experts_per_tok={self.num_experts_per_tok} must be in '
          f'[1, num_experts={self.num_experts}]'
      )
    if isinstance(self.layers, str) and self.layers not in MOE_LAYER_PATTERNS:
      raise ValueError(
          f'MoEConfig.layers must be one of {MOE_LAYER_PATTERNS} or a list of '
          f'layer indices, got {self.layers!r}'
      )
    if not isinstance(self.layers, str):
      object.__setattr__(self, 'layers', tuple(int(i) for i in self.layers))
    if self.load_balance_loss_form not in LOAD_BALANCE_LOSS_FORMS:
      raise ValueError(
          f'MoEConfig.load_balance_loss_form must be one of '
          f'{LOAD_BALANCE_LOSS_FORMS}, got {self.load_balance_loss_form!r}'
      )
    try:
      router_dtype = jnp.dtype(self.router_dtype)
    except TypeError as e:
      raise ValueError(f'MoEConfig.router_dtype {self.router_dtype!r} is not a dtype') from e
    if not jnp.issubdtype(router_dtype, jnp.floating):
      raise ValueError(
          f'MoEConfig.router_dtype must be a floating dtype, ' f'got {self.router_dtype!r}'
      )
    if self.second_expert_sampling and self.num_experts_per_tok != 2:
      raise ValueError(
          'MoEConfig.second_expert_sampling is the top-2 rule of DeepSpeed '
          f'top2gating; it needs num_experts_per_tok=2, got '
          f'{self.num_experts_per_tok}'
      )

  @property
  def router_compute_dtype(self):
    return jnp.dtype(self.router_dtype)

  def is_moe_layer(self, index: int, num_layers: int) -> bool:
    if self.layers == 'all':
      return True
    if self.layers in ('odd', 'every_other'):
      return index % 2 == 1
    if self.layers == 'even':
      return index % 2 == 0
    bad = [i for i in self.layers if not 0 <= i < num_layers]
    if bad:
      raise ValueError(f'MoEConfig.layers has indices {bad} outside [0, {num_layers})')
    return index in self.layers


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A LLaMA-style decoder. Any subset of its layers can have an MoE FFN (`moe`).

  Attributes:
    vocab_size, embed_dim, num_layers, num_heads: the usual sizes.
    num_kv_heads: key/value heads for grouped-query attention (= num_heads for MHA).
    head_dim: per-head size; 0 (the default) means embed_dim // num_heads, derived on every read
      by `resolved_head_dim` (never stored: `dataclasses.replace(cfg, embed_dim=...)` of a
      derived config derives it again). Read the size through `resolved_head_dim`.
    mlp_dim: SwiGLU hidden size (of the dense FFN and of each expert).
    rope_theta: rotary base frequency.
    rms_norm_eps: RMSNorm epsilon.
    dtype: compute dtype of activations and matmuls ('float32' or 'bfloat16'). Parameters are
      stored in `param_dtype`; RMSNorm statistics, softmaxes, the router and the logits are
      computed in float32 whatever `dtype` is.
    remat: what the backward pass recomputes of each layer: 'none' (keep every activation),
      'full' (keep only the layer's input), 'dots_saveable' (keep matmul outputs without batch
      dimensions: every projection, not the attention scores) or 'projections' (keep only the
      outputs of the attention's query/key/value/out and the FFN's wi_0/wi_1/wo projections,
      tagged with `jax.ad_checkpoint.checkpoint_name`; `REMAT_SAVED_NAMES`).
    scan_layers: run the layers under `nn.scan`, parameters stacked on a leading 'layers'
      axis (`layer_stacking.py` has the layout and the converters). The layers scan in blocks
      of `scan_period()` layers (1 when every layer is alike, 2 for MoE on every other layer).
      A pattern with no shorter period (an irregular `moe.layers` list) runs the plain loop,
      with a warning. Compile time then no longer grows with depth.
    moe: None for a dense decoder.
    lora: None for no adapters.
  """

  vocab_size: int = 32000
  embed_dim: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  remat: str = 'none'
  scan_layers: bool = False
  moe: Optional[MoEConfig] = None
  lora: Optional[LoRAConfig] = None

  def __post_init__(self):
    check_divisible(self, 'num_heads', 'num_kv_heads')
    if self.head_dim < 0:
      raise ValueError(
          f'DecoderConfig.head_dim must be >= 0 (0: embed_dim // num_heads), '
          f'got {self.head_dim}'
      )
    if not self.head_dim and self.embed_dim % self.num_heads:
      raise ValueError(
          f'DecoderConfig.embed_dim={self.embed_dim} is not divisible by '
          f'num_heads={self.num_heads}; set head_dim explicitly'
      )
    check_one_of(self, 'remat', REMAT_POLICIES)
    for field in ('dtype', 'param_dtype'):
      jnp.dtype(getattr(self, field))  # Fails early, naming the bad dtype string.
    if self.moe is not None:
      for i in range(self.num_layers):
        self.moe.is_moe_layer(i, self.num_layers)

  @property
  def resolved_head_dim(self) -> int:
    """The per-head size: `head_dim`, or embed_dim // num_heads when it is 0."""
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def moe_layer_indices(self) -> Sequence[int]:
    if self.moe is None:
      return ()
    return tuple(i for i in range(self.num_layers) if self.moe.is_moe_layer(i, self.num_layers))

  def layer_kinds(self) -> Tuple[bool, ...]:
    """Per layer: True where its FFN is an MoE layer."""
    moe = set(self.moe_layer_indices())
    return tuple(i in moe for i in range(self.num_layers))

  def scan_period(self) -> Optional[int]:
    """Layers per scanned block with `scan_layers`, or None when the layers run as a loop."""
    if not self.scan_layers:
      return None
    return shortest_period(self.layer_kinds())


def shortest_period(kinds: Sequence) -> Optional[int]:
  """The smallest p < len(kinds) with `kinds[i] == kinds[i % p]` for all i and p dividing
  len(kinds) (1 for a single layer), or None when the sequence does not repeat."""
  n = len(kinds)
  for p in range(1, max(n // 2, 1) + 1):
    if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
      return p
  return None


# Named sizes. LLaMA-7B is the language model of Uni-MoE v1 (through LLaVA / Vicuna).
SIZES = {
    'tiny': DecoderConfig(
        vocab_size=512,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=128,
        dtype='float32',
    ),
    'llama-7b': DecoderConfig(),  # The defaults are LLaMA-7B's sizes.
}


@gin.configurable
def named(size: str, **overrides) -> DecoderConfig:
  """`SIZES[size]` with fields replaced (`from_table`), e.g. `named('tiny', moe=MoEConfig())`."""
  return from_table(SIZES, size, overrides, 'model')
