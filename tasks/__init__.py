"""The seqio task and mixture registry, installed as `unimoe_jax.tasks`.

Point t5x's `MIXTURE_OR_TASK_MODULE` at `unimoe_jax.tasks`. Importing it registers:
  - `sample.py`: tasks and mixtures for every stage and evaluation over the embedded sample
    data (tools/make_sample_data.py);
  - `manifest_tasks.py`: `unimoe_manifest_<stage>` tasks over your own manifests, configured
    in gin scopes (stage1/, stage2/, stage3/, eval_mc/, eval_asr/, eval_caption/);
  - `tfds_tasks.py`: LibriSpeech speech recognition and COCO captions from TFDS;
Registration reads no file: data folders and tokenizers are resolved when a dataset is built.
"""

from unimoe_jax.tasks import manifest_tasks
from unimoe_jax.tasks import sample
from unimoe_jax.tasks import tfds_tasks

__all__ = ["manifest_tasks", "sample", "tfds_tasks"]
