"""t5x.contrib.moe's trainer and partitioner for `T5XUniMoEModel` (needs t5x installed).

gin/t5x/runs/train.gin binds `train.trainer_cls` to `MoeTrainer` and every run file's
partitioner to `MoePartitioner` (gin/t5x/partitioner.gin).

`MoePartitioner` is t5x's `MoePjitPartitioner` (mesh data x expert x model, the batch over
data and expert) whose mesh can be given as a `unimoe_jax.partitioning.MeshConfig` (the `MESH`
of the project's gin files). Without it t5x builds the mesh (TPU topology-aware); t5x's mesh
on CPU puts every device on `model` (`t5x.partitioning.get_cpu_mesh`), so experts could not be
split there, nor a run laid out as the project's 7B files plan it.

`MoeTrainer` is t5x's MoE trainer with two changes, both in the train step:

- **Exact microbatching.** t5x sums the microbatches' gradients; the batch gets
  `models.with_batch_totals` first, so each microbatch's loss is its part of the whole batch's
  loss and `num_microbatches=K` gives the update of one batch (tests/t5x_binaries_test.py).
- **No rescaling of expert gradients.** t5x's `MoeTrainer` multiplies the gradients of
  parameters whose path matches `sharded_match_fn` (default `.*expert.*`) by
  `num_expert_partitions`, compensating flaxformer's MoE layer under pjit. This model's
  gradients are exact under any mesh (the expert-parallel layer is a `shard_map` whose
  collectives transpose to each other, the rest is GSPMD), and a rescale would make them
  `num_expert_partitions` times too large. Its expert weights (`.../moe/wi_0/kernel`) happen
  not to match t5x's pattern; `sharded_match_fn` defaults to None here so that no parameter
  name can ever trigger the rescale.

Everything else (checkpointing, metrics, evaluation, the train loop) is t5x's own.
"""

from typing import Callable, Optional

from absl import logging
import cached_property
from t5x import trainer as t5x_trainer_lib
from t5x.contrib.moe import partitioning as moe_partitioning_lib
from t5x.contrib.moe import trainer as moe_trainer_lib
from t5x.contrib.moe import training_utils

from unimoe_jax import models
from unimoe_jax import partitioning


class MoePartitioner(moe_partitioning_lib.MoePjitPartitioner):
  """`MoePjitPartitioner` with an optional explicit mesh (`mesh_config`).

  Args (beyond t5x's): mesh_config: the (data, expert, model) shape. None keeps t5x's
    `default_moe_mesh` from `num_expert_partitions` and `num_partitions`; with a
    `mesh_config` those two do not shape the mesh.
  """

  def __init__(self, *args, mesh_config: Optional[partitioning.MeshConfig] = None, **kwargs):
    super().__init__(*args, **kwargs)
    self._mesh_config = mesh_config

  @cached_property.cached_property
  def mesh(self):
    if self._mesh_config is None:
      return super().mesh
    mesh = partitioning.make_mesh(self._mesh_config)
    logging.info('MoePartitioner mesh from %s: %s', self._mesh_config, dict(mesh.shape))
    return mesh


class MoeTrainer(moe_trainer_lib.MoeTrainer):
  """`t5x.contrib.moe.trainer.MoeTrainer` with exact microbatching, no expert-gradient scale."""

  def __init__(self, *args, sharded_match_fn: Optional[Callable[[str], bool]] = None, **kwargs):
    super().__init__(*args, sharded_match_fn=sharded_match_fn, **kwargs)

  @cached_property.cached_property
  def _partitioned_train_step(self):
    """t5x's MoE train step, with the whole batch's totals added before microbatching."""

    def train_with_lr(train_state, batch):
      batch = models.with_batch_totals(batch)
      grad_accum, metrics, flax_mutables = t5x_trainer_lib.accumulate_grads_microbatched(
          self._model,
          train_state,
          batch,
          self._get_step_rng(train_state.step),
          self._num_microbatches,
          data_partition_spec=self.data_partition_spec,
      )
      grad_accum = training_utils.scale_sharded_grads(
          grad_accum, self._sharded_match_fn, scale_factor=self._num_expert_partitions
      )
      return t5x_trainer_lib.apply_grads(
          train_state,
          grad_accum,
          metrics,
          self._learning_rate_fn(train_state.step),
          self._weight_metrics_computer,
          other_state_variables={'flax_mutables': flax_mutables} if flax_mutables else None,
      )

    return self._partitioner.partition(
        train_with_lr,
        in_axis_resources=(self._train_state_axes, self.data_partition_spec),
        out_axis_resources=(self._train_state_axes, None),
        donate_argnums=(0,),
    )
