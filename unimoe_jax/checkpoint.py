"""A converted model on disk: an orbax params tree plus the gin config that builds the model.

Layout of a checkpoint directory (what `INITIAL_CHECKPOINT_PATH` points at):

    DIR/params/        orbax PyTree checkpoint of the params tree (no 'params' key, no boxes)
    DIR/config.gin     gin text binding DECODER_CONFIG (and MODEL_CONFIG for multimodal models)
    DIR/tokenizer.model   optional, copied by the converter

`save` writes everything into a sibling temporary directory and renames it into place, so a
failed save leaves no `DIR` behind.
"""

import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

PARAMS_DIR = 'params'
GIN_FILE = 'config.gin'
TOKENIZER_FILE = 'tokenizer.model'


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
    gin_text = f.read()
  return params, gin_text


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
