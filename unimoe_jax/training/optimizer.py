"""The optimizer: AdamW with warm-up and cosine decay, clipping, accumulation, freezing.

Only *trainable* parameters reach the optimizer. `trainable_mask` decides which by regular
expressions over parameter paths (`decoder/layers_0/moe/router`, ...) set in gin, and
`split_params` cuts the params tree in two: the frozen half is never differentiated (no
gradient buffers) and carries no optimizer state, so a stage that trains the connectors of a
7B model keeps Adam moments for the connectors only.

Paths are '/'-joined keys of the params tree without the 'params' collection name.
"""

import dataclasses
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gin
import jax.numpy as jnp
import optax
from flax import traverse_util

from unimoe_jax import layer_stacking

Params = Dict[str, Any]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW over the trainable parameters (defaults: the official stage-3 script's).

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up from 0; if None, `warmup_ratio * total_steps`.
    warmup_ratio: the official scripts' `warmup_ratio` (0.03).
    schedule: 'cosine' (to `end_learning_rate_ratio * learning_rate` at `total_steps`) or
      'constant' (after warm-up).
    end_learning_rate_ratio: final fraction of the peak for the cosine schedule.
    weight_decay: decoupled weight decay; applied only to parameters matching
      `weight_decay_patterns` and never to norms or biases (one-dimensional leaves).
    b1, b2, eps: Adam.
    clip_grad_norm: global-norm clipping of the trainable gradients (0 disables).
    grad_accum_steps: micro-batches per optimizer update; the batch is split along its first
      axis and the gradients summed inside one training step (train_state.make_train_step).
  """

  learning_rate: float = 4e-5
  warmup_steps: Optional[int] = None
  warmup_ratio: float = 0.03
  schedule: str = 'cosine'
  end_learning_rate_ratio: float = 0.0
  weight_decay: float = 0.0
  weight_decay_patterns: Tuple[str, ...] = ('.*',)
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_grad_norm: float = 1.0
  grad_accum_steps: int = 1

  def __post_init__(self):
    if self.schedule not in ('cosine', 'constant'):
      raise ValueError(
          f"OptimizerConfig.schedule must be 'cosine' or 'constant', got " f'{self.schedule!r}'
      )
    if self.learning_rate < 0:
      raise ValueError(f'OptimizerConfig.learning_rate must be >= 0, got {self.learning_rate}')
    if self.grad_accum_steps < 1:
      raise ValueError(
          f'OptimizerConfig.grad_accum_steps must be >= 1, got ' f'{self.grad_accum_steps}'
      )


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Step -> learning rate: linear warm-up, then cosine decay or constant."""
  warmup = config.warmup_steps
  if warmup is None:
    warmup = int(round(config.warmup_ratio * total_steps))
  warmup = max(0, min(warmup, total_steps))
  peak = config.learning_rate
  if config.schedule == 'constant':
    after = optax.constant_schedule(peak)
  else:
    after = optax.cosine_decay_schedule(
        peak, max(1, total_steps - warmup), alpha=config.end_learning_rate_ratio
    )
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def path_of(key: Tuple[str, ...]) -> str:
  return '/'.join(str(k) for k in key)


def _matches(patterns: Sequence[str], path: str) -> bool:
  return any(re.fullmatch(p, path) for p in patterns)


def _layer_names(params: Params) -> Dict[Tuple[str, ...], List[str]]:
  """Leaf key -> the looped paths it holds (one, or one per layer for a stacked leaf)."""
  flat = traverse_util.flatten_dict(params)
  names = {}
  for key, value in flat.items():
    layout = layer_stacking.stacked_leaf_layout(params, key)
    names[key] = [path_of(key)] if layout is None else layer_stacking.looped_paths(key, *layout)
  return names


def trainable_mask(
    params: Params, trainable: Sequence[str] = ('.*',), frozen: Sequence[str] = ()
) -> Params:
  """A tree of bools like `params`: True where a path matches `trainable` and not `frozen`.

  Patterns read looped paths (`decoder/layers_3/moe/router`) whatever the layout: a stacked
  leaf of scanned layers (`decoder/stacked_layers/offset_1/moe/router`, see
  layer_stacking.py) is matched through the looped paths of the layers it holds
  (`decoder/layers_1/...`, `decoder/layers_3/...`, ...), and is trainable when all of them are;
  a pattern that selects only some of its layers is an error (one array cannot be half
  frozen: scan off, or select whole kinds of layers). The stacked path itself matches too.

  Raises ValueError when a pattern matches no parameter (a typo would otherwise freeze or
  train the wrong thing silently) or when nothing is left trainable.
  """
  flat = traverse_util.flatten_dict(params)
  names = _layer_names(params)
  for kind, patterns in (('trainable', trainable), ('frozen', frozen)):
    for pattern in patterns:
      try:
        compiled = re.compile(pattern)
      except re.error as e:
        raise ValueError(f'{kind} pattern {pattern!r} is not a regular expression: {e}') from e
      if not any(compiled.fullmatch(p) for key in flat for p in names[key] + [path_of(key)]):
        shown = sorted(p for ps in names.values() for p in ps)[:4]
        raise ValueError(
            f'{kind} pattern {pattern!r} matches no parameter; paths look like ' f'{shown}'
        )

  def selected(key, patterns):
    hits = [_matches(patterns, p) for p in names[key]]
    if len(hits) > 1 and any(hits) and not all(hits) and not _matches(patterns, path_of(key)):
      chosen = [p for p, hit in zip(names[key], hits) if hit]
      raise ValueError(
          f'patterns {list(patterns)} select {chosen} but not the other layers '
          f'stacked with them in {path_of(key)} (scanned layers share one array); '
          'select all of them, or set DecoderConfig.scan_layers = False'
      )
    return all(hits) or _matches(patterns, path_of(key))

  mask = {key: selected(key, trainable) and not selected(key, frozen) for key in flat}
  if not any(mask.values()):
    raise ValueError(
        f'no parameter is trainable (trainable={list(trainable)}, ' f'frozen={list(frozen)})'
    )
  return traverse_util.unflatten_dict(mask)


def split_params(params: Params, mask: Params) -> Tuple[Params, Params]:
  """(trainable, frozen): two nested dicts holding the leaves where `mask` is True / False."""
  flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Params, frozen: Params) -> Params:
  """Inverse of `split_params`."""
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def weight_decay_mask(params: Params, patterns: Sequence[str]) -> Params:
  """True for leaves that take weight decay: matrices matching `patterns` (no norms, biases).

  A stacked leaf of scanned layers is read per layer: its leading 'layers' axis does not make
  a norm scale a matrix, and the patterns see its looped paths (as in `trainable_mask`).
  """
  flat = traverse_util.flatten_dict(params)
  out = {}
  for k, v in flat.items():
    layout = layer_stacking.stacked_leaf_layout(params, k)
    if layout is None:
      out[k] = jnp.ndim(v) > 1 and _matches(patterns, path_of(k))
    else:
      out[k] = jnp.ndim(v) > 2 and all(
          _matches(patterns, p) for p in layer_stacking.looped_paths(k, *layout)
      )
  return traverse_util.unflatten_dict(out)


def make_optimizer(
    config: OptimizerConfig, total_steps: int
) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation for the trainable params, and its learning-rate schedule.

  With `grad_accum_steps > 1` the training step itself accumulates micro-batch gradients
  (train_state.make_train_step) and the optimizer sees one update per step; the schedule counts
  optimizer updates, which equal training steps.
  """
  schedule = learning_rate_schedule(config, total_steps)
  parts = []
  if config.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_grad_norm))
  parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
  if config.weight_decay > 0:
    patterns = config.weight_decay_patterns
    parts.append(
        optax.add_decayed_weights(
            config.weight_decay, mask=lambda p: weight_decay_mask(p, patterns)
        )
    )
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
