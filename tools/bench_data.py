"""Benchmark of media preprocessing: examples/s of unimoe_jax.media next to transformers.

Each row times one example's full path from a file on disk to the model's input array, in one
process, with time.perf_counter over --iters calls after --warmup calls (the files cycle over
4 distinct inputs, so the page cache holds them all, as in a warm data loader):

  image jpeg|png crop   transformers: PIL open + CLIPImageProcessor (PIL backend when torchvision
                        is missing, which is what the official code gets) | ours: load_image +
                        preprocess_image(mode='crop'); 640x480, output 336x336
  image jpeg pad        official path: PIL open + expand2square + CLIPImageProcessor | ours:
                        load_image + preprocess_image(mode='pad')
  image jpeg crop xN    ours through a multiprocessing Pool of N spawned workers (--workers;
                        0 drops it), the offline path: once with the [336, 336, 3] float32
                        arrays pickled back to the parent (what a loader feeding a trainer
                        pays), once with them kept in the workers (what a job writing shards
                        from each worker pays)
  speech (whisper)      transformers: soundfile.read + WhisperFeatureExtractor (80 mels; it
                        uses torch.stft when torch is installed) | ours: load_audio +
                        whisper_log_mel; 10 s 16 kHz mono WAV (padded to 30 s = 3000 frames)
  audio (beats)         ours: load_audio + beats_fbank (no transformers processor exists; the
                        official one is torchaudio's kaldi.fbank); same WAV, 998 frames
  video                 both decode --num-frames frames with load_video_frames (PyAV) from a 2 s
                        25 fps 640x480 H.264 mp4; transformers: CLIPImageProcessor on the frames
                        | ours: preprocess_video

'vs transformers' = our examples/s / the transformers row's examples/s for the same case (> 1:
ours is faster; the Pool rows compare with the single-process transformers row, so a ratio
above the single-process unimoe_jax row's shows parallel scaling). Inputs are generated in a
temporary directory; nothing is downloaded.

  python tools/bench_data.py                  # ~30 s on 2 cores
  python tools/bench_data.py --quick --json /tmp/rows.json
Times are wall clock; numpy's BLAS and torch may use several threads in the single-process
rows (the header prints the thread counts), so on a loaded machine other work inflates them.
"""

import argparse
import functools
import itertools
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

import numpy as np

import bench_common

from unimoe_jax.media import audio as audio_lib
from unimoe_jax.media import image as image_lib
from unimoe_jax.media import video as video_lib

NUM_DISTINCT_INPUTS = 4
IMAGE_WIDTH, IMAGE_HEIGHT = 640, 480
AUDIO_SECONDS = 10
SAMPLE_RATE = audio_lib.SAMPLE_RATE  # A file at the loaders' rate: no resampling in the timings.
VIDEO_SECONDS, VIDEO_FPS = 2, 25
WHISPER_MELS = 80


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
      '--iters', type=int, default=None, help='timed calls per row (default 20; 3 with --quick)'
  )
  parser.add_argument(
      '--warmup',
      type=int,
      default=None,
      help='untimed calls per row first (default 3; 1 with --quick)',
  )
  parser.add_argument(
      '--quick', action='store_true', help='few iterations (a smoke run); input sizes are unchanged'
  )
  parser.add_argument(
      '--workers',
      type=int,
      default=None,
      help='processes for the image Pool row (default: CPU count, at least 2; ' '0 drops the row)',
  )
  parser.add_argument('--size', type=int, default=336, help='CLIP input side')
  parser.add_argument('--num-frames', type=int, default=8, help='video frames per example')
  parser.add_argument('--json', default=None, help='also write the rows (and setup) here')
  args = parser.parse_args(argv)
  if args.iters is None:
    args.iters = 3 if args.quick else 20
  if args.warmup is None:
    args.warmup = 1 if args.quick else 3
  if args.workers is None:
    args.workers = max(2, os.cpu_count() or 1)
  if args.iters < 1 or args.warmup < 0 or args.workers < 0:
    parser.error('--iters must be >= 1, --warmup and --workers >= 0')
  return args


# ------------------------------------------------------------------------------------------------
# Inputs.


def _synthetic_rgb(seed: int, width: int, height: int, phase: float = 0.0) -> np.ndarray:
  """A photo-like uint8 [height, width, 3] image: smooth colour fields, edges and mild noise, so
  JPEG/PNG sizes (and decode costs) resemble real photos rather than flat or white-noise ones."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  channels = []
  for c in range(3):
    fx, fy = rng.uniform(1, 6, size=2)
    field = np.sin(2 * np.pi * (fx * x / width + phase) + c) * np.cos(2 * np.pi * fy * y / height)
    channels.append(field)
  rgb = 127.5 + 90 * np.stack(channels, axis=-1)
  for _ in range(6):  # rectangles give sharp edges
    x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
    rgb[y0 : y0 + rng.integers(20, 160), x0 : x0 + rng.integers(20, 160)] = rng.uniform(0, 255, 3)
  rgb += rng.normal(0, 6, rgb.shape)
  return np.clip(rgb, 0, 255).astype(np.uint8)


def _write_wav(path: str, seed: int) -> None:
  import soundfile

  rng = np.random.default_rng(seed)
  t = np.arange(AUDIO_SECONDS * SAMPLE_RATE) / SAMPLE_RATE
  sweep = np.sin(2 * np.pi * (200 + 150 * t) * t) * (0.5 + 0.4 * np.sin(2 * np.pi * 3 * t))
  wave = 0.3 * sweep + 0.02 * rng.standard_normal(t.shape)
  soundfile.write(path, wave.astype(np.float32), SAMPLE_RATE, subtype='PCM_16')


def _write_mp4(path: str, seed: int) -> None:
  """H.264 (libx264, default 'medium' preset; mpeg4 if libx264 is missing), yuv420p: one
  synthetic picture panning 6 px per frame, so inter-frame prediction has real motion."""
  import av

  base = _synthetic_rgb(seed, IMAGE_WIDTH, IMAGE_HEIGHT)
  with av.open(path, mode='w') as container:
    codec = 'libx264' if 'libx264' in av.codecs_available else 'mpeg4'
    stream = container.add_stream(codec, rate=VIDEO_FPS)
    stream.width, stream.height, stream.pix_fmt = IMAGE_WIDTH, IMAGE_HEIGHT, 'yuv420p'
    for index in range(VIDEO_SECONDS * VIDEO_FPS):
      rgb = np.roll(base, 6 * index, axis=1)
      for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def make_inputs(directory: str, num_clips: int = 2) -> dict:
  """Writes NUM_DISTINCT_INPUTS files per kind (`num_clips` mp4 files: one clip is already 50
  frames and each takes ~1.5 s to encode); returns {'jpeg'|'png'|'wav'|'mp4': [paths]}."""
  from PIL import Image

  files = {'jpeg': [], 'png': [], 'wav': [], 'mp4': []}
  for i in range(NUM_DISTINCT_INPUTS):
    image = Image.fromarray(_synthetic_rgb(i, IMAGE_WIDTH, IMAGE_HEIGHT))
    files['jpeg'].append(os.path.join(directory, f'image{i}.jpg'))
    image.save(files['jpeg'][-1], quality=90)
    files['png'].append(os.path.join(directory, f'image{i}.png'))
    image.save(files['png'][-1])
    files['wav'].append(os.path.join(directory, f'speech{i}.wav'))
    _write_wav(files['wav'][-1], i)
  for i in range(num_clips):
    files['mp4'].append(os.path.join(directory, f'clip{i}.mp4'))
    _write_mp4(files['mp4'][-1], 100 + i)
  return files


# ------------------------------------------------------------------------------------------------
# The functions timed: each takes one path and returns the model-ready array.


def official_expand2square(image, color):
  """LLaVA's expand2square, as the official Uni-MoE data.py inlines it before the CLIP processor
  (also the reference of tests/media_test.py): `image` (PIL) centred on a square of `color`."""
  from PIL import Image

  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = Image.new(image.mode, (side, side), color)
  canvas.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
  return canvas


def hf_image(path, processor, pad=False):
  from PIL import Image

  image = Image.open(path).convert('RGB')
  if pad:
    image = official_expand2square(image, tuple(int(m * 255) for m in processor.image_mean))
  return processor(images=image, return_tensors='np')['pixel_values'][0]


def our_image(path, size, mode):
  return image_lib.preprocess_image(image_lib.load_image(path), size=size, mode=mode)


def hf_speech(path, extractor):
  import soundfile

  wave, rate = soundfile.read(path, dtype='float32')
  return extractor(wave, sampling_rate=rate, return_tensors='np')['input_features'][0]


def our_speech(path):
  return audio_lib.whisper_log_mel(audio_lib.load_audio(path), n_mels=WHISPER_MELS)


def our_audio(path):
  return audio_lib.beats_fbank(audio_lib.load_audio(path))


def hf_video(path, processor, num_frames):
  frames = video_lib.load_video_frames(path, num_frames)
  return processor(images=list(frames), return_tensors='np')['pixel_values']


def our_video(path, size, num_frames):
  return video_lib.preprocess_video(video_lib.load_video_frames(path, num_frames), size=size)


# ------------------------------------------------------------------------------------------------
# Timing.


def time_single(fn, paths, iters, warmup):
  """Times `iters` calls of fn(path), paths cycled, after `warmup` untimed calls.

  Returns:
    (total seconds of the timed calls, median seconds of one call). The total gives the
    examples/s column; the median, less sensitive to other load on a shared machine, is kept too.
  """
  cycled = itertools.cycle(paths)
  durations = bench_common.call_seconds(lambda: fn(next(cycled)), iters, warmup)
  return sum(durations), statistics.median(durations)


def _warm_up_worker(fn, path, barrier):
  fn(path)  # imports and first-call caches, outside the timed region
  barrier.wait()


def _preprocess_in_worker(path, size):
  """The offline path's worker side without the transfer: the array stays in the worker (which
  would write it to a shard); only its shape goes back."""
  return image_lib.load_and_preprocess_image(path, size=size, mode='crop').shape


def time_pool(fn, paths, examples, workers) -> float:
  """Seconds for a Pool of `workers` spawned processes to map fn over `examples` paths. Each
  worker runs fn once and meets the others at a barrier before the clock starts, so process
  start-up and imports are not timed; the results (float32 arrays) travel back pickled."""
  context = multiprocessing.get_context('spawn')  # No fork of a process holding torch threads.
  barrier = context.Barrier(workers + 1)
  with context.Pool(workers, initializer=_warm_up_worker, initargs=(fn, paths[0], barrier)) as pool:
    barrier.wait()
    work = [paths[i % len(paths)] for i in range(examples)]
    start = time.perf_counter()
    pool.map(fn, work, chunksize=max(1, examples // (4 * workers)))
    return time.perf_counter() - start


def run(args, files):
  """Runs every row; returns a list of row dicts (without the ratios)."""
  import transformers

  clip = transformers.CLIPImageProcessor(
      size={'shortest_edge': args.size}, crop_size={'height': args.size, 'width': args.size}
  )
  whisper = transformers.WhisperFeatureExtractor(feature_size=WHISPER_MELS)
  clip_name = f'transformers {type(clip).__name__}'
  rows = []

  def add(case, implementation, timing, examples, reference=False):
    seconds, median = timing if isinstance(timing, tuple) else (timing, None)
    rows.append(
        {
            'case': case,
            'implementation': implementation,
            'reference': reference,
            'examples': examples,
            'seconds': seconds,
            'examples_per_s': examples / seconds,
            'ms_per_example': 1e3 * seconds / examples,
            'median_ms': None if median is None else 1e3 * median,
        }
    )
    print(f'  {case:<18} {implementation:<54} {1e3 * seconds / examples:9.2f} ms', flush=True)

  n, w = args.iters, args.warmup
  for kind, mode in (('jpeg', 'crop'), ('jpeg', 'pad'), ('png', 'crop')):
    case = f'image {kind} {mode}'
    add(
        case,
        clip_name + (' + expand2square' if mode == 'pad' else ''),
        time_single(
            functools.partial(hf_image, processor=clip, pad=mode == 'pad'), files[kind], n, w
        ),
        n,
        reference=True,
    )
    add(
        case,
        f'unimoe_jax preprocess_image({mode})',
        time_single(functools.partial(our_image, size=args.size, mode=mode), files[kind], n, w),
        n,
    )
  if args.workers:
    examples = max(n, 4 * args.workers) * args.workers
    returned = functools.partial(image_lib.load_and_preprocess_image, size=args.size, mode='crop')
    kept = functools.partial(_preprocess_in_worker, size=args.size)
    add(
        'image jpeg crop',
        f'unimoe_jax Pool x{args.workers} (arrays returned)',
        time_pool(returned, files['jpeg'], examples, args.workers),
        examples,
    )
    add(
        'image jpeg crop',
        f'unimoe_jax Pool x{args.workers} (arrays kept in workers)',
        time_pool(kept, files['jpeg'], examples, args.workers),
        examples,
    )

  add(
      'speech (whisper)',
      'transformers WhisperFeatureExtractor',
      time_single(functools.partial(hf_speech, extractor=whisper), files['wav'], n, w),
      n,
      reference=True,
  )
  add(
      'speech (whisper)',
      'unimoe_jax whisper_log_mel',
      time_single(our_speech, files['wav'], n, w),
      n,
  )
  add('audio (beats)', 'unimoe_jax beats_fbank', time_single(our_audio, files['wav'], n, w), n)

  video_n, video_w = max(1, n // 2), min(w, 1)  # one clip decode is ~50 images' work
  add(
      'video',
      f'load_video_frames + {clip_name}',
      time_single(
          functools.partial(hf_video, processor=clip, num_frames=args.num_frames),
          files['mp4'],
          video_n,
          video_w,
      ),
      video_n,
      reference=True,
  )
  add(
      'video',
      'unimoe_jax load_video_frames + preprocess_video',
      time_single(
          functools.partial(our_video, size=args.size, num_frames=args.num_frames),
          files['mp4'],
          video_n,
          video_w,
      ),
      video_n,
  )
  return rows


def add_ratios(rows):
  """'vs_transformers' = examples/s / that of the case's transformers row (None if none)."""
  references = {r['case']: r['examples_per_s'] for r in rows if r['reference']}
  for row in rows:
    reference = references.get(row['case'])
    row['vs_transformers'] = None if reference is None else row['examples_per_s'] / reference
  return rows


def format_table(rows) -> str:
  header = (
      f'{"modality":<18} {"implementation":<54} {"examples/s":>10} {"ms/example":>10} '
      f'{"median ms":>9} {"vs transformers":>15}'
  )
  lines = [header, '-' * len(header)]
  for row in rows:
    ratio = '-' if row['vs_transformers'] is None else f'{row["vs_transformers"]:.2f}x'
    median = '-' if row['median_ms'] is None else f'{row["median_ms"]:.2f}'
    lines.append(
        f'{row["case"]:<18} {row["implementation"]:<54} {row["examples_per_s"]:>10.1f} '
        f'{row["ms_per_example"]:>10.2f} {median:>9} {ratio:>15}'
    )
  return '\n'.join(lines)


def setup_info(args) -> dict:
  info = {
      'python': platform.python_version(),
      'machine': platform.machine(),
      'cpu_count': os.cpu_count(),
      'iters': args.iters,
      'warmup': args.warmup,
      'workers': args.workers,
      'size': args.size,
      'num_frames': args.num_frames,
  }
  try:
    import torch

    info['torch_threads'] = torch.get_num_threads()
  except ImportError:
    pass
  try:
    from threadpoolctl import threadpool_info

    info['numpy_blas_threads'] = max((p['num_threads'] for p in threadpool_info()), default=None)
  except ImportError:
    pass
  return info


def main(argv=None):
  args = parse_args(argv)
  with tempfile.TemporaryDirectory(prefix='bench_data_') as directory:
    start = time.perf_counter()
    files = make_inputs(directory, num_clips=1 if args.quick else 2)
    print(
        f'inputs: {NUM_DISTINCT_INPUTS} x {IMAGE_WIDTH}x{IMAGE_HEIGHT} JPEG/PNG, '
        f'{AUDIO_SECONDS} s {SAMPLE_RATE} Hz WAV; {len(files["mp4"])} x {VIDEO_SECONDS} s '
        f'{VIDEO_FPS} fps mp4 ({time.perf_counter() - start:.1f} s to write)',
        flush=True,
    )
    rows = add_ratios(run(args, files))
  info = setup_info(args)
  print(' '.join(f'{k}={v}' for k, v in info.items()))
  print(format_table(rows))
  bench_common.write_json(args.json, {'setup': info, 'rows': rows})
  return rows


if __name__ == '__main__':
  main()
