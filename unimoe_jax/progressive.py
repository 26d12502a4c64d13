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
     (gin/stages/stage3_unimoe.gin), then the sample evaluation mixture.

It ends with a table of each evaluation task's metric next to the task's chance level (from the
data's own sample_data_info.json). Flags:

  --workdir DIR        where data, checkpoints and logs go (default /tmp/unimoe_progressive)
  --gin_file F         extra gin files for every stage (after the stage's own)
  --gin.NAME=VALUE     extra bindings for every stage, e.g. --gin.BATCH_SIZE=16
  --steps S0,S1,S2,S3  training steps of the four stages
  --sample_data DIR    use an existing sample-data folder
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from absl import logging

MODALITIES = ('image', 'video', 'speech', 'audio')
DEFAULT_STEPS = (1200, 1600, 100, 400)
EVAL_MIXTURE = 'unimoe_sample_eval'

MODEL_FILES = ('models/tiny.gin', 'models/multimodal_tiny.gin')

# The stages as a table: name, gin files, bindings (steps and paths are added per run).
STAGE0 = ('stage0_text', [*MODEL_FILES, 'runs/train.gin', 'demo/tiny.gin'], {
    'MIXTURE_OR_TASK_NAME': "'unimoe_sample_text_warmup'",
    'TASK_FEATURE_LENGTHS': "{'targets': 128}",   # text only: media are not fed
    'TRAINABLE_PATTERNS': "('decoder/.*',)",
    'LEARNING_RATE': '3e-3',
    'BATCH_SIZE': '32',
})
STAGE1 = ('stage1_align', [*MODEL_FILES, 'stages/stage1_align.gin', 'demo/tiny.gin'], {
    'MIXTURE_OR_TASK_NAME': "'unimoe_sample_stage1'",
    'LEARNING_RATE': '5e-3',
})
STAGE2 = ('stage2_{modality}', [*MODEL_FILES, 'stages/stage2_expert.gin', 'demo/tiny.gin'], {
    'EXPERT_MODALITY': "'{modality}'",
    'LEARNING_RATE': '3e-3',
})
STAGE3 = ('stage3_unimoe', [*MODEL_FILES, 'stages/stage3_unimoe.gin', 'demo/tiny.gin'], {
    'MIXTURE_OR_TASK_NAME': "'unimoe_sample_stage3'",
    'LEARNING_RATE': '3e-3',
    'EVAL_MIXTURE_OR_TASK_NAME': f"'{EVAL_MIXTURE}'",
    'EVAL_TASK_FEATURE_LENGTHS': "{'targets': 128, 'image_features': 1, 'video_features': 1, "
                                 "'speech_features': 1, 'audio_features': 1}",
    'EVAL_BATCH_SIZE': '32',
})


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_sample_data(directory: str) -> str:
  if os.path.isfile(os.path.join(directory, 'sample_data_info.json')):
    return directory
  tool = os.path.join(_repo_root(), 'tools', 'make_sample_data.py')
  if not os.path.isfile(tool):
    raise SystemExit(f'{tool} not found (installed without a checkout?): run '
                     'tools/make_sample_data.py from a checkout and pass --sample_data DIR')
  subprocess.run([sys.executable, tool, '--output', directory], check=True,
                 stdout=subprocess.DEVNULL)
  return directory


def run_stage(name: str, gin_files: Sequence[str], bindings: Dict[str, str],
              extra_files: Sequence[str], extra_bindings: Sequence[str]):
  """One training run in this process (gin is cleared before and after)."""
  import gin  # pylint: disable=g-import-not-at-top
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import loop  # pylint: disable=g-import-not-at-top
  started = time.time()
  logging.info('=== %s ===', name)
  gin.clear_config()
  try:
    gin_utils.parse(list(gin_files) + list(extra_files),
                    [f'{k} = {v}' for k, v in bindings.items()] + list(extra_bindings),
                    import_modules=('unimoe_jax.tasks',))
    result = loop.train()  # pylint: disable=no-value-for-parameter
  finally:
    gin.clear_config()
  logging.info('=== %s done in %.0f s: %s', name, time.time() - started,
               {k: round(v, 4) for k, v in result['train'].items() if k in ('loss', 'accuracy')})
  return result


def per_question_constant(level: dict) -> float:
  """Accuracy of the best constant answer for each question type: the model sees the question,
  so answering 'one' to every count question and 'red' to every colour question is chance too."""
  categories = level.get('per_category', {})
  total = sum(c.get('num_examples', 0) for c in categories.values())
  if not total:
    return 0.0
  return sum(c['num_examples'] * c.get('best_constant_accuracy', 0.0)
             for c in categories.values()) / total


def chance_table(results: Dict[str, Dict[str, float]], info: dict, split: str = 'validation'
                 ) -> List[dict]:
  """One row per evaluation task: metric, value, chance level, and whether it beats chance."""
  chance = info['splits'][split]['chance']
  rows = []
  for task, metrics in sorted(results.items()):
    key = task.replace('unimoe_sample_', '')
    level = chance.get(key, {})
    if 'wer' in metrics:
      rows.append(dict(task=task, metric='WER', value=metrics['wer'],
                       chance=level.get('best_constant_wer', 1.0), lower_is_better=True))
    else:
      name = 'accuracy' if 'accuracy' in metrics else 'exact_match'
      levels = [level.get('best_constant_accuracy', 0.0), level.get('uniform_guess_accuracy', 0.0),
                per_question_constant(level)]
      rows.append(dict(task=task, metric=name, value=metrics[name] / 100.0,
                       chance=max(levels), lower_is_better=False))
  return rows


def format_table(rows: List[dict]) -> str:
  lines = ['| task | metric | stage-3 model | chance | beats chance (margin 0.10) |',
           '|---|---|---|---|---|']
  for r in rows:
    better = (r['value'] <= r['chance'] - 0.10 if r['lower_is_better']
              else r['value'] >= r['chance'] + 0.10)
    lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.3f} | {r['chance']:.3f} | "
                 f"{'yes' if better else 'NO'} |")
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, extra_bindings = gin_utils.split_gin_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='/tmp/unimoe_progressive')
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--steps', default=','.join(map(str, DEFAULT_STEPS)))
  parser.add_argument('--sample_data', default=None)
  args = parser.parse_args(rest)
  logging.set_verbosity('info')
  logging.use_absl_handler()
  steps = [int(s) for s in args.steps.split(',')]
  if len(steps) != 4:
    raise SystemExit(f'--steps needs four numbers (stages 0-3), got {args.steps}')
  started = time.time()
  work = os.path.abspath(args.workdir)
  data = make_sample_data(args.sample_data or os.path.join(work, 'sample_data'))
  os.environ['UNIMOE_SAMPLE_DATA'] = data
  import jax  # pylint: disable=g-import-not-at-top
  # Stages share most programs (the same model's init, the evaluation): compile them once.
  jax.config.update('jax_compilation_cache_dir', os.path.join(work, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

  def bind(stage, name, steps_, initial=None, **fmt):
    stage_name, files, bindings = stage
    for key, value in fmt.items():  # Not str.format: gin dict literals hold braces.
      stage_name = stage_name.replace('{%s}' % key, value)
      bindings = {k: v.replace('{%s}' % key, value) for k, v in bindings.items()}
    b = dict(bindings)
    b.update(MODEL_DIR=repr(os.path.join(work, stage_name)), TRAIN_STEPS=str(steps_),
             INITIAL_CHECKPOINT_PATH=repr(initial) if initial else 'None')
    return run_stage(stage_name, files, b, args.gin_file, extra_bindings), os.path.join(
        work, stage_name)

  _, stage0_dir = bind(STAGE0, 'stage0', steps[0])
  _, stage1_dir = bind(STAGE1, 'stage1', steps[1], stage0_dir)
  expert_dirs = [bind(STAGE2, 'stage2', steps[2], stage1_dir, modality=m)[1] for m in MODALITIES]

  from unimoe_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from unimoe_jax.convert import experts as experts_lib  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  assembled = os.path.join(work, 'stage3_init')
  if not os.path.exists(assembled):
    base, _ = checkpoints.read_params(stage1_dir)
    trees = [checkpoints.read_params(d)[0] for d in expert_dirs]
    checkpoint.save(assembled, experts_lib.assemble_experts(base, trees, expert_dirs),
                    '# experts: ' + ', '.join(expert_dirs) + '\n')
  result, _ = bind(STAGE3, 'stage3', steps[3], assembled)

  with open(os.path.join(data, 'sample_data_info.json')) as f:
    info = json.load(f)
  rows = chance_table(result['eval'], info)
  table = format_table(rows)
  with open(os.path.join(work, 'results.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(work, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  print(f'\nUni-MoE progressive training on the sample data: {time.time() - started:.0f} s\n')
  print(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
