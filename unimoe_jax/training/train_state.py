"""The train state, created directly on its shards, and the jitted training step.

`TrainState` holds the full params tree but optimizer state for the trainable half only
(training/optimizer.py). Creation runs the model's `get_initial_variables` and the optimizer's
`init` under one `jax.jit` with `out_shardings` taken from the logical axis names on the
parameters (the boxes `nn.with_logical_partitioning` leaves; optax moments inherit them), so no
variable is ever materialised whole on one device.
"""

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax

from unimoe_jax import layer_stacking
from unimoe_jax import models
from unimoe_jax import partitioning
from unimoe_jax.training import optimizer as optimizer_lib

Params = Dict[str, Any]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done (= batches consumed)
  params: Params  # every parameter, trainable or frozen
  opt_state: optax.OptState  # for the trainable params only


def abstract_params(model, input_shapes, input_types=None) -> Params:
  """ShapeDtypeStructs of the (boxed) params tree, without allocating anything."""
  variables = jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), input_shapes, input_types)
  )
  return variables['params']


def create_train_state(
    model,
    optimizer: optax.GradientTransformation,
    mask: Params,
    mesh,
    rng: jax.Array,
    input_shapes: Mapping[str, Tuple[int, ...]],
    input_types: Optional[Mapping[str, Any]] = None,
    *,
    abstract_only=False,
) -> Tuple[Any, Any]:
  """(state, shardings): a sharded `TrainState`, or with `abstract_only` its ShapeDtypeStructs.

  Args:
    model: has t5x's `get_initial_variables(rng, input_shapes, input_types)`.
    optimizer: for the trainable half (`optimizer.make_optimizer`).
    mask: `optimizer.trainable_mask` over the params tree.
    mesh: from `partitioning.make_mesh`.
  """

  def init_params(rng):
    return model.get_initial_variables(rng, input_shapes, input_types)['params']

  def init_opt_state(params):
    return optimizer.init(optimizer_lib.split_params(params, mask)[0])

  def init(rng):
    params = init_params(rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=init_opt_state(params)
    )

  abstract = jax.eval_shape(init, rng)
  shardings = partitioning.params_shardings(mesh, abstract)
  if abstract_only:
    return (
        jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            nn.meta.unbox(abstract),
            shardings,
        ),
        shardings,
    )
  # Two programs, not one: the params' init depends only on the model, so runs that train
  # different parts of one model (the stages) share its compiled program through jax's
  # persistent cache; the optimizer's init (which depends on the mask) is a small program.
  with partitioning.mesh_context(mesh):
    params = jax.jit(lambda r: nn.meta.unbox(init_params(r)), out_shardings=shardings.params)(rng)
    opt_state = jax.jit(init_opt_state, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state), shardings


def _split_batch(batch: Mapping[str, jax.Array], parts: int) -> Dict[str, jax.Array]:
  def split(x):
    if x.shape[0] % parts:
      raise ValueError(f'batch size {x.shape[0]} is not divisible by grad_accum_steps={parts}')
    return x.reshape((parts, x.shape[0] // parts) + x.shape[1:])

  return {k: split(v) for k, v in batch.items()}


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    mask: Params,
    schedule: Callable[[jax.Array], jax.Array],
    grad_accum_steps: int = 1,
):
  """`train_step(state, batch, rng) -> (state, metrics)`, to be jitted by the caller.

  Gradients are taken with respect to the trainable params only. With `grad_accum_steps > 1`
  the batch is split along its first axis and the micro-batch gradients are summed (each
  micro-batch loss is its part of the whole batch's loss: `models.with_batch_totals`) inside
  a `lax.scan`, so memory holds one micro-batch of activations. `metrics` are t5x-style clu
  metrics from `model.loss_fn`, merged over micro-batches, plus 'learning_rate' and
  'grad_norm'.
  """
  from clu import metrics as clu_metrics  # pylint: disable=g-import-not-at-top

  def train_step(state: TrainState, batch, rng):
    trainable, frozen = optimizer_lib.split_params(state.params, mask)
    step_rng = jax.random.fold_in(rng, state.step)

    def loss_of(t, micro, r):
      return model.loss_fn(optimizer_lib.merge_params(t, frozen), micro, r)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(trainable, batch, step_rng)
    else:
      # Each microbatch's loss is its part of the whole batch's (models.with_batch_totals), so
      # the summed gradients are the whole batch's gradient.
      micro = _split_batch(models.with_batch_totals(batch), grad_accum_steps)
      first = jax.tree_util.tree_map(lambda x: x[0], micro)
      (_, metrics), grads = grad_fn(trainable, first, jax.random.fold_in(step_rng, 0))

      def body(carry, inputs):
        acc_grads, acc_metrics = carry
        index, mb = inputs
        (_, m), g = grad_fn(trainable, mb, jax.random.fold_in(step_rng, index))
        acc_metrics = jax.tree_util.tree_map(
            lambda a, b: a.merge(b),
            acc_metrics,
            m,
            is_leaf=lambda x: isinstance(x, clu_metrics.Metric),
        )
        return (jax.tree_util.tree_map(jnp.add, acc_grads, g), acc_metrics), None

      rest = jax.tree_util.tree_map(lambda x: x[1:], micro)
      (grads, metrics), _ = jax.lax.scan(
          body, (grads, metrics), (jnp.arange(1, grad_accum_steps), rest)
      )
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(metrics)
    metrics['learning_rate'] = clu_metrics.Average.from_model_output(
        jnp.asarray(schedule(state.step), jnp.float32)
    )
    metrics['grad_norm'] = clu_metrics.Average.from_model_output(optax.tree.norm(grads))
    new_state = state.replace(
        step=state.step + 1,
        params=optimizer_lib.merge_params(trainable, frozen),
        opt_state=opt_state,
    )
    return new_state, metrics

  return train_step


def jit_train_step(
    step_fn: Callable, mesh, state_shardings, input_shapes: Mapping[str, Tuple[int, ...]]
) -> Tuple[Callable, Dict[str, Any]]:
  """`step_fn` (`make_train_step`) jitted as `loop.train` runs it: the state sharded as
  `state_shardings` and donated, every batch input's rows split like 'activation_batch'
  (`partitioning.batch_sharding`), the rng and the metrics replicated. Returns the jitted step
  and the batch shardings. `tools/plan_memory.py` lowers this same function, so what it
  plans is what training compiles. Lower or call it inside `partitioning.mesh_context(mesh)`.
  """
  batch_shardings = {k: partitioning.batch_sharding(mesh, len(s)) for k, s in input_shapes.items()}
  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(
      step_fn,
      in_shardings=(state_shardings, batch_shardings, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
  )
  return jitted, batch_shardings


def place_params(
    params: Params, shardings: Params, loaded: Params, source: str
) -> Tuple[Params, Tuple[str, ...]]:
  """`params` with each leaf that `loaded` (numpy, nested dict) holds replaced by the loaded
  value, cast to the leaf's dtype and placed on its entry of `shardings`.

  `params` may be arrays or `jax.ShapeDtypeStruct`s: only their shapes and dtypes are read.
  Parameters the checkpoint lacks stay as they are in `params` (e.g. the fresh LoRA matrices
  and router when stage 3 starts from assembled experts); their paths are returned. A parameter
  the model does not have, or one whose shape differs, is an error naming it and `source`,
  raised before anything is placed. The checkpoint may hold the decoder layers looped or
  scanned (`layer_stacking.py`); they are converted to the layout of `params` first.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  loaded = layer_stacking.match_layout(loaded, params)
  current = traverse_util.flatten_dict(params)
  target_shardings = traverse_util.flatten_dict(shardings)
  new = traverse_util.flatten_dict(loaded)
  path = optimizer_lib.path_of
  unexpected = sorted(path(k) for k in new if k not in current)
  wrong = sorted(
      f'{path(k)}: checkpoint {tuple(np.shape(v))} vs model {current[k].shape}'
      for k, v in new.items()
      if k in current and tuple(np.shape(v)) != current[k].shape
  )
  if unexpected or wrong:
    lines = [f'checkpoint {source} does not fit the model:']
    lines += [f'  unexpected parameter {p}' for p in unexpected]
    lines += [f'  wrong shape {w}' for w in wrong]
    raise ValueError('\n'.join(lines))
  missing = tuple(sorted(path(k) for k in current if k not in new))
  for key, value in new.items():
    value = np.asarray(value).astype(current[key].dtype)
    current[key] = jax.make_array_from_callback(
        value.shape, target_shardings[key], lambda index, v=value: v[index]
    )
  return traverse_util.unflatten_dict(current), missing


def load_params_into(
    state: TrainState, shardings: TrainState, loaded: Params, source: str
) -> Tuple[TrainState, Tuple[str, ...]]:
  """`state` with its params replaced as `place_params` says (`shardings`: the state's); the
  step and the optimizer state are kept."""
  params, missing = place_params(state.params, shardings.params, loaded, source)
  return state.replace(params=params), missing
