"""Test set-up: 8 host devices for the sharding tests, set before JAX initialises, and one
compilation cache for the whole test session."""

import os
import shutil
import tempfile

# Must run before jax creates its CPU client; conftest is imported before any test module.
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests check numbers, not speed, and most of their time is XLA:CPU compiling tiny
# programs: LLVM's optimisation passes took ~40% of it (2 compile-bound tests: 53.6 s at the
# default level, 32.9 s at 0, on a 2-core host). Level 0 keeps IEEE semantics (XLA:CPU does not
# enable fast math either way). Benchmarks (tools/) run at the default level.
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'

# jax's persistent compilation cache, fresh for each session and shared through the
# environment by the xdist workers (started after this runs in the controller) and by the
# subprocesses the tests start: the same tiny programs are compiled again and again (a killed
# and resumed run compiles one training step four times), and a cache hit returns the
# executable XLA built for the same program. Compiles under 0.5 s are not worth a file.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='unimoe_jax_test_jit_cache_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


def pytest_unconfigure(config):
  """The session's controller removes the cache it made (workers leave it to the controller)."""
  if _OWN_CACHE and not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Slow tests first (stable order otherwise): the xdist workers then finish together instead
  of one running a late 60 s test while the other idles (`--dist worksteal` in setup.cfg
  rebalances the rest)."""
  del config
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)
