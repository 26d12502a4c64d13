"""t5x's own binaries (t5x.train / t5x.eval / t5x.infer) on the tiny model, as subprocesses.

Each binary runs as `python -m t5x.<binary>` in a child process, so gin's config lock and the
binary's own `__main__` are real. The commands are the gin files' header commands, parsed from
the files and run as written but for the output folder (/tmp/unimoe_t5x -> a temp dir).
Needs t5x: run in the environment `tools/t5x_env.sh` builds (`--test` runs this file); skipped
without it, a failure with UNIMOE_REQUIRE_T5X=1.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

from t5x_support import require_t5x

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER_DIR = '/tmp/unimoe_t5x'
LENGTHS = (
    "{'targets': 128, 'image_features': 2, 'video_features': 1, 'speech_features': 1, "
    "'audio_features': 1}"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  require_t5x()
  data = tmp_path_factory.mktemp('sample')
  subprocess.run(
      [sys.executable, os.path.join(REPO, 'tools', 'make_sample_data.py'), '--output', str(data)],
      check=True,
      capture_output=True,
  )
  env = dict(os.environ, UNIMOE_SAMPLE_DATA=str(data), TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)  # Each run sets its own device count.
  return env


def header_command(gin_file: str, out_dir: str):
  """The `python -m t5x....` command in `gin_file`'s header, with its output folder moved."""
  lines = open(os.path.join(REPO, 'gin', gin_file)).read().splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith('#   python -m t5x.'))
  command = ''
  for line in lines[start:]:
    text = line[1:].strip()
    command += ' ' + text.rstrip('\\')
    if not text.endswith('\\'):
      break
  return shlex.split(command.replace(HEADER_DIR, out_dir))[1:]  # Without 'python'.


def run(args, env, devices=1, timeout=900, expect_ok=True):
  """Runs `python <args>` from the checkout's root; returns (returncode, combined output)."""
  child_env = dict(
      env,
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
      '--xla_backend_optimization_level=0',
  )
  proc = subprocess.run(
      [sys.executable] + list(args),
      cwd=REPO,
      env=child_env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  output = proc.stdout + proc.stderr
  if expect_ok and proc.returncode != 0:
    pytest.fail(f'{" ".join(args[:2])} exited {proc.returncode}:\n{output[-6000:]}')
  return proc.returncode, output


def replace_flag(args, flag, value):
  """`args` with `--gin.<flag>=...` (or `--gin_file=<old>` for flag 'gin_file:<old>') set."""
  if flag.startswith('gin_file:'):
    old = flag.split(':', 1)[1]
    return [f'--gin_file={value}' if a == f'--gin_file={old}' else a for a in args]
  prefix = f'--gin.{flag}='
  return [a for a in args if not a.startswith(prefix)] + [prefix + value]


def train_losses(model_dir):
  """{step: loss} from t5x's TensorBoard summaries of the 'train' collection."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  losses = {}
  for name in sorted(os.listdir(os.path.join(model_dir, 'train'))):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(model_dir, 'train', name)):
      for value in event.summary.value:
        if value.tag == 'loss':
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def infer_lines(infer_dir):
  paths = [os.path.join(infer_dir, f) for f in os.listdir(infer_dir) if '.jsonl' in f]
  assert paths, os.listdir(infer_dir)
  return [json.loads(l) for p in paths for l in open(p)]


STAGES = {
    # stage gin file: (model file for its eval / infer, extra bindings of its train run)
    'stage1_align': 't5x/models/tiny.gin',
    'stage2_expert': 't5x/models/tiny.gin',
    'stage3_unimoe': 't5x/models/unimoe_tiny.gin',
}


@pytest.mark.parametrize('stage', sorted(STAGES))
def test_stage_train_eval_infer_from_header_commands(stage, env, tmp_path):
  """Each stage's header command trains 20 steps and checkpoints; t5x.eval and t5x.infer
  (predict and score), from runs/eval.gin's and runs/infer.gin's headers, run on that
  checkpoint with the stage's model; every line of infer's output has prompt and reference."""
  out = str(tmp_path)
  train = header_command(f't5x/stages/{stage}.gin', out)
  run(train, env)
  model_dir = next(a.split('=', 1)[1].strip("'") for a in train if a.startswith('--gin.MODEL_DIR='))
  assert os.path.isdir(os.path.join(model_dir, 'checkpoint_20')), os.listdir(model_dir)
  assert len(train_losses(model_dir)) >= 1
  checkpoint = f"'{model_dir}/checkpoint_20'"

  evaluate = header_command('t5x/runs/eval.gin', out)
  evaluate = replace_flag(evaluate, 'gin_file:t5x/models/unimoe_tiny.gin', STAGES[stage])
  evaluate = replace_flag(evaluate, 'CHECKPOINT_PATH', checkpoint)
  evaluate = replace_flag(evaluate, 'MIXTURE_OR_TASK_NAME', "'unimoe_sample_eval_image_open'")
  run(evaluate, env)
  metrics = os.path.join(
      out, 'eval', 'inference_eval', 'unimoe_sample_eval_image_open-metrics.jsonl'
  )
  record = json.loads(open(metrics).readline())  # seqio's JSONLogger, one file per task
  assert record['step'] == 20 and 'exact_match' in record, record

  for mode in ('predict', 'score'):
    infer = header_command('t5x/runs/infer.gin', out)
    infer = replace_flag(infer, 'gin_file:t5x/models/unimoe_tiny.gin', STAGES[stage])
    infer = replace_flag(infer, 'CHECKPOINT_PATH', checkpoint)
    infer = replace_flag(infer, 'INFER_OUTPUT_DIR', f"'{out}/infer_{mode}'")
    infer = replace_flag(infer, 'infer.mode', f"'{mode}'")
    run(infer, env)
    lines = infer_lines(f'{out}/infer_{mode}')
    manifest = os.path.join(env['UNIMOE_SAMPLE_DATA'], 'validation', 'eval_image_open.json')
    assert len(lines) == len(json.load(open(manifest)))  # Every example, none dropped.
    for line in lines:
      assert '<image>' in line['inputs']['inputs_pretokenized'], line
      assert line['inputs']['targets_pretokenized'], line
      assert ('prediction' if mode == 'predict' else 'score') in line, line


def test_train_eval_infer_header_chain_verbatim(env, tmp_path):
  """runs/train.gin's header, then runs/eval.gin's and runs/infer.gin's on its checkpoint,
  exactly as written (only /tmp/unimoe_t5x moved)."""
  out = str(tmp_path)
  run(header_command('t5x/runs/train.gin', out), env)
  assert os.path.isdir(f'{out}/checkpoint_20')
  run(header_command('t5x/runs/eval.gin', out), env)
  run(header_command('t5x/runs/infer.gin', out), env)
  lines = infer_lines(f'{out}/infer')
  assert lines and all(l['inputs']['targets_pretokenized'] for l in lines)


def _stage3_args(model_dir, steps, *extra):
  return [
      '-m',
      't5x.train',
      '--gin_search_paths=gin',
      '--gin_file=t5x/models/unimoe_tiny.gin',
      '--gin_file=t5x/stages/stage3_unimoe.gin',
      f"--gin.MODEL_DIR='{model_dir}'",
      f'--gin.TRAIN_STEPS={steps}',
      "--gin.MIXTURE_OR_TASK_NAME='unimoe_sample_stage3'",
      f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}',
      # Deterministic and comparable: no shuffling, a fixed mixture seed, no dropout,
      # a loss per step (no train-eval), one checkpoint at the end.
      '--gin.SHUFFLE_TRAIN_EXAMPLES=False',
      '--gin.train/utils.DatasetConfig.seed=0',
      '--gin.config.LoRAConfig.dropout=0.0',
      '--gin.train.train_eval_dataset_cfg=None',
      '--gin.train.stats_period=1',
      f'--gin.utils.SaveCheckpointConfig.period={steps}',
      *extra,
  ]


def _assert_same_losses(got, want, rtol):
  steps = sorted(want)
  assert sorted(got) == steps, (sorted(got), steps)
  assert len(steps) >= 10, steps
  a, b = np.array([got[s] for s in steps]), np.array([want[s] for s in steps])
  assert len(set(b.tolist())) > 1, b  # The losses move: the steps do train.
  np.testing.assert_allclose(a, b, rtol=rtol)
  return float(np.max(np.abs(a - b) / np.abs(b)))


def _expert_parallel_run(model_dir, env, steps, *extra):
  """Trains stage 3 for `steps` on 8 CPU devices with t5x's MoE partitioner (data=2,
  expert=4, checked in the log); returns t5x's model-info.txt (each variable's partition)."""
  _, output = run(
      _stage3_args(
          model_dir,
          steps,
          '--gin.MESH=@unimoe_jax.partitioning.MeshConfig()',
          '--gin.unimoe_jax.partitioning.MeshConfig.expert=4',
          *extra,
      ),
      env,
      devices=8,
  )
  assert "{'data': 2, 'expert': 4, 'model': 1}" in output, output[-3000:]
  return open(os.path.join(model_dir, 'model-info.txt')).read()


@pytest.fixture(scope='module')
def one_device_run(env, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('one_device'))
  run(_stage3_args(model_dir, 10), env, devices=1)
  return train_losses(model_dir)


def test_expert_parallel_run_equals_one_device(env, tmp_path, one_device_run):
  """8 CPU devices, t5x's MoE partitioner with data=2, expert=4: the train state puts the
  expert kernels on `expert` (t5x's model-info.txt), and the first 10 losses equal the
  1-device run's within 1e-5 relative."""
  model_dir = str(tmp_path)
  info = _expert_parallel_run(model_dir, env, 10)
  kernels = re.findall(r'Variable (decoder/layers_\d+/moe/w\w+/kernel) .*partition spec (.*)', info)
  print('\n'.join(f'{name}: {spec}' for name, spec in kernels))
  assert len(kernels) == 6
  assert all(spec.startswith("('expert',") for _, spec in kernels), kernels
  worst = _assert_same_losses(train_losses(model_dir), one_device_run, rtol=1e-5)
  print(f'8 devices vs 1: largest relative loss difference {worst:.2e}')


def test_scanned_fsdp_expert_parallel_run_equals_one_device(env, tmp_path):
  """The 7B files' settings on the tiny model: scanned layers, FSDP and experts split
  (data=2, expert=4 on 8 CPU devices) under t5x.train. The train state holds the stacked
  layout (decoder/stacked_layers, FSDP's 'data' on the experts' embed axis) and the first 10
  losses equal a scanned 1-device run's within 1e-5 relative. (Scanned layers initialise
  from per-layer keys of their own, so the looped runs above start elsewhere; scanned equals
  looped for the same weights in tests/decoder_scan_test.py.)"""
  scan = '--gin.unimoe_jax.config.DecoderConfig.scan_layers=True'
  one_device_dir = str(tmp_path / 'one_device')
  run(_stage3_args(one_device_dir, 10, scan), env, devices=1)
  model_dir = str(tmp_path / 'fsdp')
  info = _expert_parallel_run(
      model_dir, env, 10, scan, '--gin.unimoe_jax.partitioning.logical_axis_rules.fsdp=True'
  )
  kernels = re.findall(
      r'Variable (decoder/stacked_layers/offset_0/moe/w\w+/kernel) .*partition spec (.*)', info
  )
  print('\n'.join(f'{name}: {spec}' for name, spec in kernels))
  assert len(kernels) == 3, info[-3000:]
  for name, spec in kernels:
    want = (
        "(None, 'expert', 'model', 'data')"
        if '/wo/' in name
        else "(None, 'expert', 'data', 'model')"
    )
    assert spec == want, (name, spec)
  worst = _assert_same_losses(train_losses(model_dir), train_losses(one_device_dir), rtol=1e-5)
  print(
      f'scanned + FSDP on 8 devices vs scanned on 1: largest relative loss difference '
      f'{worst:.2e}'
  )


def test_microbatches_give_the_one_batch_update(env, tmp_path, one_device_run):
  """num_microbatches=2 sums two half-batch gradients; each half's loss is its part of the
  whole batch's (models.with_batch_totals), so losses equal the 1-microbatch run's."""
  model_dir = str(tmp_path)
  run(_stage3_args(model_dir, 10, '--gin.t5x_moe.MoeTrainer.num_microbatches=2'), env)
  worst = _assert_same_losses(train_losses(model_dir), one_device_run, rtol=1e-5)
  print(f'2 microbatches vs 1: largest relative loss difference {worst:.2e}')


def test_resume_continues_from_the_latest_checkpoint(env, tmp_path):
  """A run stopped at step 5 and restarted to 10 resumes at step 5 (t5x restores the latest
  checkpoint of MODEL_DIR) and writes checkpoint_10."""
  model_dir = str(tmp_path)
  run(_stage3_args(model_dir, 5), env)
  _, output = run(_stage3_args(model_dir, 10) + ['--gin.utils.SaveCheckpointConfig.period=5'], env)
  assert os.path.isdir(os.path.join(model_dir, 'checkpoint_10'))
  assert re.search(r'[Rr]estor\w* .*checkpoint_5', output), output[-3000:]
  assert sorted(train_losses(model_dir)) == list(range(1, 11))


def test_a_length_that_drops_every_example_fails_fast_naming_the_setting(env, tmp_path):
  """'targets': 16 fits no sample example: t5x.train exits non-zero within 60 s (the whole
  process: imports, model init, compile), naming TASK_FEATURE_LENGTHS (it used to loop
  forever)."""
  args = _stage3_args(str(tmp_path), 10)
  args = replace_flag(
      args, 'TASK_FEATURE_LENGTHS', LENGTHS.replace("'targets': 128", "'targets': 16")
  )
  start = time.time()
  returncode, output = run(args, env, timeout=240, expect_ok=False)
  elapsed = time.time() - start
  assert returncode != 0
  assert 'TASK_FEATURE_LENGTHS' in output, output[-3000:]
  print(f't5x.train with every example too long: exit {returncode} after {elapsed:.0f} s')
  assert elapsed < 60


def test_t5x_train_and_our_trainer_give_the_same_losses(env, tmp_path):
  """One model interface, two trainers: 20 steps of stage 3 on the same data (shuffling off,
  the same seed, no dropout) under t5x.train and under python -m unimoe_jax.train."""
  t5x_dir, our_dir = str(tmp_path / 't5x'), str(tmp_path / 'ours')
  run(_stage3_args(t5x_dir, 20), env)
  run(
      [
          '-m',
          'unimoe_jax.train',
          '--gin_file=models/tiny.gin',
          '--gin_file=models/multimodal_tiny.gin',
          '--gin_file=stages/stage3_unimoe.gin',
          '--gin_file=demo/tiny.gin',
          f"--gin.MODEL_DIR='{our_dir}'",
          '--gin.TRAIN_STEPS=20',
          "--gin.MIXTURE_OR_TASK_NAME='unimoe_sample_stage3'",
          f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}',
          '--gin.SHUFFLE_TRAIN_EXAMPLES=False',
          '--gin.RANDOM_SEED=0',
          '--gin.config.LoRAConfig.dropout=0.0',
          '--gin.loop.train.log_period=1',
      ],
      env,
  )
  worst = _assert_same_losses(train_losses(our_dir), train_losses(t5x_dir), rtol=1e-5)
  print(f'unimoe_jax.train vs t5x.train, 20 steps: largest relative loss difference {worst:.2e}')


_PLAN_7B = r"""
import sys
import __main__
import gin
import jax
from t5x import gin_utils, utils
from t5x import train as t5x_train

__main__.train = t5x_train.train  # What `python -m t5x.train` makes of its own main.
gin_files, bindings = sys.argv[1].split(','), sys.argv[2:]
gin_utils.parse_gin_flags(['gin', t5x_train._DEFAULT_GIN_SEARCH_PATHS[0]], gin_files, bindings)
model = gin.query_parameter('%MODEL').scoped_configurable_fn()
partitioner = gin.query_parameter('train.partitioner').scoped_configurable_fn()
shapes = {k: (16, 2048) for k in ('decoder_input_tokens', 'decoder_target_tokens',
                                  'decoder_loss_weights')}
initializer = utils.TrainStateInitializer(
    optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
    input_shapes=shapes, partitioner=partitioner)
axes = initializer.train_state_axes
print('MESH', dict(partitioner.mesh.shape))
# The 7B files scan their layers: one stacked leaf [32, expert, in, out] per kernel.
moe = axes.params['decoder']['stacked_layers']['offset_0']['moe']
for name in ('wi_0', 'wi_1', 'wo'):
  print('SPEC', 'stacked', name, tuple(moe[name]['kernel']))
print('EXPERTS', model.config.decoder.moe.num_experts)
"""


@pytest.mark.parametrize('experts,mesh', [(4, (4, 4, 2)), (8, (2, 8, 2))])
def test_7b_files_put_experts_on_the_expert_axis_under_t5x(env, experts, mesh):
  """The 7B stage-3 files under t5x.train's own gin parsing (config locked) on a simulated
  32-chip slice: t5x's train state (abstract) puts every expert kernel on `expert`."""
  files = f't5x/models/unimoe_7b_{experts}e.gin,t5x/stages/stage3_unimoe.gin'
  _, output = run(
      [
          '-c',
          _PLAN_7B,
          files,
          "MODEL_DIR = '/tmp/unused'",
          'TRAIN_STEPS = 10',
          "MIXTURE_OR_TASK_NAME = 'unimoe_sample_stage3'",
          "TASK_FEATURE_LENGTHS = {'targets': 2048}",
      ],
      env,
      devices=32,
  )
  data, expert, model = mesh
  assert f"MESH {{'data': {data}, 'expert': {expert}, 'model': {model}}}" in output, output[-3000:]
  assert f'EXPERTS {experts}' in output
  specs = re.findall(r'SPEC (\S+) (\S+) (.*)', output)
  assert len(specs) == 3
  for layer, name, spec in specs:
    # Stacked on the replicated 'layers' axis; FSDP (on in the 7B files) splits 'embed' over data.
    want = (
        "(None, 'expert', 'model', 'data')" if name == 'wo' else "(None, 'expert', 'data', 'model')"
    )
    assert spec == want, (layer, name, spec)


def test_stage2_starts_from_stage1_parameters_with_the_header_restore_flags(env, tmp_path):
  """runs/train.gin's restore flags: stage 2 starts from stage 1's t5x checkpoint, taking its
  parameters (the connectors stage 1 trained, frozen in stage 2) and not its optimizer state
  (another set of trainable parameters) or step."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  lines = open(os.path.join(REPO, 'gin', 't5x', 'runs', 'train.gin')).read().splitlines()
  restore = [
      shlex.split(l[1:].strip().rstrip('\\'))[0]
      for l in lines
      if l.startswith('#   --gin.utils.RestoreCheckpointConfig.')
  ]
  assert len(restore) == 4, restore
  stage1, stage2 = str(tmp_path / 'stage1'), str(tmp_path / 'stage2')
  common = [f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}', '--gin.train.train_eval_dataset_cfg=None']
  run(
      [
          '-m',
          't5x.train',
          '--gin_search_paths=gin',
          '--gin_file=t5x/models/tiny.gin',
          '--gin_file=t5x/stages/stage1_align.gin',
          f"--gin.MODEL_DIR='{stage1}'",
          '--gin.TRAIN_STEPS=4',
          "--gin.MIXTURE_OR_TASK_NAME='unimoe_sample_stage1'",
          '--gin.utils.SaveCheckpointConfig.period=4',
          *common,
      ],
      env,
  )
  restore = [a.replace('/runs/stage1/checkpoint_20', f'{stage1}/checkpoint_4') for a in restore]
  run(
      [
          '-m',
          't5x.train',
          '--gin_search_paths=gin',
          '--gin_file=t5x/models/tiny.gin',
          '--gin_file=t5x/stages/stage2_expert.gin',
          "--gin.EXPERT_MODALITY='image'",
          f"--gin.MODEL_DIR='{stage2}'",
          '--gin.TRAIN_STEPS=2',
          '--gin.utils.SaveCheckpointConfig.period=2',
          *common,
          *restore,
      ],
      env,
  )

  def params(path):
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(path, 'state'))
    return {
        k: np.asarray(v)
        for k, v in traverse_util.flatten_dict(tree, sep='/').items()
        if k.startswith('target/')
    }

  init, trained, after = (
      params(f'{stage1}/checkpoint_0'),
      params(f'{stage1}/checkpoint_4'),
      params(f'{stage2}/checkpoint_2'),
  )
  projector = [k for k in trained if k.startswith('target/vision_projector/')]
  ffn = [k for k in trained if re.match(r'target/decoder/layers_\d+/mlp/', k)]
  assert projector and ffn
  for k in projector:  # Trained in stage 1, frozen in stage 2: stage 1's value.
    assert not np.array_equal(trained[k], init[k]), k
    np.testing.assert_array_equal(after[k], trained[k], err_msg=k)
  for k in ffn:  # Frozen in stage 1, trained in stage 2 from stage 1's value.
    np.testing.assert_array_equal(trained[k], init[k], err_msg=k)
    assert not np.array_equal(after[k], trained[k]), k
