"""Tasks over data sets that TFDS has, so a user with a TFDS data dir trains on them unchanged.

| task                    | source                                   | metrics      |
|-------------------------|------------------------------------------|--------------|
| unimoe_librispeech_asr  | librispeech/default:2.1.1 (16 kHz speech) | WER          |
| unimoe_coco_captions    | coco_captions/2014:1.1.0 (Karpathy splits) | BLEU, CIDEr |

Settings are the official ones (`TfdsSettings()`: CLIP-336 images, Whisper 80-bin log-mel,
576 / 50 soft tokens); the tokenizer is `common.vocabulary_path`; TFDS finds its data through
`--tfds_data_dir` / $TFDS_DATA_DIR as usual, and prompts are gin-configurable
(`librispeech_preprocessor.prompt`, `coco_captions_preprocessor.prompt`).
"""

from unimoe_jax.data import tfds_sources

from unimoe_jax.tasks import manifest_tasks

NAMES = tfds_sources.register_tfds_tasks(manifest_tasks.VOCABULARY, tfds_sources.TfdsSettings())
