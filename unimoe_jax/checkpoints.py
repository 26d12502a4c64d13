"""Model checkpoints on disk: every reader and writer of parameters goes through here.

Two kinds of directory hold parameters:

    a converted / exported checkpoint (what the converters and progressive.py write):
      DIR/params/        orbax PyTree checkpoint of the params tree (no 'params' key, no boxes)
      DIR/config.gin     gin text binding DECODER_CONFIG (and MODEL_CONFIG for multimodal models)
      DIR/tokenizer.model   optional, copied by the converter
    a training run (training/state_checkpoints.py writes it):
      MODEL_DIR/checkpoints/<step>/state/   the whole TrainState; its params are read directly
      MODEL_DIR/config.gin

`read_params` reads the params of either, whatever a user names (a converted checkpoint, a
MODEL_DIR, its checkpoints/ folder or one step): INITIAL_CHECKPOINT_PATH (training/loop.py),
CHECKPOINT_PATH of eval and infer (training/inference.py), --checkpoint of score and generate
(`restore_model`), the converters and tools/assemble_experts.py. `save` writes a converted
checkpoint into a sibling temporary directory and renames it into place, so a failed save
leaves no `DIR` behind.
"""

import dataclasses
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from unimoe_jax import layer_stacking
from unimoe_jax.config import DecoderConfig
from unimoe_jax.network import UniMoEConfig

PARAMS_DIR = 'params'
GIN_FILE = 'config.gin'
TOKENIZER_FILE = 'tokenizer.model'
CHECKPOINTS_DIR = 'checkpoints'  # MODEL_DIR/checkpoints/<step>/...
STATE_ITEM = 'state'  # ... /state: the TrainState


def save(
    directory: str,
    params: Dict[str, Any],
    gin_config_text: str,
    extra_files: Optional[Dict[str, str]] = None,
) -> str:
  """Writes `params` and `gin_config_text` as a new checkpoint directory; returns its path.

  Args:
    directory: must not exist yet.
    params: nested dict of numpy / jax arrays.
    gin_config_text: the gin text to store as `config.gin`.
    extra_files: destination name -> source path of files to copy beside (e.g. the tokenizer).
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f'{directory} already exists; choose a new output directory')
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.partial-', dir=parent)
  try:
    tree = jax.tree_util.tree_map(np.asarray, params)
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(os.path.join(staging, PARAMS_DIR), tree)
    with open(os.path.join(staging, GIN_FILE), 'w') as f:
      f.write(gin_config_text)
    for name, source in (extra_files or {}).items():
      shutil.copyfile(source, os.path.join(staging, name))
    # mkdtemp made the staging directory private (0700); the checkpoint gets the permissions
    # of any directory the user creates (0777 less the umask), so others can read it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    os.rename(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def restore(directory: str) -> Tuple[Dict[str, Any], str]:
  """(params as a nested dict of numpy arrays, gin config text) of a checkpoint directory."""
  directory = os.path.abspath(directory)
  params_path = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(params_path):
    raise FileNotFoundError(f'{directory} is not a unimoe_jax checkpoint (no {PARAMS_DIR}/)')
  params = restore_numpy_tree(params_path)
  with open(os.path.join(directory, GIN_FILE)) as f:
    gin_text = upgrade_gin_text(f.read())
  return params, gin_text


# Gin names renamed since a checkpoint may have been written: (old, new) regular expressions.
# unimoe_jax/model.py became network.py (one-release alias, README): a config.gin of that time
# imports `unimoe_jax.model` and builds `@model.UniMoEConfig()`.
_RENAMED_GIN_NAMES = (
    (r'\bfrom unimoe_jax import model\b', 'from unimoe_jax import network'),
    (r'\bimport unimoe_jax\.model\b', 'import unimoe_jax.network'),
    (r'(?<![\w.])(unimoe_jax\.)?model\.UniMoEConfig\b', 'network.UniMoEConfig'),
)


def upgrade_gin_text(gin_text: str) -> str:
  """A checkpoint's config.gin with the gin names renamed since it was written brought up to
  date, so run directories of an earlier release still load."""
  for old, new in _RENAMED_GIN_NAMES:
    gin_text = re.sub(old, new, gin_text)
  return gin_text


def restore_numpy_tree(path: str) -> Dict[str, Any]:
  """An orbax PyTree checkpoint at `path`, every array as a host numpy array."""
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, restore_args=restore_args)


def tokenizer_path(directory: str) -> Optional[str]:
  path = os.path.join(directory, TOKENIZER_FILE)
  return path if os.path.exists(path) else None


def locate(
    path: Optional[str], macro: str = 'INITIAL_CHECKPOINT_PATH'
) -> Tuple[str, Optional[int]]:
  """The directory `read_params` reads for `path`, and its training step.

  Returns `(converted_dir, None)` for a converted / exported checkpoint (`params/`), or
  `(step_dir, step)` for a training checkpoint: `path` itself when it is one step directory,
  else the latest step of `path/checkpoints` or `path`. Reads no array, so a wrong path fails at
  once; errors name `macro`.
  """
  if not path:
    raise FileNotFoundError(
        f'{macro} is not set: name a converted checkpoint, a MODEL_DIR or '
        'one of its step directories'
    )
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{macro}={path} does not exist')
  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    return path, None
  if os.path.isdir(os.path.join(path, STATE_ITEM)):
    name = os.path.basename(path)
    return path, int(name) if name.isdigit() else None
  root = path
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    root = os.path.join(path, CHECKPOINTS_DIR)
  steps = sorted(
      int(d)
      for d in os.listdir(root)
      if d.isdigit() and os.path.isdir(os.path.join(root, d, STATE_ITEM))
  )
  if not steps:
    raise FileNotFoundError(
        f'{macro}={path} holds no checkpoint: expected params/ + config.gin (a converted or '
        f'exported checkpoint), a MODEL_DIR with {CHECKPOINTS_DIR}/<step>/{STATE_ITEM}, or a '
        f'step directory'
    )
  return os.path.join(root, str(steps[-1])), steps[-1]


def read_params(
    path: str, macro: str = 'INITIAL_CHECKPOINT_PATH'
) -> Tuple[Dict[str, Any], Optional[str]]:
  """Params (numpy) and gin text from any checkpoint a user may name as a starting point.

  Accepts a converted / exported checkpoint (`params/` + `config.gin`, unimoe_jax.checkpoint),
  a training `MODEL_DIR` (its latest step), a `MODEL_DIR/checkpoints` directory, or one step
  directory of it (`locate`). The gin text is None when the directory has none.
  """
  directory, _ = locate(path, macro)
  if os.path.isdir(os.path.join(directory, PARAMS_DIR)):
    return restore(directory)
  gin_text = None
  run_config = os.path.join(directory, '..', '..', 'config.gin')  # MODEL_DIR/config.gin
  if os.path.exists(run_config):
    with open(run_config) as f:
      gin_text = f.read()
  state = restore_numpy_tree(os.path.join(directory, STATE_ITEM))
  return state['params'], gin_text


# ---- what a user names, with errors that name the flag --------------------------------------


def locate_checkpoint(path: str, flag: str = '--checkpoint') -> Tuple[str, Optional[int]]:
  """(directory holding the params, training step or None) of what `flag` names: a converted /
  exported checkpoint (`params/` + `config.gin`), a training MODEL_DIR (its latest step), its
  `checkpoints/` directory or one step directory (`locate`). Errors
  name `flag`: a path that does not exist, is not a directory, or holds no checkpoint."""
  if not path:
    raise FileNotFoundError(
        f'{flag} is empty: name a converted checkpoint or a training ' 'MODEL_DIR'
    )
  if not os.path.exists(path):
    raise FileNotFoundError(f'{flag}={path} does not exist')
  if not os.path.isdir(path):
    raise NotADirectoryError(f'{flag}={path} is not a directory (a checkpoint is a directory)')
  return locate(path, flag)


def _run_dir(directory: str) -> str:
  """MODEL_DIR of a training step directory MODEL_DIR/checkpoints/<step>."""
  return os.path.dirname(os.path.dirname(os.path.abspath(directory)))


def checkpoint_gin_text(path: str, flag: str = '--checkpoint') -> str:
  """The config.gin of the checkpoint `flag` names (MODEL_DIR/config.gin for a training run),
  read without any array."""
  directory, step = locate_checkpoint(path, flag)
  converted = os.path.isdir(os.path.join(directory, PARAMS_DIR))
  gin_path = os.path.join(directory if converted else _run_dir(directory), GIN_FILE)
  if not os.path.exists(gin_path):
    what = 'checkpoint' if converted else f'training run (step {step})'
    raise FileNotFoundError(
        f'{flag}={path}: the {what} has no {gin_path} (the model ' 'configuration it needs)'
    )
  with open(gin_path) as f:
    return upgrade_gin_text(f.read())


def read_checkpoint(path: str, flag: str = '--checkpoint') -> Tuple[Dict[str, Any], str]:
  """(params as numpy, gin text) of a converted checkpoint or a training run (`locate_checkpoint`).
  A training step's params are the TrainState's: no export step is needed."""
  gin_text = checkpoint_gin_text(path, flag)
  params, _ = read_params(path, flag)
  return params, gin_text


def find_vocab(
    path: str,
    vocab_path: Optional[str] = None,
    flag: str = '--checkpoint',
    gin_text: Optional[str] = None,
) -> str:
  """`--vocab` when given (it must exist), else the checkpoint's tokenizer.model: beside the
  params of a converted checkpoint; for a training run in MODEL_DIR or in the converted
  checkpoint its config.gin names as INITIAL_CHECKPOINT_PATH (where training started)."""
  if vocab_path:
    if not os.path.isfile(vocab_path):
      raise FileNotFoundError(f'--vocab={vocab_path} does not exist or is not a file')
    return vocab_path
  directory, _ = locate_checkpoint(path, flag)
  candidates = [directory]
  if not os.path.isdir(os.path.join(directory, PARAMS_DIR)):
    candidates.append(_run_dir(directory))
    # gin.config_str() may break a long value onto the next line after '= \'.
    match = re.search(
        r"^INITIAL_CHECKPOINT_PATH\s*=\s*(?:\\\s*)?['\"]([^'\"]+)['\"]",
        gin_text or '',
        re.MULTILINE,
    )
    if match:
      candidates.append(match.group(1))
  for candidate in candidates:
    found = tokenizer_path(candidate)
    if found:
      return found
  raise FileNotFoundError(
      f'{flag}={path} has no {TOKENIZER_FILE} (looked in ' f'{", ".join(candidates)}); pass --vocab'
  )


# ---- the model a checkpoint builds ----------------------------------------------------------


@gin.configurable('unimoe_score_decoder_config')
def _decoder_config(decoder: DecoderConfig = gin.REQUIRED) -> DecoderConfig:
  return decoder


@gin.configurable('unimoe_score_model_config')
def _model_config(model: UniMoEConfig = gin.REQUIRED) -> UniMoEConfig:
  return model


def decoder_config_from_gin(gin_text: str) -> DecoderConfig:
  """The `DECODER_CONFIG` a checkpoint's config.gin binds.

  Gin's global config is used and cleared afterwards: bindings such as `LoRAConfig` must not
  leak into configs built later in the same process.
  """
  gin.clear_config()
  try:
    gin.parse_config(gin_text + '\nunimoe_score_decoder_config.decoder = %DECODER_CONFIG\n')
    return _decoder_config()  # pylint: disable=no-value-for-parameter
  finally:
    gin.clear_config()


def model_config_from_gin(gin_text: str) -> UniMoEConfig:
  """The `UniMoEConfig` of a checkpoint's config.gin: its `MODEL_CONFIG` when it binds one
  (multimodal checkpoints), else a text-only model around its `DECODER_CONFIG`.

  Like `decoder_config_from_gin`, gin's global config is cleared afterwards.
  """
  gin.clear_config()
  try:
    gin.parse_config(gin_text)
    try:
      gin.query_parameter('%MODEL_CONFIG')
    except ValueError:
      bound = False
    else:
      bound = True
    if bound:
      gin.parse_config('unimoe_score_model_config.model = %MODEL_CONFIG')
      return _model_config()  # pylint: disable=no-value-for-parameter
    gin.parse_config('unimoe_score_decoder_config.decoder = %DECODER_CONFIG')
    return UniMoEConfig(decoder=_decoder_config())  # pylint: disable=no-value-for-parameter
  finally:
    gin.clear_config()


def with_dtype(config: UniMoEConfig, dtype: str) -> UniMoEConfig:
  """`config` computing (and holding weights) in `dtype` everywhere (see `decoder_with_dtype`)."""
  return dataclasses.replace(config, decoder=decoder_with_dtype(config.decoder, dtype))


def decoder_with_dtype(decoder: DecoderConfig, dtype: str) -> DecoderConfig:
  """`decoder` computing and holding weights in `dtype`.

  A router that ran in the model's compute dtype (`MoEConfig.router_dtype` equal to the
  decoder's `dtype`: the official 4-expert gate is a model-dtype Linear) follows it; a router
  pinned to another dtype (float32: ours, and the official 8e gate) keeps it.
  """
  moe = decoder.moe
  if moe is not None and jnp.dtype(moe.router_dtype) == jnp.dtype(decoder.dtype):
    moe = dataclasses.replace(moe, router_dtype=dtype)
  return dataclasses.replace(decoder, dtype=dtype, param_dtype=dtype, moe=moe)


def restore_model(
    checkpoint_dir: str, dtype: str = 'float32'
) -> Tuple[UniMoEConfig, Dict[str, Any]]:
  """(model config, params as jax arrays in `dtype`) of a checkpoint directory; a text-only
  checkpoint's params (decoder only, with or without the 'decoder' level) come back as
  `{'decoder': ...}`, the tree `UniMoE(config)` expects. `checkpoint_dir` may be a training run
  (`read_checkpoint`)."""
  params, gin_text = read_checkpoint(checkpoint_dir)
  cfg = with_dtype(model_config_from_gin(gin_text), dtype)
  if 'decoder' not in params:
    params = {'decoder': params}
  params = layer_stacking.to_config_layout(params, cfg.decoder)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, cfg.decoder.weight_dtype), params)
  return cfg, params
