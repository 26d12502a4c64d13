"""unimoe-jax: Uni-MoE (unified multimodal LLM with mixture of experts) in JAX/Flax."""

import os

__version__ = '0.1.0'

# TensorFlow, where a process uses it (the seqio input pipeline), runs on the CPU only: left to
# itself it would take the accelerators' memory from JAX, and on a host whose CUDA driver is
# absent or broken it logs an ERROR-level "failed call to cuInit" on every run. Read by
# TensorFlow when it is imported, so it is set here, before any module of this package imports
# it; a value the user set is kept.
os.environ.setdefault('TF_ENABLED_DEVICE_TYPES', 'CPU')


def gin_search_paths():
  """Directories holding the project's gin files: the checkout's `gin/`, else the installed copy.

  Pass them to `gin.add_config_file_search_path` (the training binaries do) so that
  `include 'models/tiny.gin'` works both from a checkout and from an installed package, where
  setup.cfg puts `gin/` at `unimoe_jax/gin_files/`.
  """
  here = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(here)
  paths = []
  if os.path.isfile(os.path.join(root, 'setup.cfg')) and os.path.isdir(os.path.join(root, 'gin')):
    paths.append(os.path.join(root, 'gin'))
  installed = os.path.join(here, 'gin_files')
  if os.path.isdir(installed):
    paths.append(installed)
  return paths
