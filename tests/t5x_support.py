"""Tests that need t5x: skipped where it is not installed (CI), failures where it must be.

t5x is not on PyPI; tools/t5x_env.sh builds an environment with it and runs these tests with
UNIMOE_REQUIRE_T5X=1, under which a missing t5x fails the test instead of skipping it.
"""

import importlib.util
import os

import pytest


def require_t5x() -> None:
  if importlib.util.find_spec('t5x') is not None:
    return
  message = 't5x is not installed (bash tools/t5x_env.sh builds an environment with it)'
  if os.environ.get('UNIMOE_REQUIRE_T5X') == '1':
    pytest.fail(message + ', and UNIMOE_REQUIRE_T5X=1')
  pytest.skip(message)
