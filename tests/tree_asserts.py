"""Comparing two parameter / gradient trees leaf by leaf in the tests."""

import jax
import numpy as np


def assert_trees_close(got, want, atol_scale, rtol=1e-7, what=''):
  """`np.testing.assert_allclose` on each pair of leaves (in tree order), with an absolute
  tolerance of `atol_scale * (max |want leaf| + 1e-6)` (relative to the leaf's scale; the 1e-6
  keeps an all-zero leaf's tolerance positive), naming the leaf after `what`."""
  for (path, g), w in zip(
      jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)
  ):
    np.testing.assert_allclose(
        np.asarray(g),
        w,
        rtol=rtol,
        atol=atol_scale * (float(np.abs(w).max()) + 1e-6),
        err_msg=what + jax.tree_util.keystr(path),
    )
