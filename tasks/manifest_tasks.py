"""Tasks over your own data in the official Uni-MoE / LLaVA manifest format, set up by gin.

Each task reads a `ManifestConfig` in the gin scope of its stage, so one gin file describes a
run's data the way t5x users expect:

    from unimoe_jax.data import manifest
    from unimoe_jax.tasks import common
    common.vocabulary_path.path = '/ckpt/vicuna-7b/tokenizer.model'
    stage3/manifest.ManifestConfig:
      splits = {'train': '/data/uni_moe/train_mixed.json', 'validation': '/data/val.json'}
      media_root = '/data/uni_moe/media'
      voice_modality = 'speech'
    MIXTURE_OR_TASK_NAME = 'unimoe_manifest_stage3'

| task                          | gin scope      | metrics                         |
|-------------------------------|----------------|---------------------------------|
| unimoe_manifest_stage1        | stage1/        | -                               |
| unimoe_manifest_stage2        | stage2/        | -                               |
| unimoe_manifest_stage3        | stage3/        | -                               |
| unimoe_manifest_eval_mc       | eval_mc/       | multiple-choice accuracy        |
| unimoe_manifest_eval_asr      | eval_asr/      | word error rate                 |
| unimoe_manifest_eval_caption  | eval_caption/  | BLEU, CIDEr                     |

Features precomputed offline (`tools/precompute_features.py`, media decoded once by a pool of
processes) are read instead of the manifest with
`stage3/common.precomputed_splits.splits = {'train': '/data/stage3_features'}`.

A mixture of several manifests: register more tasks with `common.register_task` and
`common.lazy_manifest_source` (see sample.py) in a module of your own.
"""

import gin

from unimoe_jax.data import manifest as manifest_lib
from unimoe_jax.data import metrics
from unimoe_jax.data import vocabulary as vocabulary_lib

from unimoe_jax.tasks import common

VOCABULARY = vocabulary_lib.LazyVocabulary(
    lambda: vocabulary_lib.get_vocabulary(common.vocabulary_path()), name='vocabulary_path()'
)

TASKS = {
    'stage1': (),
    'stage2': (),
    'stage3': (),
    'eval_mc': (metrics.multiple_choice_accuracy,),
    'eval_asr': (metrics.word_error_rate,),
    'eval_caption': (metrics.bleu, metrics.cider),
}


def _scoped_config(scope: str):
  def make_config():
    with gin.config_scope(scope):
      try:
        return manifest_lib.ManifestConfig()
      except ValueError as e:
        raise ValueError(
            f'task unimoe_manifest_{scope}: bind {scope}/ManifestConfig.splits '
            f'(or .path) in gin: {e}'
        ) from None

  return make_config


def _scoped_precomputed(scope: str):
  def make_precomputed():
    with gin.config_scope(scope):
      return common.precomputed_splits()

  return make_precomputed


def register():
  for scope, metric_fns in TASKS.items():
    # Splits are known only once gin is parsed; seqio asks the source for them lazily.
    source = common.lazy_manifest_source(
        _scoped_config(scope),
        {'train': 'train', 'validation': 'validation'},
        VOCABULARY,
        _scoped_precomputed(scope),
        task_name=f'unimoe_manifest_{scope}',
    )
    common.register_task(f'unimoe_manifest_{scope}', source, VOCABULARY, metric_fns)


register()
