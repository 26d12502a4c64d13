"""The data's soft tokens per item against the model's: a mismatch (ManifestConfig /
TfdsSettings `<m>_soft_tokens` vs `UniMoEConfig.num_soft_tokens(m)`) fails before any compute,
naming both; `splice` alone would pair soft tokens with the wrong placeholders silently."""

import dataclasses
import os
import pathlib

import gin
import numpy as np
import pytest

pytest.importorskip('seqio')

import unimoe_jax  # pylint: disable=g-import-not-at-top
from unimoe_jax import models  # pylint: disable=g-import-not-at-top
from unimoe_jax import sample_data  # pylint: disable=g-import-not-at-top
from unimoe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from unimoe_jax.tasks import sample  # pylint: disable=g-import-not-at-top
from unimoe_jax.training import loop  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASK = 'unimoe_sample_align_image'
LENGTHS = {'targets': 192, 'image_features': 1}


@pytest.fixture(scope='module')
def sample_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('sample')
  sample_data.make_sample_data(str(directory), num_train=4, num_validation=2)
  sample_data.train_tokenizer(str(directory))
  return directory


@pytest.fixture(scope='module')
def tiny_config():
  """The tiny multimodal model the sample data are made for (16 soft tokens per image)."""
  gin.clear_config()
  for path in unimoe_jax.gin_search_paths():
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(['models/tiny.gin', 'models/multimodal_tiny.gin'], [])
  cfg = gin.query_parameter('%MODEL_CONFIG').scoped_configurable_fn()
  gin.clear_config()
  assert cfg.num_soft_tokens('image') == sample.SOFT_TOKENS['image_soft_tokens']
  return cfg


@pytest.fixture(autouse=True)
def _bind(sample_dir, monkeypatch):
  monkeypatch.setenv('UNIMOE_SAMPLE_DATA', str(sample_dir))


def test_first_row_matches_the_model_it_was_made_for(tiny_config):
  row = pipeline.FirstPass(TASK, LENGTHS, pack=False).first_row()
  assert row['decoder_input_tokens'].shape == (1, LENGTHS['targets'])
  assert row['image_mask'].sum() == 1
  per_image = sample.SOFT_TOKENS['image_soft_tokens']
  assert (row['decoder_input_tokens'] == tiny_config.image_token_id).sum() == per_image
  models.UniMoEModel(tiny_config).check_batch(row, 'first row')  # No error.


def test_training_refuses_other_soft_token_counts_before_any_compute(tiny_config, tmp_path):
  # Patches of 16 px on 32 px images: 4 soft tokens per image where the data expand 16.
  cfg = dataclasses.replace(
      tiny_config, vision=dataclasses.replace(tiny_config.vision, patch_size=16)
  )
  assert cfg.num_soft_tokens('image') == 4
  model_dir = tmp_path / 'run'
  with pytest.raises(ValueError) as error:
    loop.train(
        model=models.UniMoEModel(cfg),
        model_dir=str(model_dir),
        mixture_or_task_name=TASK,
        task_feature_lengths=LENGTHS,
        batch_size=8,
        train_steps=1,
    )
  message = str(error.value)
  assert f'MIXTURE_OR_TASK_NAME={TASK!r}, first row' in message
  assert '16 image placeholder tokens' in message and '16 per item' in message
  assert 'image_soft_tokens (ManifestConfig / TfdsSettings)' in message
  assert "UniMoEConfig.num_soft_tokens('image') = 4" in message
  assert not os.path.exists(model_dir)  # Nothing written: no state was built.


def test_every_batch_is_checked_naming_where(tiny_config):
  """A later batch of a mixture (another task's counts) fails naming its step."""
  model = models.UniMoEModel(tiny_config)
  row = pipeline.FirstPass(TASK, LENGTHS, pack=False).first_row()
  row['image_mask'] = np.zeros_like(row['image_mask'])  # Placeholders for no item.
  with pytest.raises(ValueError, match=r'step 7: row 0: 16 image placeholder tokens .* 0 items'):
    model.check_batch(row, "MIXTURE_OR_TASK_NAME='m', step 7")
