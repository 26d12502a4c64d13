r"""`python -m unimoe_jax.progressive`: the three Uni-MoE stages and the evaluation, end to end.

With no arguments it writes the embedded sample data (`unimoe_jax.sample_data`, what
tools/make_sample_data.py writes) and trains the tiny multimodal model on a CPU, nothing
downloaded:

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
import sys
import time
from typing import Optional, Sequence

from absl import logging

from unimoe_jax import progressive_report as report
from unimoe_jax.training import progressive_stages

DEFAULT_STEPS = (600, 1000, 100, 400)


def make_sample_data(directory: str) -> str:
  """`directory`, after writing the sample data and its tokenizer there unless it holds them."""
  if not os.path.isfile(os.path.join(directory, 'sample_data_info.json')):
    from unimoe_jax import sample_data  # pylint: disable=g-import-not-at-top

    sample_data.make_sample_data(directory)
    sample_data.train_tokenizer(directory)
  return directory


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
  result, dense_result, histories = progressive_stages.run_all(
      work, steps, args.gin_file, user_bindings, compare_dense=args.compare == 'dense'
  )

  info_path = os.path.join(data, 'sample_data_info.json')
  info = None
  if os.path.isfile(info_path):
    with open(info_path) as f:
      info = json.load(f)
  rows = report.chance_table(result['eval'], info)
  dense_rows = report.chance_table(dense_result['eval'], info) if dense_result else None
  routing = result['routing'] or {'layers': [], 'tasks': {}}
  layer_names = [f'layer {i}' for i in routing['layers']]
  table = report.write_results(
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
