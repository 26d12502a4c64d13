"""Video frames with PyAV (or from a list of frame images, the official data format).

Official Uni-MoE never decodes video during training: each sample lists frame image files (made
beforehand) and every listed frame goes through the CLIP processor. Its demo makes those files with
moviepy: `interval = total_frames // num_frames`, frames `i * interval` for i < num_frames (so a
clip shorter than `num_frames` gives `num_frames` copies of frame 0). Here frames are picked
uniformly over the whole clip instead (`sample_frame_indices`), which includes the last frame,
and a clip shorter than `num_frames` keeps all its frames and repeats the last one.
"""

from typing import Optional, Sequence

import numpy as np

from unimoe_jax.media.errors import MediaError, PathLike, check_readable_file
from unimoe_jax.media import image as image_lib


def sample_frame_indices(num_available: int, num_frames: int) -> np.ndarray:
  """`num_frames` indices into `num_available` frames: round(linspace(0, n - 1, num_frames))
  (numpy rounding) when there are enough, else 0..n-1 followed by copies of n - 1.

  Returns:
    `[num_frames]` int64, non-decreasing.
  """
  if num_available <= 0:
    raise ValueError(f'num_available must be positive, got {num_available}')
  if num_frames <= 0:
    raise ValueError(f'num_frames must be positive, got {num_frames}')
  if num_available < num_frames:
    return np.minimum(np.arange(num_frames), num_available - 1).astype(np.int64)
  return np.round(np.linspace(0, num_available - 1, num_frames)).astype(np.int64)


def _decode_pass(path: str, num_frames: int, assumed_count: Optional[int]):
  """Decodes the first video stream once, keeping the frames `sample_frame_indices` picks for
  `assumed_count` frames (the container's declared count when None; nothing kept if unknown).

  Returns:
    (frame count the picks were made for, frames decoded, {index: [H, W, 3] uint8}).
  """
  import av

  with av.open(path) as container:
    if not container.streams.video:
      raise MediaError('video', path, 'no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    if assumed_count is None:
      assumed_count = max(stream.frames or 0, 0)
    wanted = (
        set(int(i) for i in sample_frame_indices(assumed_count, num_frames))
        if assumed_count > 0
        else set()
    )
    kept = {}
    count = 0
    for frame in container.decode(stream):
      if count in wanted:
        kept[count] = frame.to_ndarray(format='rgb24')
      count += 1
  return assumed_count, count, kept


def load_video_frames(path: PathLike, num_frames: int = 8) -> np.ndarray:
  """Decodes `num_frames` frames spread uniformly over the first video stream of a file.

  The frames are picked for the count the container declares and kept during a single decoding
  pass; when the decoded count differs (or none is declared) the file is decoded again with the
  true count, so wrong metadata never changes which frames come back.

  Returns:
    `[num_frames, height, width, 3]` uint8 RGB.

  Raises:
    MediaError: missing, empty, undecodable (including truncated containers), no video stream,
      or no frames.
  """
  import av

  path = check_readable_file('video', path)
  if num_frames <= 0:
    raise ValueError(f'num_frames must be positive, got {num_frames}')
  try:
    assumed, count, kept = _decode_pass(path, num_frames, None)
    if count == 0:
      raise MediaError('video', path, 'zero-length video (no frames decoded)')
    if assumed != count:
      _, recount, kept = _decode_pass(path, num_frames, count)
      if recount != count:
        raise MediaError('video', path, f'decoded {recount} frames after {count} on a first pass')
  except MediaError:
    raise
  except (av.FFmpegError, OSError, ValueError, EOFError) as e:
    raise MediaError('video', path, str(e) or type(e).__name__) from None
  return np.stack([kept[int(i)] for i in sample_frame_indices(count, num_frames)])


def load_frame_list(paths: Sequence[PathLike], num_frames: Optional[int] = 8) -> np.ndarray:
  """Loads a video stored as frame image files (the official `"video": [frame paths]` format).

  Args:
    paths: frame image files in temporal order.
    num_frames: frames to return, picked from `paths` with `sample_frame_indices`; None keeps
      every listed frame, as the official loader does.

  Returns:
    `[num_frames, height, width, 3]` uint8 RGB. All chosen frames must share one size.

  Raises:
    MediaError: a frame file is missing, empty, undecodable, or of a different size (named).
  """
  paths = list(paths)
  if not paths:
    raise ValueError('load_frame_list needs at least one frame path')
  chosen = range(len(paths)) if num_frames is None else sample_frame_indices(len(paths), num_frames)
  frames = {}
  for index in sorted(set(int(i) for i in chosen)):
    frames[index] = np.asarray(image_lib.load_image(paths[index]))
  first = paths[int(chosen[0])]
  shape = frames[int(chosen[0])].shape
  for index, frame in frames.items():
    if frame.shape != shape:
      raise MediaError(
          'image',
          paths[index],
          f'frame size {frame.shape[1]}x{frame.shape[0]} differs from '
          f'{shape[1]}x{shape[0]} of {first}',
      )
  return np.stack([frames[int(i)] for i in chosen])


def preprocess_video(
    frames: np.ndarray,
    size: int = 336,
    mode: str = 'crop',
    mean: Sequence[float] = image_lib.CLIP_MEAN,
    std: Sequence[float] = image_lib.CLIP_STD,
) -> np.ndarray:
  """CLIP preprocessing of every frame (as the official loader), `[T, H, W, 3]` uint8 ->
  `[T, size, size, 3]` float32."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'frames must be [frames, height, width, 3], got {frames.shape}')
  return np.stack(
      [image_lib.preprocess_image(f, size=size, mode=mode, mean=mean, std=std) for f in frames]
  )
