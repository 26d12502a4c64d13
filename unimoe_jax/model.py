"""Deprecated alias of `unimoe_jax.network` (renamed so that it no longer looks like
`unimoe_jax.models`, t5x's model interface); kept for one release.

Python imports (`from unimoe_jax.model import UniMoEConfig`) keep working with a
DeprecationWarning. Gin names moved with the module: `model.UniMoEConfig` is now
`network.UniMoEConfig`; the config.gin of a run directory written before the rename is upgraded
when it is read (`checkpoints.upgrade_gin_text`).
"""

import warnings

from unimoe_jax.network import AUDIO_PADDING_MODES  # noqa: F401
from unimoe_jax.network import MODALITIES  # noqa: F401
from unimoe_jax.network import UniMoE  # noqa: F401
from unimoe_jax.network import UniMoEConfig  # noqa: F401
from unimoe_jax.network import check_placeholders  # noqa: F401
from unimoe_jax.network import splice  # noqa: F401

warnings.warn(
    'unimoe_jax.model is renamed unimoe_jax.network (gin: network.UniMoEConfig); the alias '
    'goes in the next release',
    DeprecationWarning,
    stacklevel=2,
)
