"""Test set-up: 8 host devices for the sharding tests, set before JAX initialises."""

import os

# Must run before jax creates its CPU client; conftest is imported before any test module.
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
