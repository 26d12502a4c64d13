"""Deprecated alias of `unimoe_jax.layers.encoder_blocks` (the encoder towers' blocks, renamed so
that the name does not suggest the LLaMA decoder); kept for one release."""

import warnings

from unimoe_jax.layers.encoder_blocks import *  # noqa: F401,F403

warnings.warn(
    'unimoe_jax.layers.transformer is renamed unimoe_jax.layers.encoder_blocks; the alias goes in '
    'the next release',
    DeprecationWarning,
    stacklevel=2,
)
