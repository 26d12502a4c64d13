"""Tiny random models for the tests: weights drawn in the shapes of a module's parameters."""

import flax.linen as nn
import jax
import numpy as np


def random_params(module: nn.Module, *inputs, scale: float, seed: int):
  """`module`'s params (the shapes of `module.init(key, *inputs)['params']`, computed without
  running it) as float32 numpy normals of std `scale`, drawn leaf by leaf in tree order from
  `np.random.RandomState(seed)`: larger than the init's, so that logits are far apart."""
  shapes = nn.meta.unbox(
      jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs)['params'])
  )
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(
      tree, [(scale * rng.randn(*x.shape)).astype(np.float32) for x in leaves]
  )
