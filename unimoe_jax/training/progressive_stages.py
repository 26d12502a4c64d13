"""The runs of `python -m unimoe_jax.progressive` (the three Uni-MoE stages on the sample data,
plus the demo's text warm start), as a table of gin files and bindings, and `run_all`, which
trains them in order in this process and assembles the stage-2 experts for stage 3.

Each run parses, in this order: the stage's gin files, its table bindings, the user's gin files,
the run's own bindings (MODEL_DIR, TRAIN_STEPS, INITIAL_CHECKPOINT_PATH) and the user's
bindings; gin is cleared before and after.
"""

import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging

from unimoe_jax.modalities import MODALITIES  # Stage 2's runs, in the order of stage 3's experts.

MODEL_FILES = ('models/tiny.gin', 'models/multimodal_tiny.gin')
DATA_FILE = 'demo/progressive_data.gin'

# The stages as a table: name, gin files, bindings. Your --gin_file files are parsed after
# them; MODEL_DIR, TRAIN_STEPS and INITIAL_CHECKPOINT_PATH are bound per run after those.
STAGE0 = (
    'stage0_text',
    [*MODEL_FILES, 'runs/train.gin', 'demo/tiny.gin', DATA_FILE],
    {
        'MIXTURE_OR_TASK_NAME': '%STAGE0_MIXTURE',
        'TASK_FEATURE_LENGTHS': "{'targets': 128}",  # text only: media are not fed
        'TRAINABLE_PATTERNS': "('decoder/.*',)",
        'LEARNING_RATE': '3e-3',
        'BATCH_SIZE': '32',
    },
)
STAGE1 = (
    'stage1_align',
    [*MODEL_FILES, 'stages/stage1_align.gin', 'demo/tiny.gin', DATA_FILE],
    {
        'MIXTURE_OR_TASK_NAME': '%STAGE1_MIXTURE',
        'LEARNING_RATE': '5e-3',
    },
)
STAGE2 = (
    'stage2_{modality}',
    [*MODEL_FILES, 'stages/stage2_expert.gin', 'demo/tiny.gin', DATA_FILE],
    {
        'EXPERT_MODALITY': "'{modality}'",
        'LEARNING_RATE': '3e-3',
    },
)
_STAGE3_RUN = {
    'MIXTURE_OR_TASK_NAME': '%STAGE3_MIXTURE',
    'LEARNING_RATE': '3e-3',
    'EVAL_MIXTURE_OR_TASK_NAME': '%EVAL_MIXTURE',
    'EVAL_TASK_FEATURE_LENGTHS': "{'targets': 128, 'image_features': 1, 'video_features': 1, "
    "'speech_features': 1, 'audio_features': 1}",
    'EVAL_BATCH_SIZE': '32',
}
STAGE3 = (
    'stage3_unimoe',
    [*MODEL_FILES, 'stages/stage3_unimoe.gin', 'demo/tiny.gin', DATA_FILE],
    dict(_STAGE3_RUN, **{'loop.train.routing_report': 'True'}),
)
STAGE3_DENSE = (
    'stage3_dense',
    [*MODEL_FILES, 'stages/stage3_dense.gin', 'demo/tiny.gin', DATA_FILE],
    dict(_STAGE3_RUN),
)


def parse_stage(
    gin_files: Sequence[str],
    bindings: Dict[str, str],
    user_files: Sequence[str],
    run_bindings: Dict[str, str],
    user_bindings: Sequence[str],
) -> None:
  """Parses one stage's configuration (see run_stage for the order)."""
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top

  gin_utils.parse(
      list(gin_files),
      [f'{k} = {v}' for k, v in bindings.items()]
      + [f'include {f!r}' for f in user_files]
      + [f'{k} = {v}' for k, v in run_bindings.items()]
      + list(user_bindings),
      import_modules=('unimoe_jax.tasks',),
  )


def run_stage(
    name: str,
    gin_files: Sequence[str],
    bindings: Dict[str, str],
    user_files: Sequence[str],
    run_bindings: Dict[str, str],
    user_bindings: Sequence[str],
):
  """One training run in this process (gin is cleared before and after). Parsed in this
  order: the stage's files, its table bindings, `user_files`, `run_bindings` (paths, steps),
  `user_bindings`."""
  import gin  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import loop  # pylint: disable=g-import-not-at-top

  started = time.time()
  logging.info('=== %s ===', name)
  gin.clear_config()
  try:
    parse_stage(gin_files, bindings, user_files, run_bindings, user_bindings)
    result = loop.train()  # pylint: disable=no-value-for-parameter
  finally:
    gin.clear_config()
  logging.info(
      '=== %s done in %.0f s: %s',
      name,
      time.time() - started,
      {k: round(v, 4) for k, v in result['train'].items() if k in ('loss', 'accuracy')},
  )
  return result


def _bind(stage, values: Dict[str, str]):
  """`stage` with `{key}` replaced by `values[key]` in its name and bindings (not str.format:
  gin dict literals hold braces)."""
  name, files, bindings = stage
  for key, value in values.items():
    name = name.replace('{%s}' % key, value)
    bindings = {k: v.replace('{%s}' % key, value) for k, v in bindings.items()}
  return name, files, bindings


def run_all(
    work: str,
    steps: Sequence[int],
    user_files: Sequence[str] = (),
    user_bindings: Sequence[str] = (),
    compare_dense: bool = False,
) -> Tuple[dict, Optional[dict], Dict[str, List[float]]]:
  """Trains the stages in `work`/<stage name>: stage 0 (`steps[0]` steps, skipped at 0), stage
  1 from it (or from the user's INITIAL_CHECKPOINT_PATH), one stage-2 run per modality from
  stage 1, their FFNs assembled as the experts of `work`/stage3_init (kept when it exists),
  stage 3 from that, and with `compare_dense` the dense stage 3 from stage 1. Returns stage
  3's `loop.train` result, the dense one's (or None) and every run's loss history by name."""
  histories: Dict[str, List[float]] = {}

  def train(stage, num_steps, initial=None, **values):
    name, files, bindings = _bind(stage, values)
    run = {'MODEL_DIR': repr(os.path.join(work, name)), 'TRAIN_STEPS': str(num_steps)}
    if initial:
      run['INITIAL_CHECKPOINT_PATH'] = repr(initial)
    result = run_stage(name, files, bindings, user_files, run, user_bindings)
    histories[name] = result['loss_history']
    return result, os.path.join(work, name)

  stage0_dir = train(STAGE0, steps[0])[1] if steps[0] else None
  _, stage1_dir = train(STAGE1, steps[1], stage0_dir)
  expert_dirs = [train(STAGE2, steps[2], stage1_dir, modality=m)[1] for m in MODALITIES]

  from unimoe_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from unimoe_jax.convert import experts as experts_lib  # pylint: disable=g-import-not-at-top

  assembled = os.path.join(work, 'stage3_init')
  if not os.path.exists(assembled):
    base, _ = checkpoints.read_params(stage1_dir)
    trees = [checkpoints.read_params(d)[0] for d in expert_dirs]
    checkpoints.save(
        assembled,
        experts_lib.assemble_experts(base, trees, expert_dirs),
        '# experts: ' + ', '.join(expert_dirs) + '\n',
    )
  result, _ = train(STAGE3, steps[3], assembled)
  dense = train(STAGE3_DENSE, steps[3], stage1_dir)[0] if compare_dense else None
  return result, dense, histories
