"""`unimoe_jax.eval` / `unimoe_jax.infer` (training/inference.py) on a briefly trained tiny model.

The tiny decoder is trained 3 steps on `unimoe_test_lm` (tests/tiny_tasks.py); its MODEL_DIR is
the CHECKPOINT_PATH. Inference is checked against `model.predict_batch` / `score_batch` on the
same batches and params, evaluation against `evaluation.evaluate` called directly, both on the
8-device mesh of conftest.py. `unimoe_test_lm_metrics` is the same data with seqio metrics.
"""

import glob
import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import seqio

import tiny_tasks
from unimoe_jax import partitioning
from unimoe_jax.training import evaluation
from unimoe_jax.training import inference
from unimoe_jax.training import loop

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
METRICS_TASK = 'unimoe_test_lm_metrics'
LENGTHS = dict(tiny_tasks.FEATURE_LENGTHS)
STEPS = 3
BATCH = 8
EOS = tiny_tasks.EOS_ID


def _answer(targets, weights):
  """The example's answer ids (loss-weighted, EOS dropped): what a prediction should be."""
  return tuple(int(t) for t, w in zip(targets, weights) if w > 0 and t != EOS)


def _until_eos(ids):
  """Ids before the first EOS or padding (0)."""
  ids = [int(i) for i in ids]
  for stop in (EOS, 0):
    ids = ids[: ids.index(stop)] if stop in ids else ids
  return tuple(ids)


def _postprocess(output, example=None, is_target=False):
  if is_target:
    return _answer(example['targets'], example['loss_weights'])
  return _until_eos(output)  # PassThroughVocabulary decodes to ids, up to and with EOS.


def _exact(targets, predictions):
  return {'exact': 100.0 * np.mean([t == p for t, p in zip(targets, predictions)])}


def _first_token_accuracy(targets, predictions):
  return {'first_token': 100.0 * np.mean([p[:1] == t[:1] for t, p in zip(targets, predictions)])}


def _mean_score(targets, scores):
  del targets
  return {'mean_score': float(np.mean(scores))}


def _register_metrics_task():
  if METRICS_TASK in seqio.TaskRegistry.names():
    return
  seqio.TaskRegistry.add(
      METRICS_TASK,
      source=seqio.FunctionDataSource(
          tiny_tasks._dataset_fn,  # pylint: disable=protected-access
          splits=tuple(tiny_tasks.NUM_EXAMPLES),
          num_input_examples=dict(tiny_tasks.NUM_EXAMPLES),
      ),
      preprocessors=[],
      postprocess_fn=_postprocess,
      metric_fns=[_exact, _first_token_accuracy, _mean_score],
      output_features=seqio.get_mixture_or_task(tiny_tasks.TASK_NAME).output_features,
  )


_register_metrics_task()


def _kwargs(model_dir, output_dir, **overrides):
  kwargs = dict(
      model=tiny_tasks.tiny_model(),
      checkpoint_path=model_dir,
      mixture_or_task_name=tiny_tasks.TASK_NAME,
      task_feature_lengths=LENGTHS,
      batch_size=BATCH,
      output_dir=str(output_dir),
      mixture_or_task_module=('tiny_tasks',),
  )
  kwargs.update(overrides)
  return kwargs


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _model_batches(examples=None, length=LENGTHS['targets']):
  """Examples (default: the validation split) as unpacked model rows, in batches of BATCH."""
  examples = tiny_tasks.examples('validation') if examples is None else examples
  rows = {
      k: np.zeros((len(examples), length), d)
      for k, d in (
          ('decoder_target_tokens', np.int32),
          ('decoder_input_tokens', np.int32),
          ('decoder_loss_weights', np.float32),
      )
  }
  for i, ex in enumerate(examples):
    n_tokens = len(ex['targets'])
    rows['decoder_target_tokens'][i, :n_tokens] = ex['targets']
    rows['decoder_input_tokens'][i, 1:n_tokens] = ex['targets'][:-1]
    rows['decoder_loss_weights'][i, :n_tokens] = ex['loss_weights']
  return [{k: v[s : s + BATCH] for k, v in rows.items()} for s in range(0, len(examples), BATCH)]


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(MODEL_DIR, params) after STEPS steps; the params are the ones saved at the last step."""
  model_dir = str(tmp_path_factory.mktemp('eval_infer') / 'run')
  result = loop.train(**tiny_tasks.train_kwargs(model_dir, train_steps=STEPS))
  assert result['step'] == STEPS
  return model_dir, result['state'].params


@pytest.fixture(scope='module')
def predictions(trained, tmp_path_factory):
  model_dir, _ = trained
  out = tmp_path_factory.mktemp('infer')
  paths = inference.infer(**_kwargs(model_dir, out))
  assert paths == {tiny_tasks.TASK_NAME: str(out / f'{tiny_tasks.TASK_NAME}-{STEPS}.jsonl')}
  return _read_jsonl(paths[tiny_tasks.TASK_NAME])


def test_infer_writes_one_line_per_example_with_predict_batch_outputs(trained, predictions):
  _, params = trained
  examples = tiny_tasks.examples('validation')
  assert len(predictions) == len(examples) == 32
  for line, ex in zip(predictions, examples):
    assert sorted(line) == ['inputs', 'prediction', 'targets']
    half = len(ex['targets']) // 2  # tiny_tasks: the answer is the second half.
    assert line['inputs'] == ex['targets'][:half].tolist() and line['inputs']
    assert tuple(line['targets']) == _answer(ex['targets'], ex['loss_weights'])
    assert line['targets']
  # The same batches through model.predict_batch, sharded as the evaluator shards them.
  model = tiny_tasks.tiny_model()
  mesh = partitioning.make_mesh()
  with partitioning.mesh_context(mesh):
    predict = jax.jit(model.predict_batch)
    decodes = [
        np.asarray(predict(params, evaluation.global_batch(mesh, batch)))
        for batch in _model_batches()
    ]
  expected = [list(_until_eos(row)) for rows in decodes for row in rows]
  assert [line['prediction'] for line in predictions] == expected
  assert len({tuple(p) for p in expected}) > 4  # Distinct answers: not a vacuous comparison.


def test_infer_score_mode_skips_examples_that_do_not_fit(trained, tmp_path, caplog):
  """TASK_FEATURE_LENGTHS 32 < some examples' 16-40 tokens: those are skipped, and each line
  still carries its own example's score (score_batch on the fitting examples)."""
  model_dir, params = trained
  first = tiny_tasks.examples('validation')[: 2 * BATCH]
  fitting = [ex for ex in first if len(ex['targets']) <= 32]
  assert 0 < len(fitting) < len(first)
  caplog.set_level('INFO')
  paths = inference.infer(
      **_kwargs(
          model_dir,
          tmp_path,
          mode='score',
          num_examples=2 * BATCH,
          task_feature_lengths={'targets': 32},
      )
  )
  assert f'{len(fitting)} examples -> ' in caplog.text
  assert f'({len(first) - len(fitting)} skipped: longer than' in caplog.text
  assert paths[tiny_tasks.TASK_NAME].endswith(f'-{STEPS}-score.jsonl')
  lines = _read_jsonl(paths[tiny_tasks.TASK_NAME])
  assert all(sorted(line) == ['inputs', 'score', 'targets'] for line in lines)
  assert [tuple(line['targets']) for line in lines] == [
      _answer(ex['targets'], ex['loss_weights']) for ex in fitting
  ]
  score = jax.jit(tiny_tasks.tiny_model().score_batch)
  expected = np.concatenate(
      [np.asarray(score(params, batch)) for batch in _model_batches(fitting, 32)]
  )
  np.testing.assert_allclose([line['score'] for line in lines], expected[: len(fitting)], rtol=1e-5)
  assert np.all(expected < 0)


def test_eval_metrics_equal_direct_evaluation(trained, tmp_path):
  model_dir, params = trained
  results = inference.evaluate(
      **_kwargs(model_dir, tmp_path, mixture_or_task_name=METRICS_TASK, num_examples=16)
  )
  model = tiny_tasks.tiny_model()
  mesh = partitioning.make_mesh()
  evaluator = evaluation.make_evaluator(METRICS_TASK, LENGTHS, num_examples=16)
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
  direct = evaluation.evaluate(
      evaluator, evaluation.ModelEvaluator(model, mesh, shardings, BATCH), params, STEPS
  )
  assert sorted(direct[METRICS_TASK]) == ['exact', 'first_token', 'mean_score', 'num_examples']
  assert direct[METRICS_TASK]['num_examples'] == 16
  assert results == direct
  with open(tmp_path / f'metrics-{STEPS}.json') as f:
    written = json.load(f)
  assert written['metrics'] == direct and written['step'] == STEPS
  assert glob.glob(str(tmp_path / METRICS_TASK / 'events.out.tfevents.*'))  # TensorBoard


def test_wrong_inputs_fail_naming_the_macro(trained, tmp_path):
  model_dir, _ = trained
  (tmp_path / 'empty').mkdir()
  cases = [
      (dict(checkpoint_path=str(tmp_path / 'missing')), 'CHECKPOINT_PATH=.*missing does not exist'),
      (dict(checkpoint_path=str(tmp_path / 'empty')), 'CHECKPOINT_PATH=.*empty holds no '),
      (dict(checkpoint_path=''), 'CHECKPOINT_PATH is not set'),
      (dict(mixture_or_task_name='no_such_task'), "MIXTURE_OR_TASK_NAME='no_such_task' is not"),
      (dict(split='test'), "MIXTURE_OR_TASK_SPLIT='test'"),
      (
          dict(task_feature_lengths={'targets': 8}),
          r"TASK_FEATURE_LENGTHS=\{'targets': 8\} fits " 'none',
      ),
      (dict(batch_size=4), 'BATCH_SIZE=4 is not divisible'),
      (dict(mode='greedy'), 'infer.mode must be one of'),
  ]
  for overrides, message in cases:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      inference.infer(**_kwargs(model_dir, tmp_path / 'out', **overrides))
  with pytest.raises(ValueError, match='has no task with metric_fns'):
    inference.evaluate(**_kwargs(model_dir, tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize(
    'run_file, output_macro',
    [('runs/eval.gin', 'EVAL_OUTPUT_DIR'), ('runs/infer.gin', 'INFER_OUTPUT_DIR')],
)
def test_gin_files_take_t5x_macros(run_file, output_macro):
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top

  bindings = [
      "CHECKPOINT_PATH = '/ckpt'",
      f"{output_macro} = '/out'",
      "MIXTURE_OR_TASK_NAME = 'unimoe_test_lm'",
      "MIXTURE_OR_TASK_MODULE = 'tiny_tasks'",
      "MIXTURE_OR_TASK_SPLIT = 'validation'",
      "TASK_FEATURE_LENGTHS = {'targets': 64}",
      'BATCH_SIZE = 16',
  ]
  gin_utils.parse(['models/tiny.gin', run_file], bindings)
  function = 'evaluate' if 'eval' in run_file else 'infer'
  assert gin.query_parameter(f'inference.{function}.batch_size') is not None
  gin.clear_config()
  with pytest.raises(ValueError, match='did you mean CHECKPOINT_PATH'):
    gin_utils.parse(['models/tiny.gin', run_file], ["CHECKPOINT_PATHS = '/ckpt'"])


def test_infer_cli(trained, predictions, tmp_path):
  """`python -m unimoe_jax.infer` with t5x's macros; same mesh (8 host devices), same lines.
  About 13 s on 2 cores, most of it imports and compiling the decoder."""
  model_dir, _ = trained
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS='--xla_force_host_platform_device_count=8 ' '--xla_backend_optimization_level=0',
      PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO, os.environ.get('PYTHONPATH', '')]),
  )
  flags = [
      '--gin_file=models/tiny.gin',
      '--gin_file=runs/infer.gin',
      f"--gin.CHECKPOINT_PATH='{model_dir}'",
      f"--gin.INFER_OUTPUT_DIR='{tmp_path}'",
      f"--gin.MIXTURE_OR_TASK_NAME='{tiny_tasks.TASK_NAME}'",
      "--gin.MIXTURE_OR_TASK_MODULE='tiny_tasks'",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
      f'--gin.infer.num_examples={BATCH}',
  ]
  proc = subprocess.run(
      [sys.executable, '-m', 'unimoe_jax.infer', *flags],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = _read_jsonl(tmp_path / f'{tiny_tasks.TASK_NAME}-{STEPS}.jsonl')
  assert lines == predictions[:BATCH]
