r"""`python -m unimoe_jax.train`: one training run configured by gin, with t5x's flags.

    python -m unimoe_jax.train \
      --gin_file=models/tiny.gin --gin_file=runs/train.gin \
      --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=200 \
      --gin.MIXTURE_OR_TASK_NAME="'my_task'" --gin.TASK_FEATURE_LENGTHS="{'targets': 512}" \
      [--gin_search_paths=DIR,...] [--gin_bindings='NAME = VALUE' ...]

(gin/runs/train.gin's header runs the same on the sample data, with media; gin/stages/ holds
the three stages of Uni-MoE.)

`--gin_file` repeats and is resolved against `--gin_search_paths`, the checkout's `gin/` and the
installed `unimoe_jax/gin_files/`. `--gin.NAME=VALUE` is a binding (`NAME = VALUE`), applied
after the files, in order. Every name is checked before any computation starts.

Multi-host (a TPU pod slice initialises itself; GPU / CPU clusters name the coordinator):
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` call
`jax.distributed.initialize`; `--cpu_collectives=gloo` lets CPU devices of several processes
talk (tests use it).
"""

import argparse
import sys
from typing import Optional, Sequence

from absl import logging

# The files of the hint when no --gin_file is given; a test checks that they exist.
EXAMPLE_GIN_FILES = '--gin_file=models/tiny.gin --gin_file=runs/train.gin'


def parse_flags(argv: Sequence[str], description: str):
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top

  rest, gin_bindings = gin_utils.split_gin_args(argv)
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument(
      '--gin_file', action='append', default=[], help='gin file to parse (repeatable)'
  )
  parser.add_argument(
      '--gin_bindings',
      action='append',
      default=[],
      help="a gin binding 'NAME = VALUE' (repeatable)",
  )
  parser.add_argument(
      '--gin_search_paths',
      default='',
      help='comma-separated directories to resolve gin files and includes',
  )
  parser.add_argument('--coordinator_address', default=None)
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument(
      '--cpu_collectives',
      default=None,
      choices=(None, 'gloo', 'mpi'),
      help='CPU collectives for multi-process CPU runs',
  )
  parser.add_argument('--multiprocess_gpu', action='store_true')
  parser.add_argument('--log_level', default='info')
  args = parser.parse_args(rest)
  args.gin_bindings = list(args.gin_bindings) + gin_bindings
  args.gin_search_paths = [p for p in args.gin_search_paths.split(',') if p]
  return args


def initialize_runtime(args) -> None:
  """`jax.distributed` before any other jax call, when the flags (or a TPU pod) ask for it."""
  import jax  # pylint: disable=g-import-not-at-top

  if args.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', args.cpu_collectives)
  if args.coordinator_address or args.num_processes:
    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )


def parse_gin(args: argparse.Namespace) -> None:
  """Parses the flags' gin files and bindings (`parse_flags`), importing the task modules the
  bindings name (MIXTURE_OR_TASK_MODULE)."""
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top

  gin_utils.parse(
      args.gin_file,
      args.gin_bindings,
      args.gin_search_paths,
      import_modules=gin_utils.task_modules(args.gin_bindings),
  )


def setup(argv: Sequence[str], description: str):
  args = parse_flags(argv, description)
  logging.set_verbosity(args.log_level)
  logging.use_absl_handler()
  initialize_runtime(args)
  if not args.gin_file:
    raise SystemExit(
        f'--gin_file is required: {EXAMPLE_GIN_FILES}, for example (a model, then '
        "a run or a stage of gin/stages/; gin/runs/train.gin's header has a whole "
        'command)'
    )
  parse_gin(args)
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  setup(argv, 'Train a unimoe_jax model (t5x-style gin flags).')
  from unimoe_jax.training import interrupts  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import loop  # pylint: disable=g-import-not-at-top

  try:
    result = loop.train()  # pylint: disable=no-value-for-parameter
  except interrupts.TrainingInterrupted as stopped:
    logging.warning('%s', stopped)
    return stopped.exit_code  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them.
  logging.info('finished at step %d', result['step'])
  return 0


if __name__ == '__main__':
  sys.exit(main())
