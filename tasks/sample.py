"""seqio tasks and mixtures over the embedded sample data (tools/make_sample_data.py).

    python tools/make_sample_data.py --output DIR
    --gin.unimoe_jax.tasks.sample.sample_data_dir.path="'DIR'"   (or UNIMOE_SAMPLE_DATA=DIR)

| name                                  | stage / use      | manifests (train, validation)    |
|---------------------------------------|------------------|----------------------------------|
| unimoe_sample_align_{image,speech,audio} | 1             | align_<m>.json                   |
| unimoe_sample_stage1 (mixture)        | 1 alignment      | the three above                  |
| unimoe_sample_instruct_{m}            | 2, 3             | instruct_<m>.json                |
| unimoe_sample_eval_{m}_mc             | eval (1)         | eval_<m>_mc.json, letter accuracy|
| unimoe_sample_eval_{m}_open           | eval (1)         | eval_<m>_open.json, exact match  |
|                                       |                  | (speech: WER)                    |
| unimoe_sample_stage2_{m} (mixture)    | 2: one run per m | instruct_<m> + eval_<m>_{mc,open}|
| unimoe_sample_stage3 (mixture)        | 3 LoRA + MoE     | the four instruct tasks + all    |
|                                       |                  | eval-style tasks                 |
| unimoe_sample_all_train (mixture)     | text only (2)    | align + stage-3 tasks            |
| unimoe_sample_text_warmup             | demo warm start  | warmup_text.json: media in words |
| unimoe_sample_eval (mixture)          | eval             | all eval tasks                   |

(1) the validation split; their train split is trained on in stages 2 and 3.
(2) drop_too_long.unfed_media = 'ignore'.

Chance levels are in DIR/sample_data_info.json and docs/sample_data.md. The feature sizes
below match gin/models/multimodal_tiny.gin (tests/tasks_test.py checks it): 32 px images
(16 CLIP patches), 8 video frames, Whisper 80 x 3000 log-mel, 128 BEATs fbank frames, 8
aligner / Q-Former queries. The official `voice` field is speech for the speech manifests and
audio for the audio ones.
"""

import os

import gin

from unimoe_jax.data import manifest as manifest_lib
from unimoe_jax.data import metrics
from unimoe_jax.data import vocabulary as vocabulary_lib
from unimoe_jax.media import audio as audio_lib
from unimoe_jax.modalities import MODALITIES
from unimoe_jax.sample_data.catalogue import SPLITS

from unimoe_jax.tasks import common

STAGE1_RATES = {'image': 1.0, 'speech': 2.0, 'audio': 1.0}
# Per-item soft tokens of the tiny towers (gin/models/multimodal_tiny.gin).
SOFT_TOKENS = dict(
    image_soft_tokens=16, video_soft_tokens=16, speech_soft_tokens=8, audio_soft_tokens=8
)
SETTINGS = dict(
    image_size=32, image_mode='crop', video_frames=8, n_mels=80, audio_frames=128, **SOFT_TOKENS
)


@gin.configurable
def sample_data_dir(path: str = '') -> str:
  """The folder tools/make_sample_data.py wrote (gin `path`, else $UNIMOE_SAMPLE_DATA)."""
  path = path or os.environ.get('UNIMOE_SAMPLE_DATA', '')
  if not path:
    raise ValueError(
        'the sample-data tasks need the folder tools/make_sample_data.py wrote: '
        'bind sample_data_dir.path in gin or set UNIMOE_SAMPLE_DATA'
    )
  if not os.path.isfile(os.path.join(path, 'sample_data_info.json')):
    raise ValueError(
        f'{path} is not a sample-data folder (no sample_data_info.json); run '
        f'python tools/make_sample_data.py --output {path}'
    )
  return path


VOCABULARY = vocabulary_lib.LazyVocabulary(
    lambda: vocabulary_lib.get_vocabulary(os.path.join(sample_data_dir(), 'tokenizer.model')),
    name='sample_data_dir()/tokenizer.model',
)


@gin.configurable
def speech_window(seconds: int = audio_lib.WHISPER_SECONDS) -> int:
  """Seconds of Whisper window per speech item (ManifestConfig.speech_seconds): 30 as in
  Whisper; the CPU demo (gin/demo/tiny_data.gin) binds 1 (its DTMF clips last under 0.7 s) together
  with the encoder's max_source_positions."""
  return seconds


def _config_factory(manifest: str, voice: str):
  def make_config():
    root = sample_data_dir()
    return manifest_lib.ManifestConfig(
        splits={s: os.path.join(root, s, f'{manifest}.json') for s in SPLITS},
        media_root=root,
        vocab_path=os.path.join(root, 'tokenizer.model'),
        voice_modality=voice,
        speech_seconds=speech_window(),
        **SETTINGS,
    )

  return make_config


def _task(name: str, manifest: str, voice: str = 'speech', metric_fns=()):
  source = common.lazy_manifest_source(
      _config_factory(manifest, voice), {s: s for s in SPLITS}, VOCABULARY, task_name=name
  )
  common.register_task(name, source, VOCABULARY, metric_fns)
  return name


def _voice(modality: str) -> str:
  return 'audio' if modality == 'audio' else 'speech'


def register():
  stage1 = [
      _task(f'unimoe_sample_align_{m}', f'align_{m}', _voice(m))
      for m in ('image', 'speech', 'audio')
  ]
  # Transcription is the hardest alignment (the aligner learns from scratch to read the
  # digits in order): it gets twice the rate of the captions.
  common.register_mixture(
      'unimoe_sample_stage1',
      [(task, STAGE1_RATES[m]) for m, task in zip(('image', 'speech', 'audio'), stage1)],
  )
  instruct = [_task(f'unimoe_sample_instruct_{m}', f'instruct_{m}', _voice(m)) for m in MODALITIES]
  evals = {}
  for m in MODALITIES:
    open_metric = metrics.word_error_rate if m == 'speech' else metrics.exact_match
    evals[m] = [
        _task(
            f'unimoe_sample_eval_{m}_mc',
            f'eval_{m}_mc',
            _voice(m),
            [metrics.multiple_choice_accuracy],
        ),
        _task(f'unimoe_sample_eval_{m}_open', f'eval_{m}_open', _voice(m), [open_metric]),
    ]
  # Instruction data of one modality: its conversations plus the train split of its
  # benchmark-style tasks (multiple choice answered with a letter, one-word answers), as real
  # instruction mixtures carry ScienceQA/MMBench-style data next to free-form conversations.
  for m, task in zip(MODALITIES, instruct):
    common.register_mixture(f'unimoe_sample_stage2_{m}', [task, *evals[m]])  # One run each.
  stage3 = instruct + [t for m in evals for t in evals[m]]
  common.register_mixture('unimoe_sample_stage3', stage3)
  # Every training conversation, read without media (TASK_FEATURE_LENGTHS {'targets': ...} only:
  # bind drop_too_long.unfed_media = 'ignore', or the media of its examples are an error).
  common.register_mixture('unimoe_sample_all_train', stage1 + stage3)
  # The same conversations with each media item described in words where its placeholder was
  # (tools/make_sample_data.py text_warmup): the demo's warm start learns to read it.
  _task('unimoe_sample_text_warmup', 'warmup_text')
  common.register_mixture('unimoe_sample_eval', [t for m in evals for t in evals[m]])


register()
