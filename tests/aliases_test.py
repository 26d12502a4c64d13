"""The one-release aliases of renamed modules: importing one warns and gives the new module's
objects (README's table of rooms names each rename)."""

import importlib
import sys

import pytest

ALIASES = [
    ('unimoe_jax.model', 'unimoe_jax.network', ('UniMoE', 'UniMoEConfig', 'check_placeholders')),
    ('unimoe_jax.layers.transformer', 'unimoe_jax.layers.encoder_blocks', ('PreLNEncoderLayer',)),
    ('unimoe_jax.prompting', 'unimoe_jax.serving.prompting', ('build_prompt', 'PromptTokenizer')),
]


@pytest.mark.parametrize('old,new,names', ALIASES)
def test_alias_warns_and_gives_the_new_objects(old, new, names):
  sys.modules.pop(old, None)
  with pytest.warns(DeprecationWarning, match=new.split('.')[-1]):
    alias = importlib.import_module(old)
  target = importlib.import_module(new)
  for name in names:
    assert getattr(alias, name) is getattr(target, name), name
