r"""Assembles stage-2 modality experts into the MoE checkpoint stage 3 starts from.

    python tools/assemble_experts.py --base /runs/stage1 \
        --expert /runs/stage2_image --expert /runs/stage2_video \
        --expert /runs/stage2_speech --expert /runs/stage2_audio --output /runs/stage3_init

    # The official 8-expert start (Uni_MoE_8e train.py): experts from the expert set
    # (8e-Experts, the official --mlp_dir) in the official order, MoE on the even layers.
    python tools/assemble_experts.py --base /ckpt/speech-base-converted \
        --expert_set /ckpt/Uni-MoE-8e-Experts --moe_layers even --output /runs/stage3_8e_init

Each `--expert` (in expert order; repeats allowed) is a stage-2 MODEL_DIR (its latest
checkpoint), a step directory, an exported checkpoint, an official expert FFN file (`.bin` /
`.safetensors` with `model.layers.{i}.mlp.{gate,up,down}_proj.weight`), or `base` for the base
model's dense FFN. `--expert_set DIR` appends the files `--expert_files` names (default the
official order: mlp_audiocap, mlp_basev, mlp_base, mlp_base1, mlp_base4, mlp_base7, mlp_base,
mlp_base7; `.bin` added). `--moe_layers` selects the MoE layers (all, even, odd, or
comma-separated indices); the others keep the base's dense FFN. The output is a checkpoint
directory (params + config.gin) for INITIAL_CHECKPOINT_PATH; the router and LoRA weights are
absent and are initialised by stage 3. Nothing is written on an error.
"""

import argparse
import os
import sys

from unimoe_jax import checkpoints
from unimoe_jax.convert import experts as experts_lib

_FILE_SUFFIXES = ('.bin', '.pt', '.pth', '.safetensors')


def _layers_arg(text: str):
  if text in ('all', 'even', 'odd'):
    return text
  return tuple(int(i) for i in text.split(','))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--base', required=True, help='stage-1 MODEL_DIR or checkpoint')
  parser.add_argument(
      '--expert',
      action='append',
      default=[],
      help="stage-2 MODEL_DIR or checkpoint, official FFN file, or 'base' "
      '(repeat, in expert order)',
  )
  parser.add_argument(
      '--expert_set',
      default=None,
      help='directory of official expert FFN files (8e-Experts), appended '
      'after any --expert in --expert_files order',
  )
  parser.add_argument(
      '--expert_files',
      default=','.join(experts_lib.OFFICIAL_EXPERT_SET),
      help='comma-separated files of --expert_set, in expert order',
  )
  parser.add_argument(
      '--moe_layers',
      default='all',
      type=_layers_arg,
      help='layers that become MoE: all, even, odd or i,j,...',
  )
  parser.add_argument('--output', required=True, help='new checkpoint directory')
  args = parser.parse_args(argv)
  sources = list(args.expert)
  if args.expert_set:
    for stem in args.expert_files.split(','):
      sources.append(
          os.path.join(args.expert_set, stem if stem.endswith(_FILE_SUFFIXES) else stem + '.bin')
      )
  if not sources:
    parser.error('give --expert (repeatable) or --expert_set')
  base, _ = checkpoints.read_params(args.base)
  read = {}  # Each distinct source once, however often it is listed.
  for source in sources:
    if source in read or source == 'base':
      continue
    if source.endswith(_FILE_SUFFIXES):
      read[source] = experts_lib.read_official_ffns(source)
    else:
      read[source] = checkpoints.read_params(source)[0]
  trees = [base if s == 'base' else read[s] for s in sources]
  params = experts_lib.assemble_experts(base, trees, sources, layers=args.moe_layers)
  gin_text = (
      '# Assembled by tools/assemble_experts.py: experts (in order) from\n'
      + ''.join(f'#   {e}\n' for e in sources)
      + f'# base: {args.base}\n# MoE layers: {args.moe_layers}\n'
      f'# Use with a MoE model of {len(sources)} experts '
      f'(MoEConfig.layers = {args.moe_layers!r}).\n'
  )
  checkpoints.save(args.output, params, gin_text)
  print(f'wrote {args.output}: {len(sources)} experts on layers {args.moe_layers}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
