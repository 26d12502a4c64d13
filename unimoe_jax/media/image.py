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

Beyond what `Image.convert('RGB')` (the official loader) does:

  * high bit-depth pixels are scaled to 8 bits, not clipped (Pillow's convert clips them to
    255, turning a 16-bit grey PNG white): 16-bit grey ('I;16*', and 'I' within 0..65535, as
    older Pillow reads 16-bit PNGs) by round(v / 257); float ('F', e.g. a float TIFF) read as
    0..1 when its values lie there, else as 0..255 (Pillow's own 'F' scale); pixels beyond
    that (or NaN) are refused naming the range. 16-bit RGB(A) and grey+alpha PNGs already
    come out of Pillow as 8-bit RGB(A);
  * memory is bounded on extreme aspect ratios: when the shortest-side resize would exceed
    `MAX_RESIZED_PIXELS_FACTOR * size**2` pixels (a 2000x1 image resizes to 672000x336), only
    the source region that the centre crop keeps is resampled (`resize_and_center_crop`: the
    same passes, filters and scales, the same pixels; ordinary images take the plain path
    above), and a 'pad' canvas wider than `MAX_PAD_SIDE` is built from the image first
    reduced (box filter) to fit (approximate, only for such images).
"""

from typing import Sequence

import numpy as np

from unimoe_jax.media.errors import MediaError, PathLike, check_readable_file

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESS_MODES = ('crop', 'pad')

# Above this many times size**2 pixels, the resize of step 1 resamples only the crop's region.
MAX_RESIZED_PIXELS_FACTOR = 16
# The longest side of a 'pad' square canvas built at full resolution (8192**2 RGB: 192 MiB).
MAX_PAD_SIDE = 8192

_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def to_rgb(image):
  """An RGB `PIL.Image.Image` of `image` (any Pillow mode), high bit depths scaled to 8 bits
  (module docstring). Raises ValueError naming the mode and pixel range it cannot scale."""
  from PIL import Image

  mode = image.mode
  if mode == 'RGB':
    return image
  if mode not in _SIXTEEN_BIT_MODES + ('I', 'F'):
    return image.convert('RGB')
  values = np.asarray(image).astype(np.float64)
  if values.size == 0:
    return image.convert('RGB')
  low, high = float(np.min(values)), float(np.max(values))
  if not (np.isfinite(low) and np.isfinite(high)):
    raise ValueError(f'{mode!r} image has non-finite pixels')
  if mode in _SIXTEEN_BIT_MODES or mode == 'I':
    if low < 0 or high > 65535:
      raise ValueError(
          f'{mode!r} (32-bit integer) pixels span {low:g}..{high:g}, beyond the '
          '16-bit range 0..65535: no known white level'
      )
    scaled = values / 257.0
  else:  # 'F'
    if low < 0 or high > 255:
      raise ValueError(
          f"'F' (float) pixels span {low:g}..{high:g}, beyond 0..1 and 0..255: "
          'no known white level'
      )
    scaled = values * 255.0 if high <= 1.0 else values
  grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
  return Image.fromarray(grey, mode='L').convert('RGB')


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
      rgb = to_rgb(image)
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
  """The padding colour the official code uses: the normalisation mean as 0..255 ints
  (truncated)."""
  return tuple(int(m * 255) for m in mean)


def _as_rgb_pil(image):
  from PIL import Image

  if isinstance(image, Image.Image):
    return to_rgb(image)
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(
        f'image must be a PIL image or a uint8 [height, width, 3] array, got {array.dtype} '
        f'{array.shape}'
    )
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


def resize_and_center_crop(image, size: int) -> np.ndarray:
  """`center_crop(np.asarray(resize_shortest_edge(image, size)), size)` (uint8
  `[size, size, 3]`) without building the whole resized image when it would exceed
  `MAX_RESIZED_PIXELS_FACTOR * size**2` pixels.

  Pillow's resize runs two one-dimensional passes, each rounded to uint8: horizontal then
  vertical, except (as observed with Pillow 13) vertical first when a tall image shrinks. The
  large path runs the same two passes, in that order, on just what the crop needs: the first
  pass over the source lines the second pass's filter reaches (bicubic support 2 source
  pixels, times the scale when shrinking, plus a margin), the second over the crop's box,
  both with the scales of the full resize. Filter windows and edge clamping are those of the
  full resize; tests/media_image_depth_test.py checks the pixels are equal.
  """
  from PIL import Image

  bicubic = Image.Resampling.BICUBIC
  width, height = image.size
  if width <= height:
    new_width, new_height = size, int(size * height / width)
  else:
    new_width, new_height = int(size * width / height), size
  if new_width * new_height <= MAX_RESIZED_PIXELS_FACTOR * size * size:
    return center_crop(np.asarray(resize_shortest_edge(image, size)), size)
  top = (new_height - size) // 2
  left = (new_width - size) // 2
  scale_x, scale_y = width / new_width, height / new_height
  x0, x1 = left * scale_x, (left + size) * scale_x
  y0, y1 = top * scale_y, (top + size) * scale_y
  if height > width and width > size:  # Vertical pass first, on the columns the crop needs.
    reach = 2.0 * max(scale_x, 1.0) + 2
    c0, c1 = max(int(np.floor(x0 - reach)), 0), min(int(np.ceil(x1 + reach)), width)
    columns = image.crop((c0, 0, c1, height))
    vertical = columns.resize((c1 - c0, size), resample=bicubic, box=(0, y0, c1 - c0, y1))
    out = vertical.resize((size, size), resample=bicubic, box=(x0 - c0, 0, x1 - c0, size))
  else:  # Horizontal pass first, on the rows the crop needs.
    reach = 2.0 * max(scale_y, 1.0) + 2
    r0, r1 = max(int(np.floor(y0 - reach)), 0), min(int(np.ceil(y1 + reach)), height)
    rows = image.crop((0, r0, width, r1))
    horizontal = rows.resize((size, r1 - r0), resample=bicubic, box=(x0, 0, x1, r1 - r0))
    out = horizontal.resize((size, size), resample=bicubic, box=(0, y0 - r0, size, y1 - r0))
  return np.asarray(out)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
  """Crops `[height, width, C]` to `[size, size, C]` around the centre (floor offsets)."""
  height, width = array.shape[:2]
  if height < size or width < size:
    raise ValueError(f'cannot centre-crop {height}x{width} to {size}x{size}')
  top = (height - size) // 2
  left = (width - size) // 2
  return array[top : top + size, left : left + size]


def preprocess_image(
    image,
    size: int = 336,
    mode: str = 'crop',
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
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
    side = max(pil.size)
    if side > MAX_PAD_SIDE:  # Bound the square canvas (a 100000x1 image would be 10^10 px).
      pil = pil.reduce(-(-side // MAX_PAD_SIDE))
    pil = expand_to_square(pil, pad_color(mean))
  pixels = resize_and_center_crop(pil, size)
  scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def load_and_preprocess_image(path: PathLike, **kwargs) -> np.ndarray:
  """`preprocess_image(load_image(path), **kwargs)`: `[size, size, 3]` float32."""
  return preprocess_image(load_image(path), **kwargs)
