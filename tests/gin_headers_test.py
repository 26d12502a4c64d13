"""The example commands in the headers of gin/runs/{train,eval,infer}.gin are right as written.

Issue 21: the headers' commands failed as written (infer's named a text-only model and only
image lengths for a mixture that carries four modalities). Each command is read from its
header, parsed as its CLI would parse it, and its model is built: every modality the model has
an encoder for is fed by TASK_FEATURE_LENGTHS and none beyond, and eval / infer read the
checkpoint that train's command writes. (Running them is what train_cli_test and
eval_infer_test do on their own flags.)
"""

import os
import shlex

import gin
import pytest

import tiny_tasks
import unimoe_jax
from unimoe_jax import gin_utils
from unimoe_jax.data import feature_converter

HEADERS = {'train': 'runs/train.gin', 'eval': 'runs/eval.gin', 'infer': 'runs/infer.gin'}


def header_command(gin_file):
  """(module, argv) of the `python -m unimoe_jax.X ...` command in a gin file's header."""
  path = next(
      os.path.join(d, gin_file)
      for d in unimoe_jax.gin_search_paths()
      if os.path.isfile(os.path.join(d, gin_file))
  )
  with open(path) as f:
    header = [line[1:].strip() for line in f if line.startswith('#')]
  start = next(i for i, line in enumerate(header) if line.startswith('python -m unimoe_jax.'))
  parts = []
  for line in header[start:]:
    parts.append(line.rstrip('\\').strip())
    if not line.endswith('\\'):
      break
  words = shlex.split(' '.join(parts))
  return words[2], words[3:]


def parsed_command(gin_file):
  """The header's macros and model, parsed as the CLI parses its flags."""
  module, argv = header_command(gin_file)
  try:
    tiny_tasks.parse_cli_gin(argv, module)
    macros = {
        name: gin_utils._macro_value(name)
        for name in (  # pylint: disable=protected-access
            'MODEL_DIR',
            'CHECKPOINT_PATH',
            'TASK_FEATURE_LENGTHS',
            'MIXTURE_OR_TASK_NAME',
        )
    }
    model = gin.query_parameter('MODEL/macro.value').scoped_configurable_fn()
  finally:
    gin.clear_config()
  return module, macros, model


@pytest.mark.parametrize('cli', sorted(HEADERS))
def test_header_command_parses_and_feeds_each_tower_of_its_model(cli):
  module, macros, model = parsed_command(HEADERS[cli])
  assert module == f'unimoe_jax.{cli}'
  lengths = macros['TASK_FEATURE_LENGTHS']
  feature_converter.check_model_takes_media(model, lengths)  # No media without an encoder.
  fed = {m for m in feature_converter.ITEM_RANK if lengths.get(f'{m}_features')}
  assert fed == set(model.config.modalities), (fed, model.config.modalities)
  assert macros['MIXTURE_OR_TASK_NAME']
  if cli != 'train':  # Reads what train's header command writes.
    _, train_macros, _ = parsed_command(HEADERS['train'])
    assert macros['CHECKPOINT_PATH'] == train_macros['MODEL_DIR']
