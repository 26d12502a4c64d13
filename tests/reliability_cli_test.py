"""Issue 21: python -m unimoe_jax.generate / .score refuse bad input with one error naming the
flag, accept a training run directory as --checkpoint, and bound the sequence by --max_length."""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from generate_test import make_tokenizer
from unimoe_jax import checkpoints, decoding, generate, score
from unimoe_jax.serving import answering, flags, scoring

_MODEL_GIN = """from unimoe_jax import config
DECODER_CONFIG = @config.DecoderConfig()
config.DecoderConfig:
  vocab_size = 97
  embed_dim = 32
  num_layers = 2
  num_heads = 4
  num_kv_heads = 2
  mlp_dim = 48
  dtype = 'float32'
  param_dtype = 'float32'
"""
_TRAIN_GIN = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gin', 'runs', 'train.gin'
)


def _operative_run_config(model_dir, initial_checkpoint) -> str:
  """The config.gin a `python -m unimoe_jax.train` run writes (gin.config_str of the run)."""
  import gin  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  try:
    gin.parse_config(_MODEL_GIN)
    gin.parse_config_files_and_bindings(
        [_TRAIN_GIN],
        [
            f"MODEL_DIR='{model_dir}'",
            'TRAIN_STEPS=3',
            "MIXTURE_OR_TASK_NAME='some_task'",
            "TASK_FEATURE_LENGTHS={'targets': 8}",
            f"INITIAL_CHECKPOINT_PATH='{initial_checkpoint}'",
        ],
    )
    return gin.config_str()
  finally:
    gin.clear_config()


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A converted text-only checkpoint and a training run (MODEL_DIR) holding the same params at
  step 3, started from it (its INITIAL_CHECKPOINT_PATH)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from unimoe_jax.decoder import Decoder  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('reliability_cli')
  tokenizer = make_tokenizer(root)
  cfg = checkpoints.decoder_config_from_gin(_MODEL_GIN)
  shapes = nn.meta.unbox(
      jax.eval_shape(
          lambda: Decoder(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))['params']
      )
  )
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_unflatten(
      tree, [(0.2 * rng.randn(*x.shape)).astype(np.float32) for x in leaves]
  )
  converted = checkpoints.save(
      str(root / 'converted'), params, _MODEL_GIN, {checkpoints.TOKENIZER_FILE: tokenizer}
  )
  run = root / 'run'
  os.makedirs(run / 'checkpoints')
  ocp.PyTreeCheckpointer().save(
      str(run / 'checkpoints' / '3' / 'state'), {'params': {'decoder': params}, 'step': np.int32(3)}
  )
  with open(run / 'config.gin', 'w') as f:
    f.write(_operative_run_config(run, converted))
  return converted, str(run), tokenizer, root


# ---- parse-time flag checks: no checkpoint is touched (the path does not even exist) ----------
@pytest.mark.parametrize(
    'flags,message',
    [
        (['--temperature', '-1'], '--temperature must be >= 0'),
        (['--temperature', 'nan'], '--temperature must be >= 0'),
        (['--temperature', '1', '--top_p', '0'], '--top_p must be in (0, 1]'),
        (['--temperature', '1', '--top_p', '7'], '--top_p must be in (0, 1]'),
        (['--temperature', '1', '--top_k', '-5'], '--top_k must be an integer >= 0'),
        (['--top_k', '5'], 'only act when sampling'),
        (['--top_p', '0.5'], 'only act when sampling'),
        (['--num_beams', '0'], '--num_beams must be an integer >= 1'),
        (['--num_beams', '3', '--temperature', '0.7'], 'exclude each other'),
        (['--max_decode_steps', '0'], '--max_decode_steps must be an integer >= 1'),
        (['--max_decode_steps', '100000'], '--max_decode_steps=100000 leaves no room'),
        (['--max_decode_steps', 'many'], '--max_decode_steps must be an integer'),
        (['--max_length', '0'], '--max_length must be >= 1'),
        (['--dtype', 'float8'], "--dtype: invalid choice: 'float8'"),
    ],
)
def test_generate_refuses_bad_decoding_flags_at_parse_time(tmp_path, capsys, flags, message):
  missing = str(tmp_path / 'no_such_checkpoint')
  with pytest.raises(SystemExit) as info:
    generate.main(['--checkpoint', missing, '--prompt', 'hi'] + flags)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert message in err, err
  assert 'no_such_checkpoint' not in err, err


@pytest.mark.parametrize(
    'main,extra', [(generate.main, ['--prompt', 'hi']), (score.main, ['--text', 'hi'])]
)
def test_a_missing_checkpoint_is_named_not_the_tokenizer(tmp_path, main, extra):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError) as info:
    main(['--checkpoint', missing] + extra)
  assert str(info.value) == f'--checkpoint={missing} does not exist'


def test_a_directory_without_a_checkpoint_names_what_is_expected(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match=r'--checkpoint=.*empty holds no checkpoint'):
    answering.answer(str(tmp_path / 'empty'), 'hi')
  file_path = tmp_path / 'file.txt'
  file_path.write_text('x')
  with pytest.raises(NotADirectoryError, match='is not a directory'):
    scoring.score_text(str(file_path), 'hi')


def test_a_missing_vocab_is_named(setup, tmp_path):
  converted, _, _, _ = setup
  with pytest.raises(FileNotFoundError, match='--vocab=.*does not exist'):
    answering.answer(converted, 'hi', vocab_path=str(tmp_path / 'sp.model'))


def test_generate_python_api_checks_the_same(setup):
  converted, _, _, _ = setup
  with pytest.raises(ValueError, match='--temperature must be >= 0'):
    answering.answer(converted, 'hi', temperature=-0.5)
  with pytest.raises(ValueError, match=r'--top_k=1000 exceeds the vocabulary \(97 tokens\)'):
    answering.answer(converted, 'hi', temperature=1.0, top_k=1000)
  with pytest.raises(ValueError, match='--num_beams=3 .* exclude each other'):
    answering.answer(
        converted, 'hi', settings=answering.DecodingSettings(temperature=0.5), num_beams=3
    )
  with pytest.raises(TypeError, match='beams is not a decoding setting.*num_beams'):
    answering.answer(converted, 'hi', beams=3)


def test_decoding_settings_choose_the_method_as_hugging_face_does():
  settings = answering.DecodingSettings
  assert settings().method_kwargs() == {'method': 'greedy'}
  assert settings(num_beams=3).method_kwargs() == {'method': 'beam', 'num_beams': 3}
  assert settings(temperature=0.7, top_k=5, top_p=0.9, seed=3).method_kwargs() == {
      'method': 'sample',
      'temperature': 0.7,
      'top_k': 5,
      'top_p': 0.9,
  }
  settings(temperature=1.0, top_k=7).check_vocabulary(7)
  with pytest.raises(ValueError, match=r'--top_k=7 exceeds the vocabulary \(6 tokens\)'):
    settings(temperature=1.0, top_k=7).check_vocabulary(6)


def test_generate_flags_are_the_decoding_settings():
  """Each field of DecodingSettings is a flag of generate (max_length a common one), with the
  field's default: the defaults are written once."""
  parser = argparse.ArgumentParser()
  flags.add_common_flags(parser)
  flags.add_decoding_flags(parser)
  args = parser.parse_args(['--checkpoint', 'x'])
  assert flags.decoding_settings(args) == answering.DecodingSettings()
  args = parser.parse_args(['--checkpoint', 'x', '--temperature', '0.5', '--seed', '4'])
  assert flags.decoding_settings(args) == answering.DecodingSettings(temperature=0.5, seed=4)


def test_decoding_generate_checks_its_arguments():
  from unimoe_jax.config import DecoderConfig  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoE, UniMoEConfig  # pylint: disable=g-import-not-at-top

  model = UniMoE(
      UniMoEConfig(
          decoder=DecoderConfig(
              vocab_size=97, embed_dim=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=48
          )
      )
  )
  common = dict(max_decode_steps=4, eos_id=2, rng=jax.random.PRNGKey(0))
  for kwargs, message in [
      (dict(method='sample', top_k=-5), 'top_k must be in'),
      (dict(method='sample', top_p=0.0), 'top_p must be in'),
      (dict(method='beam', num_beams=0), 'num_beams must be >= 1'),
      (dict(method='greedy', max_decode_steps=0), 'max_decode_steps'),
  ]:
    with pytest.raises(ValueError, match=message):
      decoding.generate(model, None, None, None, **{**common, **kwargs})


def test_a_prompt_longer_than_max_length_fails_before_params_are_read(setup, monkeypatch):
  converted, _, _, _ = setup

  def no_restore(*args, **kwargs):
    raise AssertionError('params read before the length check')

  monkeypatch.setattr(checkpoints, 'restore_model', no_restore)
  monkeypatch.setattr(checkpoints, 'read_checkpoint', no_restore)
  question = ' '.join(['the cat sat on the mat'] * 10)
  with pytest.raises(ValueError, match=r'the prompt is \d+ tokens .* more than --max_length=40'):
    answering.answer(converted, question, max_decode_steps=8, max_length=40)
  with pytest.raises(
      ValueError, match=r'--text \(with BOS\) is \d+ tokens, more than ' r'--max_length=20'
  ):
    scoring.score_text(converted, question, max_length=20)


def test_a_training_run_directory_answers_and_scores_as_its_export(setup):
  converted, run, _, _ = setup
  want = answering.answer(converted, 'what did the cat see', max_decode_steps=5)
  got = answering.answer(run, 'what did the cat see', max_decode_steps=5)
  assert got.tokens == want.tokens and got.prompt_ids == want.prompt_ids
  np.testing.assert_allclose(got.score, want.score, rtol=1e-5)
  want_params, want_gin = checkpoints.read_checkpoint(run)
  for path in (os.path.join(run, 'checkpoints'), os.path.join(run, 'checkpoints', '3')):
    assert checkpoints.locate_checkpoint(path)[1] == 3
    params, gin_text = checkpoints.read_checkpoint(path)
    assert gin_text == want_gin
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, want_params)
  want_scores = scoring.score_text(converted, 'the dog sat on the mat')
  got_scores = scoring.score_text(run, 'the dog sat on the mat')
  assert [r['token'] for r in got_scores] == [r['token'] for r in want_scores]
  np.testing.assert_allclose(
      [r['logprob'] for r in got_scores[1:]], [r['logprob'] for r in want_scores[1:]], rtol=1e-5
  )


def test_a_training_run_without_config_or_tokenizer_is_named(setup, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top

  _, run, _, _ = setup
  bare = tmp_path / 'bare_run'
  shutil.copytree(os.path.join(run, 'checkpoints'), bare / 'checkpoints')
  with pytest.raises(FileNotFoundError, match=r'training run \(step 3\) has no .*config.gin'):
    answering.answer(str(bare), 'hi')
  with open(os.path.join(run, 'config.gin')) as f:
    text = f.read()
  (bare / 'config.gin').write_text(
      text.replace('INITIAL_CHECKPOINT_PATH = ', 'INITIAL_CHECKPOINT_PATH = None # ')
  )
  with pytest.raises(FileNotFoundError, match='has no tokenizer.model .*; pass --vocab'):
    answering.answer(str(bare), 'hi')


def test_train_without_gin_file_suggests_files_that_exist():
  """Issue 21: the hint named stages/stage3_tiny.gin, which does not exist."""
  import unimoe_jax  # pylint: disable=g-import-not-at-top
  from unimoe_jax import train  # pylint: disable=g-import-not-at-top

  with pytest.raises(SystemExit) as stop:
    train.setup([], 'test')
  message = str(stop.value)
  assert message.startswith('--gin_file is required: --gin_file=models/tiny.gin'), message
  named = [arg.split('=', 1)[1] for arg in train.EXAMPLE_GIN_FILES.split()]
  assert named and all(
      any(os.path.isfile(os.path.join(d, f)) for d in unimoe_jax.gin_search_paths()) for f in named
  ), named


def test_a_saved_checkpoint_is_readable_by_others_as_the_umask_allows(tmp_path):
  """Issue 21: converted checkpoints were created 0700 (the private staging directory)."""
  umask = os.umask(0o022)
  try:
    path = checkpoints.save(str(tmp_path / 'converted'), {'w': np.ones(2, np.float32)}, '')
  finally:
    os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o755
  assert os.stat(os.path.join(path, checkpoints.PARAMS_DIR)).st_mode & 0o777 == 0o755
