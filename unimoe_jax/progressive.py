r"""`python -m unimoe_jax.progressive`: the three Uni-MoE stages and the evaluation, end to end.

With no arguments it writes the embedded sample data (tools/make_sample_data.py) and trains the
tiny multimodal model on a CPU, nothing downloaded:

  0. warm start (demo only): the decoder learns the conversations as text, each media item
     described in words where its placeholder was (unimoe_sample_text_warmup), standing in for
     the pretrained LLaMA/Vicuna of a real run, which can read such descriptions;
  1. alignment: connectors only, on captions and transcriptions (gin/stages/stage1_align.gin);
  2. modality experts: one run per modality, dense FFN only (gin/stages/stage2_expert.gin);
     tools/assemble_experts.py-equivalent: the four FFNs become the experts of 4-expert MoE layers;
  3. Uni-MoE tuning: LoRA + router + projectors on the mixed instruction data
     (gin/stages/stage3_unimoe.gin), then the sample evaluation mixture, and where the router
     sends each evaluation task's text and media tokens (MODEL_DIR/routing.json).

With `--compare dense` it also tunes the dense model the same way from the stage-1 checkpoint
(gin/stages/stage3_dense.gin: LoRA + projectors, the same steps, data and evaluation, no MoE).

It ends with a table of each evaluation task's metric next to the task's chance level (from the
data's own sample_data_info.json), the dense model's beside it, each modality's normalised score
and the bias across modalities (progressive_report.py), in WORKDIR/results.md with pictures
(loss curves, routing heatmaps, the comparison; also in TensorBoard under WORKDIR/pictures).
Flags:

  --workdir DIR        where data, checkpoints and logs go (default /tmp/unimoe_progressive)
  --gin_file F         your gin files for every stage, parsed after the stage's own settings
                       (gin/demo/progressive_data.gin names the macros that choose each
                       stage's data: STAGE1_MIXTURE, STAGE3_MIXTURE, EVAL_MIXTURE, ...)
  --gin.NAME=VALUE     bindings for every stage, last, e.g. --gin.BATCH_SIZE=16
  --steps S0,S1,S2,S3  training steps of the four stages (S0 = 0: no text warm start; stage 1
                       starts from your INITIAL_CHECKPOINT_PATH)
  --compare dense      also train and evaluate the dense baseline
  --sample_data DIR    use an existing sample-data folder
  --no_pictures        skip the PNGs (no matplotlib needed)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from absl import logging

from unimoe_jax import progressive_report as report

MODALITIES = report.MODALITIES
DEFAULT_STEPS = (600, 1000, 100, 400)

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


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_sample_data(directory: str) -> str:
  if os.path.isfile(os.path.join(directory, 'sample_data_info.json')):
    return directory
  tool = os.path.join(_repo_root(), 'tools', 'make_sample_data.py')
  if not os.path.isfile(tool):
    raise SystemExit(
        f'{tool} not found (installed without a checkout?): run '
        'tools/make_sample_data.py from a checkout and pass --sample_data DIR'
    )
  subprocess.run(
      [sys.executable, tool, '--output', directory], check=True, stdout=subprocess.DEVNULL
  )
  return directory


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


def per_question_constant(level: dict) -> float:
  """Accuracy of the best constant answer for each question type: the model sees the question,
  so answering 'one' to every count question and 'red' to every colour question is chance too."""
  categories = level.get('per_category', {})
  total = sum(c.get('num_examples', 0) for c in categories.values())
  if not total:
    return 0.0
  return (
      sum(c['num_examples'] * c.get('best_constant_accuracy', 0.0) for c in categories.values())
      / total
  )


def chance_table(
    results: Dict[str, Dict[str, float]], info: Optional[dict], split: str = 'validation'
) -> List[dict]:
  """One row per evaluation task with an accuracy, exact-match or WER metric: the metric, its
  value, the chance level (from the sample data's info; without one, 0 for accuracy and 1 for
  WER) and the number of examples it rests on."""
  chance = (info or {}).get('splits', {}).get(split, {}).get('chance', {})
  rows = []
  for task, metrics in sorted(results.items()):
    level = chance.get(task.replace('unimoe_sample_', ''), {})
    examples = int(metrics['num_examples']) if 'num_examples' in metrics else '?'
    if 'wer' in metrics:
      rows.append(
          dict(
              task=task,
              metric='WER',
              value=metrics['wer'],
              examples=examples,
              chance=level.get('best_constant_wer', 1.0),
              lower_is_better=True,
          )
      )
    elif 'accuracy' in metrics or 'exact_match' in metrics:
      name = 'accuracy' if 'accuracy' in metrics else 'exact_match'
      levels = [
          level.get('best_constant_accuracy', 0.0),
          level.get('uniform_guess_accuracy', 0.0),
          per_question_constant(level),
      ]
      rows.append(
          dict(
              task=task,
              metric=name,
              value=metrics[name] / 100.0,
              examples=examples,
              chance=max(levels),
              lower_is_better=False,
          )
      )
    else:
      logging.warning(
          'results table: %s has no accuracy, exact_match or wer metric (%s); left ' 'out',
          task,
          sorted(metrics),
      )
  return rows


def routing_by_modality(routing: Dict[str, Dict[str, 'object']]) -> Dict[str, Dict]:
  """{modality: {group: fractions [layers, experts]}}: the counts of the modality's tasks
  summed, then normalised."""
  from unimoe_jax.training import routing_report  # pylint: disable=g-import-not-at-top

  summed: Dict[str, Dict] = {}
  for task, counts in routing.items():
    modality = report.modality_of(task)
    if modality is not None:
      routing_report.add_counts(summed.setdefault(modality, {}), counts)
  return {m: routing_report.fractions(summed[m]) for m in MODALITIES if m in summed}


def write_results(
    work: str, rows, dense_rows, histories, routing, layer_names, pictures: bool, elapsed: float
) -> str:
  """results.md (the tables, the routing fractions and the pictures) and results.json."""
  table = report.format_table(rows, dense_rows)
  by_modality = routing_by_modality(routing) if routing else {}
  lines = [f'# Uni-MoE progressive training: {elapsed:.0f} s', '', table, '']
  experts = ', '.join(f'{e} = {m}' for e, m in enumerate(MODALITIES))
  if by_modality:
    lines += [
        "## Routing (MoE model): fraction of each modality's routing choices per expert",
        '',
        f'Experts by the modality stage 2 trained them on: {experts}.',
        '',
    ]
    for modality, fractions in by_modality.items():
      for group, value in fractions.items():
        lines.append(
            f'- {modality}, {group} tokens: '
            + '; '.join(
                f'{name} ' + ' '.join('-' if x != x else f'{x:.2f}' for x in row)
                for name, row in zip(layer_names, value)
            )
        )
    lines.append('')
  if pictures:
    # The experts in the order stage 2 trained them (experts_lib.assemble_experts).
    files = report.write_pictures(
        work, histories, by_modality, layer_names, rows, dense_rows, expert_names=list(MODALITIES)
    )
    lines += ['## Pictures', ''] + [f'![{title}]({name})' for title, name in files.items()]
  with open(os.path.join(work, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(work, 'results.json'), 'w') as f:
    json.dump(
        {
            'moe': rows,
            'dense': dense_rows,
            'routing': {m: {g: v.tolist() for g, v in fr.items()} for m, fr in by_modality.items()},
        },
        f,
        indent=1,
    )
  return table


def main(argv: Optional[Sequence[str]] = None) -> int:
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top

  argv = sys.argv[1:] if argv is None else list(argv)
  rest, user_bindings = gin_utils.split_gin_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='/tmp/unimoe_progressive')
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--steps', default=','.join(map(str, DEFAULT_STEPS)))
  parser.add_argument('--compare', choices=['dense'], default=None)
  parser.add_argument('--sample_data', default=None)
  parser.add_argument('--no_pictures', action='store_true')
  args = parser.parse_args(rest)
  logging.set_verbosity('info')
  logging.use_absl_handler()
  try:
    steps = [int(s) for s in args.steps.split(',')]
  except ValueError:
    steps = []
  if len(steps) != 4 or min(steps) < 0 or min(steps[1:]) == 0:
    raise SystemExit(
        f'--steps needs four numbers (stages 0-3; only stage 0 may be 0), got ' f'{args.steps}'
    )
  if not args.no_pictures:
    report.check_plotting()  # Before an hour of training, not after.
  started = time.time()
  work = os.path.abspath(args.workdir)
  data = make_sample_data(args.sample_data or os.path.join(work, 'sample_data'))
  os.environ['UNIMOE_SAMPLE_DATA'] = data
  import jax  # pylint: disable=g-import-not-at-top
  # Stages share most programs (the same model's init, the evaluation): compile them once.
  jax.config.update('jax_compilation_cache_dir', os.path.join(work, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  histories = {}

  def bind(stage, steps_, initial=None, **fmt):
    stage_name, files, bindings = stage
    for key, value in fmt.items():  # Not str.format: gin dict literals hold braces.
      stage_name = stage_name.replace('{%s}' % key, value)
      bindings = {k: v.replace('{%s}' % key, value) for k, v in bindings.items()}
    run = {'MODEL_DIR': repr(os.path.join(work, stage_name)), 'TRAIN_STEPS': str(steps_)}
    if initial:
      run['INITIAL_CHECKPOINT_PATH'] = repr(initial)
    result = run_stage(stage_name, files, bindings, args.gin_file, run, user_bindings)
    histories[stage_name] = result['loss_history']
    return result, os.path.join(work, stage_name)

  stage0_dir = bind(STAGE0, steps[0])[1] if steps[0] else None
  _, stage1_dir = bind(STAGE1, steps[1], stage0_dir)
  expert_dirs = [bind(STAGE2, steps[2], stage1_dir, modality=m)[1] for m in MODALITIES]

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
  result, _ = bind(STAGE3, steps[3], assembled)
  dense_result = bind(STAGE3_DENSE, steps[3], stage1_dir)[0] if args.compare == 'dense' else None

  info_path = os.path.join(data, 'sample_data_info.json')
  info = None
  if os.path.isfile(info_path):
    with open(info_path) as f:
      info = json.load(f)
  rows = chance_table(result['eval'], info)
  dense_rows = chance_table(dense_result['eval'], info) if dense_result else None
  routing = result['routing'] or {'layers': [], 'tasks': {}}
  layer_names = [f'layer {i}' for i in routing['layers']]
  table = write_results(
      work,
      rows,
      dense_rows,
      histories,
      routing['tasks'],
      layer_names,
      not args.no_pictures,
      time.time() - started,
  )
  print(
      f'\nUni-MoE progressive training: {time.time() - started:.0f} s '
      f'(results in {os.path.join(work, "results.md")})\n'
  )
  print(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
