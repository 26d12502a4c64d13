"""What t5x's own binaries (t5x.train, t5x.eval, t5x.infer) need beyond `models.UniMoEModel`.

gin/t5x/ runs the same model and stages under t5x. t5x is not on PyPI and is never a
dependency: this module imports it only inside `T5XUniMoEModel.optimizer_def` (the one place
that builds a t5x object), so everything else here works, and is tested, without it.

What t5x needs and `UniMoEModel` does not provide by itself:

- `get_initial_variables` returning unboxed `'params'` plus a `'params_axes'` collection: t5x's
  partitioner reads logical axis names only from `params_axes` (`<param>_axes` leaves holding
  `flax.linen.partitioning.AxisMetadata`), never from `nn.LogicallyPartitioned` boxes. The
  names come from the boxes our layers put on every parameter, so there is one source.
- `optimizer_def`: a t5x `OptaxWrapper` around the project's AdamW (training/optimizer.py),
  with the learning-rate schedule *inside* optax (t5x's `OptaxWrapper` ignores the trainer's
  `learning_rate_fn`, which is only logged; `learning_rate_fn` below gives the trainer the same
  schedule so that the logged value is the applied one). Freezing by path patterns uses
  `optax.masked` and `set_to_zero` (t5x differentiates every parameter, so unlike
  `unimoe_jax.train` frozen weights still get gradient buffers, but no Adam moments).
- `FEATURE_CONVERTER_CLS`: t5x calls it as
  `FEATURE_CONVERTER_CLS(pack=..., use_custom_packing_ops=...)`; here it is the multimodal
  converter with the model's modalities bound, reading its first packed row as the dataset is
  built (a pipeline that yields nothing fails at once).
- `logical_axis_rules`: `partitioning.logical_axis_rules()` (FSDP or not, as gin's
  `partitioning.logical_axis_rules.fsdp` says) for a t5x partitioner's mesh. gin/t5x/
  uses t5x's MoE partitioner (mesh ('data', 'expert', 'model'): the rules unchanged, experts on
  `expert`; unimoe_jax/t5x_moe.py). For t5x's plain `PjitPartitioner` (the default
  `mesh_axes`, ('data', 'model')) the missing 'expert' axis is dropped from the rules, and
  experts are replicated (or split on 'model' through their 'mlp' axis).
- `score_batch(..., return_intermediates=True)` with t5x's intermediates layout (every leaf has
  a leading batch axis, as t5x.infer requires), and `predict_batch_with_aux` accepting t5x's
  `decoder_params` keyword.
"""

import functools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.core import frozen_dict
from flax.linen import partitioning as flax_partitioning

from unimoe_jax import models
from unimoe_jax import network
from unimoe_jax import partitioning
from unimoe_jax.training import optimizer as optimizer_lib

T5X_MESH_AXES = ('data', 'model')


# ---- variables --------------------------------------------------------------------------


def split_boxed_params(boxed_params) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(params, params_axes) from a params tree whose leaves are `nn.LogicallyPartitioned`.

  params_axes mirrors params with each leaf `k` renamed `k_axes` and holding
  `AxisMetadata(names=...)`, the layout `flax.linen.partitioning.param_with_axes` sows and t5x
  reads. A parameter without logical axis names is an error naming it (t5x would fail later
  with "Missing axis names for parameters").
  """
  flat = traverse_util.flatten_dict(frozen_dict.unfreeze(boxed_params))
  params, axes = {}, {}
  missing = []
  for path, leaf in flat.items():
    if not isinstance(leaf, nn.LogicallyPartitioned):
      missing.append('/'.join(path))
      continue
    params[path] = leaf.value
    axes[path[:-1] + (path[-1] + '_axes',)] = flax_partitioning.AxisMetadata(
        names=tuple(leaf.names)
    )
  if missing:
    raise ValueError(
        f'parameters without logical axis names (use nn.with_logical_partitioning '
        f'on their initializers): {sorted(missing)}'
    )
  return traverse_util.unflatten_dict(params), traverse_util.unflatten_dict(axes)


# ---- optimizer --------------------------------------------------------------------------


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


@gin.configurable
def optax_optimizer(
    total_steps: int = gin.REQUIRED,
    config: Optional[optimizer_lib.OptimizerConfig] = None,
    trainable_patterns: Sequence[str] = ('.*',),
    frozen_patterns: Sequence[str] = (),
) -> optax.GradientTransformation:
  """The project's AdamW + schedule (`OptimizerConfig`, bound in gin) over the full params.

  Parameters not selected by the patterns get zero updates and no optimizer state (two
  `optax.masked`; their states are among those t5x's OptaxWrapper can partition).
  """
  config = config or optimizer_lib.OptimizerConfig()
  if config.grad_accum_steps != 1:
    raise ValueError(
        'under t5x, accumulate gradients with trainer.Trainer.num_microbatches, not '
        f'OptimizerConfig.grad_accum_steps={config.grad_accum_steps}'
    )
  tx, _ = optimizer_lib.make_optimizer(config, total_steps)
  trainable_patterns, frozen_patterns = tuple(trainable_patterns), tuple(frozen_patterns)
  if trainable_patterns == ('.*',) and not frozen_patterns:
    return tx

  def trainable(params):
    mask = traverse_util.flatten_dict(
        optimizer_lib.trainable_mask(
            frozen_dict.unfreeze(params), trainable_patterns, frozen_patterns
        ),
        sep='/',
    )
    return jax.tree_util.tree_map_with_path(lambda path, _: mask[_path_str(path)], params)

  def frozen(params):
    return jax.tree_util.tree_map(lambda t: not t, trainable(params))

  # Two masks rather than optax.multi_transform: recent optax implements that as
  # optax.partition, whose PartitionState t5x's OptaxStatePartitionRules does not know;
  # MaskedState and EmptyState it does. `masked` passes masked-out gradients through
  # unchanged, so the second mask zeroes them.
  return optax.chain(optax.masked(tx, trainable), optax.masked(optax.set_to_zero(), frozen))


@gin.configurable
def learning_rate_fn(
    total_steps: int = gin.REQUIRED, config: Optional[optimizer_lib.OptimizerConfig] = None
) -> optax.Schedule:
  """The schedule inside `optax_optimizer`, for t5x's `trainer.Trainer.learning_rate_fn`
  (which t5x only logs as the metric 'learning_rate')."""
  return optimizer_lib.learning_rate_schedule(
      config or optimizer_lib.OptimizerConfig(), total_steps
  )


# ---- partitioning and data --------------------------------------------------------------


@gin.configurable
def logical_axis_rules(
    mesh_axes: Sequence[str] = T5X_MESH_AXES, rules: Optional[Sequence[Tuple[str, Any]]] = None
) -> Tuple[Tuple[str, Any], ...]:
  """`rules` restricted to the mesh axes of t5x's PjitPartitioner (t5x's rule format).

  `rules` defaults to `partitioning.logical_axis_rules()`, read when this is called, so the
  gin switch `partitioning.logical_axis_rules.fsdp` reaches t5x's partitioner too. A rule's
  mesh axes that the mesh lacks are removed: ('data', 'expert') becomes 'data', 'expert'
  becomes None (replicated).
  """
  if rules is None:
    rules = partitioning.logical_axis_rules()
  out = []
  for name, target in rules:
    targets = target if isinstance(target, (tuple, list)) else (target,)
    kept = tuple(t for t in targets if t is not None and t in mesh_axes)
    out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
  return tuple(out)


@gin.configurable
def num_experts(config=gin.REQUIRED) -> int:
  """Experts per MoE layer of a `UniMoEConfig` (1 for a dense model): the default
  `NUM_EXPERT_PARTITIONS` of t5x's MoE partitioner in gin/t5x/runs/train.gin, so the size
  lives in the model's gin file only."""
  moe = config.decoder.moe
  return moe.num_experts if moe is not None else 1


@gin.configurable
def task_vocabulary(
    mixture_or_task_name: str = gin.REQUIRED,
    mixture_or_task_module: Optional[str] = 'unimoe_jax.tasks',
):
  """The targets vocabulary of a registered seqio task (the model decodes with its eos_id)."""
  from unimoe_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  pipeline.import_task_modules(
      [mixture_or_task_module]
      if isinstance(mixture_or_task_module, str)
      else list(mixture_or_task_module or ())
  )
  return pipeline.get_mixture_or_task(mixture_or_task_name).output_features['targets'].vocabulary


# ---- the model --------------------------------------------------------------------------


@gin.configurable
class T5XUniMoEModel(models.UniMoEModel):
  """`UniMoEModel` in the form t5x's binaries consume (see the module docstring).

  Args (beyond UniMoEModel's):
    optimizer_def: an optax `GradientTransformation` (wrapped in t5x's `OptaxWrapper` when t5x
      reads `model.optimizer_def`) or a t5x `OptimizerDef`; None for eval / infer.
    feature_modalities: modalities the feature converter declares; they must equal the
      `<m>_features` keys of TASK_FEATURE_LENGTHS (default: the model's modalities).
  """

  def __init__(
      self,
      config=gin.REQUIRED,
      vocabulary: Any = None,
      optimizer_def: Any = None,
      feature_modalities: Optional[Sequence[str]] = None,
      **kwargs,
  ):
    super().__init__(config, vocabulary=vocabulary, optimizer_def=optimizer_def, **kwargs)
    self.feature_modalities = tuple(
        config.modalities if feature_modalities is None else feature_modalities
    )

  @property
  def optimizer_def(self):
    value = self._optimizer_def
    if isinstance(value, optax.GradientTransformation):
      from t5x import optimizers  # pylint: disable=g-import-not-at-top

      value = self._optimizer_def = optimizers.OptaxWrapper(value)
    return value

  @optimizer_def.setter
  def optimizer_def(self, value):
    self._optimizer_def = value

  @property
  def optax_transformation(self) -> Optional[optax.GradientTransformation]:
    """The optax transformation inside `optimizer_def` (no t5x import)."""
    value = self._optimizer_def
    return getattr(value, 'optax_optimizer', value)

  @property
  def FEATURE_CONVERTER_CLS(self):  # pylint: disable=invalid-name
    from unimoe_jax.data.feature_converter import MultimodalDecoderFeatureConverter  # pylint: disable=g-import-not-at-top
    # probe_first_row: t5x.train reads the first batch only after compiling the train step;
    # a pipeline that yields nothing, or a first row whose soft-token counts differ from the
    # model's (row_check: every row, as our loops check every batch), then fails while the
    # dataset is built instead.
    return functools.partial(
        MultimodalDecoderFeatureConverter,
        modalities=self.feature_modalities,
        probe_first_row=True,
        row_check=functools.partial(
            network.check_placeholders, self.config, where='t5x feature converter row'
        ),
    )

  def get_initial_variables(
      self,
      rng,
      input_shapes: Mapping[str, Tuple[int, ...]],
      input_types: Optional[Mapping[str, Any]] = None,
  ) -> frozen_dict.FrozenDict:
    """FrozenDict `{'params': unboxed params, 'params_axes': their logical axes}`, no more.

    Other collections (e.g. 'intermediates') are dropped: t5x would turn them into
    flax_mutables and switch its trainer to a 4-argument loss_fn.
    """
    variables = super().get_initial_variables(rng, input_shapes, input_types)
    unexpected = sorted(set(variables) - {'params', 'intermediates'})
    if unexpected:
      raise ValueError(
          f'module init created collections t5x would treat as mutable state: ' f'{unexpected}'
      )
    params, params_axes = split_boxed_params(variables['params'])
    # t5x's contract (TrainStateInitializer, FlaxOptimTrainState.as_logical_axes): a FrozenDict.
    return frozen_dict.freeze({'params': params, 'params_axes': params_axes})

  def score_batch(self, params, batch, return_intermediates: bool = False):
    """`[batch]` log-likelihood of the loss-weighted targets; with `return_intermediates`,
    t5x's `{'decoder': {'target_tokens', 'loss_weights', 'token_scores'}}` (1-tuples, each
    `[batch, length]`)."""
    logits, _ = self._compute_logits(params, batch)
    targets = batch['decoder_target_tokens']
    weights = models.loss_weights(batch)
    token_loss, _ = models.cross_entropy(logits, targets)
    token_scores = -token_loss * weights
    scores = jnp.sum(token_scores, axis=-1)
    if return_intermediates:
      return scores, {
          'decoder': {
              'target_tokens': (targets,),
              'loss_weights': (weights,),
              'token_scores': (token_scores,),
          }
      }
    return scores

  def predict_batch_with_aux(
      self,
      params,
      batch,
      rng=None,
      *,
      return_all_decodes: bool = False,
      num_decodes: int = 1,
      decoder_params: Optional[Mapping] = None,
      prompt_with_targets: bool = False,
  ):
    """As UniMoEModel's; `decoder_params` (t5x) may carry only 'decode_rng'."""
    decoder_params = dict(decoder_params or {})
    if 'decode_rng' in decoder_params:
      if rng is not None:
        raise ValueError('pass the decoding rng either as rng or as decoder_params["decode_rng"]')
      rng = decoder_params.pop('decode_rng')
    if decoder_params:
      raise ValueError(
          f'decoder_params: unsupported {sorted(decoder_params)}; decoding settings '
          f'are T5XUniMoEModel arguments (decode_method, temperature, ...)'
      )
    return super().predict_batch_with_aux(
        params,
        batch,
        rng,
        return_all_decodes=return_all_decodes,
        num_decodes=num_decodes,
        prompt_with_targets=prompt_with_targets,
    )
