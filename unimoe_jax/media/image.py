"""Image loading and CLIP preprocessing with Pillow and numpy (channels-last).

`preprocess_image` reproduces `transformers.CLIPImageProcessor` (the PIL backend, which is what
transformers uses without torchvision) step by step with the same Pillow resize call, so the two
agree to float32 rounding:

  1. resize so the shortest side is `size`; the long side becomes int(size * long / short)
     (truncation, as transformers' `get_resize_output_image_size`), Pillow bicubic;
  2. centre crop `size` x `size` with top = (height - size) // 2, left = (width - size) // 2;
  3. rescale: uint8 -> float64 * (1 / 255) -> float32;
  4. normalise: (x - mean) / std in float32.

mode='pad' first applies LLaVA's `expand2square` (official Uni-MoE `train/data.py`, used when
`image_aspect_ratio == 'pad'`): the image is pasted centred onto a square canvas filled with the
mean colour as ints, `tuple(int(m * 255) for m in mean)`.
"""

from typing import Sequence

import numpy as np

from unimoe_jax.media.errors import MediaError, PathLike, check_readable_file

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESS_MODES = ('crop', 'pad')


def load_image(path: PathLike):
  """Decodes an image file into an RGB `PIL.Image.Image`.

  Raises:
    MediaError: the file is missing, empty, or Pillow cannot decode it (including truncated data,
      which Pillow only notices when the pixels are read, so they are read here).
  """
  from PIL import Image, UnidentifiedImageError

  path = check_readable_file('image', path)
  try:
    with Image.open(path) as image:
      image.load()
      rgb = image.convert('RGB')
  except UnidentifiedImageError:
    raise MediaError('image', path, 'cannot identify image file') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise MediaError('image', path, str(e) or type(e).__name__) from None
  if rgb.width == 0 or rgb.height == 0:
    raise MediaError('image', path, f'zero-size image {rgb.width}x{rgb.height}')
  return rgb


def expand_to_square(image, background_color: Sequence[int]):
  """LLaVA's expand2square: pads the short side equally on both sides (the extra pixel, if the
  difference is odd, goes to the right/bottom) with `background_color`."""
  from PIL import Image

  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = Image.new(image.mode, (side, side), tuple(background_color))
  canvas.paste(image, ((side - width) // 2, (side - height) // 2))
  return canvas


def pad_color(mean: Sequence[float] = CLIP_MEAN) -> tuple:
  """The padding colour the official code uses: the normalisation mean as 0..255 ints (truncated)."""
  return tuple(int(m * 255) for m in mean)


def _as_rgb_pil(image):
  from PIL import Image

  if isinstance(image, Image.Image):
    return image.convert('RGB') if image.mode != 'RGB' else image
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(
        f'image must be a PIL image or a uint8 [height, width, 3] array, got {array.dtype} '
        f'{array.shape}')
  return Image.fromarray(array, mode='RGB')


def resize_shortest_edge(image, size: int):
  """Resizes a PIL image so its shortest side is `size` (bicubic), as transformers' PIL backend."""
  from PIL import Image

  width, height = image.size
  if width <= height:
    new_width, new_height = size, int(size * height / width)
  else:
    new_width, new_height = int(size * width / height), size
  return image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
  """Crops `[height, width, C]` to `[size, size, C]` around the centre (floor offsets)."""
  height, width = array.shape[:2]
  if height < size or width < size:
    raise ValueError(f'cannot centre-crop {height}x{width} to {size}x{size}')
  top = (height - size) // 2
  left = (width - size) // 2
  return array[top:top + size, left:left + size]


def preprocess_image(image,
                     size: int = 336,
                     mode: str = 'crop',
                     mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """CLIP preprocessing of one image.

  Args:
    image: a PIL image (any mode; converted to RGB) or a uint8 `[height, width, 3]` array.
    size: output side; CLIP ViT-L/14-336 uses 336.
    mode: 'crop' (CLIP: shortest side to `size`, centre crop) or 'pad' (LLaVA's
      `image_aspect_ratio='pad'`: expand to a square in the mean colour, then the same).
    mean, std: per-channel normalisation, in 0..1 units.

  Returns:
    `[size, size, 3]` float32, channels-last.
  """
  if mode not in PREPROCESS_MODES:
    raise ValueError(f'mode must be one of {PREPROCESS_MODES}, got {mode!r}')
  if size <= 0:
    raise ValueError(f'size must be positive, got {size}')
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f'mean and std need 3 entries, got {len(mean)} and {len(std)}')
  pil = _as_rgb_pil(image)
  if pil.width == 0 or pil.height == 0:
    raise ValueError(f'zero-size image {pil.width}x{pil.height}')
  if mode == 'pad':
    pil = expand_to_square(pil, pad_color(mean))
  pil = resize_shortest_edge(pil, size)
  pixels = center_crop(np.asarray(pil), size)
  scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def load_and_preprocess_image(path: PathLike, **kwargs) -> np.ndarray:
  """`preprocess_image(load_image(path), **kwargs)`: `[size, size, 3]` float32."""
  return preprocess_image(load_image(path), **kwargs)

