"""Stage 2 -> 3: tools/assemble_experts.py and convert/experts.py."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from unimoe_jax import checkpoint
from unimoe_jax import config
from unimoe_jax.convert import experts as experts_lib
from unimoe_jax.decoder import Decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(seed, moe=None):
  cfg = config.named('tiny', moe=moe)
  variables = Decoder(cfg).init(jax.random.PRNGKey(seed), np.zeros((1, 4), np.int32))
  import flax.linen as nn
  return {'decoder': jax.tree_util.tree_map(np.asarray, nn.meta.unbox(variables['params']))}


def test_experts_are_the_stage2_ffns_and_the_rest_is_base():
  base, e0, e1 = _params(0), _params(1), _params(2)
  out = experts_lib.assemble_experts(base, [e0, e1, base], ['e0', 'e1', 'base'])
  moe_tree = _params(0, moe=config.MoEConfig(num_experts=3, num_experts_per_tok=2))
  want = {k for k in traverse_util.flatten_dict(moe_tree) if k[-1] != 'router'}
  assert set(traverse_util.flatten_dict(out)) == want  # Same names as the MoE model, no router.
  for layer in ('layers_0', 'layers_1'):
    for kernel in ('wi_0', 'wi_1', 'wo'):
      got = out['decoder'][layer]['moe'][kernel]['kernel']
      for e, src in enumerate((e0, e1, base)):
        np.testing.assert_array_equal(got[e], src['decoder'][layer]['mlp'][kernel]['kernel'])
  np.testing.assert_array_equal(out['decoder']['layers_0']['attention']['query']['kernel'],
                                base['decoder']['layers_0']['attention']['query']['kernel'])
  assert not np.array_equal(out['decoder']['layers_0']['attention']['query']['kernel'],
                            e0['decoder']['layers_0']['attention']['query']['kernel'])


def test_missing_or_misshapen_ffn_is_named():
  base, e0 = _params(0), _params(1)
  del e0['decoder']['layers_1']['mlp']['wo']
  with pytest.raises(ValueError, match='speech: missing decoder/layers_1/mlp/wo/kernel'):
    experts_lib.assemble_experts(base, [e0], ['speech'])
  e1 = _params(1)
  e1['decoder']['layers_0']['mlp']['wi_0']['kernel'] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match='image: decoder/layers_0/mlp/wi_0/kernel has shape'):
    experts_lib.assemble_experts(base, [e1], ['image'])


def test_tool_writes_a_checkpoint(tmp_path):
  base, e0 = _params(0), _params(1)
  checkpoint.save(str(tmp_path / 'base'), base, '# base\n')
  checkpoint.save(str(tmp_path / 'e0'), e0, '# e0\n')
  subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'assemble_experts.py'),
                  '--base', str(tmp_path / 'base'), '--expert', str(tmp_path / 'e0'),
                  '--expert', 'base', '--output', str(tmp_path / 'out')], check=True,
                 capture_output=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  params, gin_text = checkpoint.restore(str(tmp_path / 'out'))
  got = params['decoder']['layers_1']['moe']['wo']['kernel']
  assert got.shape[0] == 2
  np.testing.assert_array_equal(got[0], e0['decoder']['layers_1']['mlp']['wo']['kernel'])
  np.testing.assert_array_equal(got[1], base['decoder']['layers_1']['mlp']['wo']['kernel'])
  assert 'experts' in gin_text
