"""unimoe-jax: Uni-MoE (unified multimodal LLM with mixture of experts) in JAX/Flax."""

import importlib.resources
import os

__version__ = '0.1.0'


def gin_search_paths():
  """Directories holding the project's gin files, checkout first, installed package second.

  Pass them to `gin.add_config_file_search_path` (the training binaries do) so that
  `include 'models/tiny.gin'` works both from a checkout and from an installed package.
  """
  paths = []
  checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gin')
  if os.path.isdir(checkout):
    paths.append(checkout)
  try:
    installed = str(importlib.resources.files('unimoe_jax.gin_files'))
    if os.path.isdir(installed) and installed not in paths:
      paths.append(installed)
  except ModuleNotFoundError:
    pass
  return paths
