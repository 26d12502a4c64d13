r"""Assembles stage-2 modality experts into the MoE checkpoint stage 3 starts from.

    python tools/assemble_experts.py --base /runs/stage1 \
        --expert /runs/stage2_image --expert /runs/stage2_video \
        --expert /runs/stage2_speech --expert /runs/stage2_audio --output /runs/stage3_init

Each `--expert` (in expert order) is a stage-2 MODEL_DIR (its latest checkpoint), a step
directory, or an exported checkpoint; `--expert base` uses the base model's dense FFN. The
output is a checkpoint directory (params + config.gin) for INITIAL_CHECKPOINT_PATH; the router
and LoRA weights are absent and are initialised by stage 3. Nothing is written on an error.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unimoe_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from unimoe_jax.convert import experts as experts_lib  # pylint: disable=wrong-import-position
from unimoe_jax.training import checkpoints  # pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--base', required=True, help='stage-1 MODEL_DIR or checkpoint')
  parser.add_argument('--expert', action='append', required=True,
                      help="stage-2 MODEL_DIR or checkpoint per expert, or 'base' (repeat)")
  parser.add_argument('--output', required=True, help='new checkpoint directory')
  args = parser.parse_args(argv)
  base, _ = checkpoints.read_params(args.base)
  trees = [base if e == 'base' else checkpoints.read_params(e)[0] for e in args.expert]
  params = experts_lib.assemble_experts(base, trees, args.expert)
  gin_text = ('# Assembled by tools/assemble_experts.py: experts (in order) from\n' +
              ''.join(f'#   {e}\n' for e in args.expert) +
              f'# base: {args.base}\n# Use with a MoE model of {len(args.expert)} experts.\n')
  checkpoint.save(args.output, params, gin_text)
  print(f'wrote {args.output}: {len(args.expert)} experts')
  return 0


if __name__ == '__main__':
  sys.exit(main())
