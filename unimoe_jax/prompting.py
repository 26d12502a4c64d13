"""Deprecated alias of `unimoe_jax.serving.prompting` (moved beside the scoring and answering
code it serves); kept for one release. Imports keep working with a DeprecationWarning."""

import warnings

from unimoe_jax.serving.prompting import *  # noqa: F401,F403
from unimoe_jax.serving.prompting import MODALITIES, PLACEHOLDERS, text_positions  # noqa: F401

warnings.warn(
    'unimoe_jax.prompting moved to unimoe_jax.serving.prompting; the alias goes in the next '
    'release',
    DeprecationWarning,
    stacklevel=2,
)
