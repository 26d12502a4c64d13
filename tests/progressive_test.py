"""The main job's results: chance levels, the beats-chance margin, normalised scores, the bias
across modalities, the dense-vs-MoE table and the pictures."""

import math
import os

import numpy as np
import pytest

from unimoe_jax import progressive_report as report
from unimoe_jax.training import progressive_stages

INFO = {
    'splits': {
        'validation': {
            'chance': {
                'eval_image_open': {
                    'best_constant_accuracy': 0.112,
                    'per_category': {
                        'colour': {'num_examples': 128, 'best_constant_accuracy': 0.171875},
                        'count': {'num_examples': 128, 'best_constant_accuracy': 0.3359375},
                        'shape': {'num_examples': 128, 'best_constant_accuracy': 0.25},
                    },
                },
                'eval_video_mc': {'best_constant_accuracy': 0.25, 'uniform_guess_accuracy': 0.25},
                'eval_speech_open': {'best_constant_wer': 0.862},
            }
        }
    }
}


def test_chance_is_the_best_constant_answer_per_question_type():
  rows = {
      r['task']: r
      for r in report.chance_table(
          {
              'unimoe_sample_eval_image_open': {'exact_match': 26.6},
              'unimoe_sample_eval_video_mc': {'accuracy': 40.0, 'num_examples': 384.0},
              'unimoe_sample_eval_speech_open': {'wer': 0.5},
              'unimoe_sample_eval_audio_caption': {'bleu': 3.0},  # No accuracy or WER: left out.
          },
          INFO,
      )
  }
  assert sorted(rows) == [
      'unimoe_sample_eval_image_open',
      'unimoe_sample_eval_speech_open',
      'unimoe_sample_eval_video_mc',
  ]
  assert rows['unimoe_sample_eval_video_mc']['examples'] == 384
  image = rows['unimoe_sample_eval_image_open']
  # (0.171875 + 0.3359375 + 0.25) / 3, above the single best constant of 0.112.
  assert abs(image['chance'] - 0.2526) < 1e-3
  assert abs(image['value'] - 0.266) < 1e-9
  assert rows['unimoe_sample_eval_video_mc']['chance'] == 0.25
  assert rows['unimoe_sample_eval_speech_open']['lower_is_better']
  table = report.format_table(list(rows.values()))
  verdicts = {
      line.split('|')[1].strip(): line.split('|')[-2].strip()
      for line in table.split('\n\n')[0].splitlines()[2:]
  }
  # 0.266 vs 0.253 is within the 0.10 margin; 0.40 vs 0.25 and WER 0.5 vs 0.862 are not.
  assert verdicts == {
      'unimoe_sample_eval_image_open': 'NO',
      'unimoe_sample_eval_video_mc': 'yes',
      'unimoe_sample_eval_speech_open': 'yes',
  }


def _row(task, value, chance, lower=False):
  return dict(
      task=task,
      metric='WER' if lower else 'accuracy',
      value=value,
      chance=chance,
      lower_is_better=lower,
      examples=128,
  )


# Two tasks per modality, as the sample evaluation has (speech: multiple choice and WER).
MOE = [
    _row('eval_image_mc', 0.70, 0.25),
    _row('eval_image_open', 0.60, 0.20),
    _row('eval_video_mc', 0.55, 0.40),
    _row('eval_video_open', 0.50, 0.50),
    _row('eval_speech_mc', 0.40, 0.25),
    _row('eval_speech_open', 0.43, 0.86, lower=True),
    _row('eval_audio_mc', 0.625, 0.25),
    _row('eval_audio_open', 0.30, 0.30),
]


def test_bias_is_the_spread_of_normalised_modality_scores():
  scores = report.modality_scores(MOE)
  # Normalised: (value - chance) / (1 - chance); WER: (chance - WER) / chance.
  want = {
      'image': (0.45 / 0.75 + 0.40 / 0.80) / 2,  # 0.55
      'video': (0.15 / 0.60 + 0.0) / 2,  # 0.125
      'speech': (0.15 / 0.75 + 0.43 / 0.86) / 2,  # 0.35
      'audio': (0.375 / 0.75 + 0.0) / 2,
  }  # 0.25
  assert scores.keys() == want.keys()
  for m in want:
    assert scores[m] == pytest.approx(want[m], abs=1e-12), m
  spread, std = report.bias(scores)
  assert spread == pytest.approx(0.55 - 0.125, abs=1e-12)
  values = [0.55, 0.125, 0.35, 0.25]
  mean = sum(values) / 4
  assert std == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 4), abs=1e-12)
  assert report.normalised(1.0, 0.25, False) == 1.0 and report.normalised(0.0, 0.86, True) == 1.0
  assert report.modality_of('unimoe_sample_eval_speech_open') == 'speech'
  assert report.modality_of('unimoe_sample_all_train') is None


def test_side_by_side_table_with_dense_and_bias_rows():
  dense = [dict(r, value=r['chance'] if r['lower_is_better'] else r['chance'] + 0.05) for r in MOE]
  table = report.format_table(MOE, dense)
  lines = table.splitlines()
  assert lines[0].split('|')[1:-1] == [
      ' task ',
      ' metric ',
      ' examples ',
      ' chance ',
      ' MoE ',
      ' MoE margin ',
      ' dense ',
      ' dense margin ',
      ' MoE beats chance by 0.10 ',
  ]
  image = next(l for l in lines if l.startswith('| eval_image_mc '))
  assert [c.strip() for c in image.split('|')[1:-1]] == [
      'eval_image_mc',
      'accuracy',
      '128',
      '0.250',
      '0.700',
      '+0.450',
      '0.300',
      '+0.050',
      'yes',
  ]
  moe_scores = next(l for l in lines if l.startswith('| MoE |'))
  # max - min 0.55 - 0.125; std of (0.55, 0.125, 0.35, 0.25) = sqrt(0.0241797) = 0.1555.
  assert [c.strip() for c in moe_scores.split('|')[-3:-1]] == ['0.425', '0.155']
  dense_scores = next(l for l in lines if l.startswith('| dense |')).split('|')
  # Dense: video highest (0.05/0.6 + 0.05/0.5) / 2, speech lowest (0.05/0.75 + 0) / 2.
  assert dense_scores[-3].strip() == f'{(0.05 / 0.6 + 0.1) / 2 - 0.05 / 0.75 / 2:.3f}' == '0.058'


def test_pictures_are_written(tmp_path):
  pytest.importorskip('matplotlib')
  histories = {'stage0_text': [(25, 3.0), (50, 2.0)], 'stage3_unimoe': [(25, 1.0)]}
  fractions = {
      'media': np.array([[0.5, 0.5, 0, 0], [0.25, 0.25, 0.25, 0.25]]),
      'text': np.array([[np.nan] * 4, [1.0, 0, 0, 0]]),
  }
  files = report.write_pictures(
      str(tmp_path), histories, {'image': fractions}, ['layer 0', 'layer 1'], MOE, MOE
  )
  assert sorted(files.values()) == ['comparison.png', 'losses.png', 'routing_image.png']
  for name in files.values():
    with open(tmp_path / name, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  events = os.listdir(tmp_path / 'pictures')
  assert any(e.startswith('events.out.tfevents') for e in events), events


def test_a_user_gin_file_points_the_stages_at_other_data(tmp_path):
  """Your --gin_file is parsed after the stage table (its data macros and settings), and the
  run's paths after it; --gin. bindings come last. Parsed only: nothing is trained."""
  import gin  # pylint: disable=g-import-not-at-top

  user = tmp_path / 'my_data.gin'
  user.write_text(
      "STAGE3_MIXTURE = 'unimoe_sample_stage1'\nLEARNING_RATE = 0.5\n" "MODEL_DIR = '/not/used'\n"
  )
  name, files, bindings = progressive_stages.STAGE3_DENSE
  gin.clear_config()
  try:
    progressive_stages.parse_stage(
        files,
        bindings,
        [str(user)],
        {'MODEL_DIR': repr(str(tmp_path / name)), 'TRAIN_STEPS': '7'},
        ['BATCH_SIZE = 4'],
    )
    macro = lambda name: gin.query_parameter(f'{name}/macro.value')  # pylint: disable=unnecessary-lambda-assignment
    assert macro('STAGE3_MIXTURE') == 'unimoe_sample_stage1'  # Yours, not the sample data's.
    assert macro('EVAL_MIXTURE') == 'unimoe_sample_eval'  # Not rebound: the default.
    assert macro('LEARNING_RATE') == 0.5  # Over the table's 3e-3.
    assert macro('MODEL_DIR') == str(tmp_path / name)  # The run's paths win over your file.
    assert macro('TRAIN_STEPS') == 7 and macro('BATCH_SIZE') == 4
    assert macro('TRAINABLE_PATTERNS') == (  # stage3_dense.gin's.
        r'.*/lora_[ab]',
        '(vision_projector|speech_projector|audio_projector)/.*',
    )
  finally:
    gin.clear_config()
