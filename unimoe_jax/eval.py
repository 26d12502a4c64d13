r"""`python -m unimoe_jax.eval`: a checkpoint's seqio metrics on a mixture (t5x's eval.py).

    python -m unimoe_jax.eval \
      --gin_file=models/tiny.gin --gin_file=runs/eval.gin \
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.EVAL_OUTPUT_DIR="'/tmp/run/eval'" \
      --gin.MIXTURE_OR_TASK_NAME="'unimoe_sample_eval'" \
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128, 'image_features': 1}"

Flags as `unimoe_jax.train` (gin files, `--gin.NAME=VALUE`, multi-host). Writes
`EVAL_OUTPUT_DIR/metrics-<step>.json` and TensorBoard events (training/inference.py).
"""

import sys
from typing import Optional, Sequence

from absl import logging

from unimoe_jax import train


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  train.setup(argv, 'Evaluate a unimoe_jax checkpoint on a seqio mixture (t5x-style gin flags).')
  from unimoe_jax.training import inference  # pylint: disable=g-import-not-at-top

  results = inference.evaluate()  # pylint: disable=no-value-for-parameter
  logging.info('evaluated %d tasks', len(results))
  return 0


if __name__ == '__main__':
  sys.exit(main())
