r"""`python -m unimoe_jax.infer`: a checkpoint's predictions (or scores) as JSONL (t5x's infer.py).

    python -m unimoe_jax.infer \
      --gin_file=models/tiny.gin --gin_file=runs/infer.gin \
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.INFER_OUTPUT_DIR="'/tmp/run/infer'" \
      --gin.MIXTURE_OR_TASK_NAME="'unimoe_sample_eval'" \
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128, 'image_features': 1}" \
      [--gin.infer.mode="'score'"]

Flags as `unimoe_jax.train`. Writes `INFER_OUTPUT_DIR/<task>-<step>.jsonl`, one line per
example with `inputs`, `targets` and `prediction` (or `score`) (training/inference.py).
"""

import sys
from typing import Optional, Sequence

from absl import logging

from unimoe_jax import train


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  train.setup(
      argv,
      "Write a unimoe_jax checkpoint's predictions on a seqio mixture as JSONL "
      '(t5x-style gin flags).',
  )
  from unimoe_jax.training import inference  # pylint: disable=g-import-not-at-top

  paths = inference.infer()  # pylint: disable=no-value-for-parameter
  for task, path in paths.items():
    logging.info('%s: wrote %s', task, path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
