"""Images for vision-language models: decoding an image chunk's bytes and the model's own preprocessing.

An ImageChunk carries PNG or JPEG bytes; they are decoded by their content (the magic bytes), not by the chunk's
`format` string, and anything else is refused. ImageAssetPointerChunk names a local file (a path or a file://
URL); nothing is downloaded.

Preprocessing is the Qwen2-VL-style image processor's (Qwen3-VL uses it), as transformers' Pillow backend does
it, so the pixel values are the same float32 numbers:
  1. to RGB: an image with transparency is composited over white, anything else converted by Pillow; no EXIF
     orientation is applied (the pixels as stored: the processor given the decoded image does not rotate it, and
     the cookbook's image_to_chunk counts tokens from the stored size and re-encodes without EXIF; transformers'
     load_image, for paths, URLs and base64, would rotate them and drop alpha without compositing);
  2. `smart_resize`: both sides to multiples of patch * merge, the pixel count brought into [min_pixels,
     max_pixels] keeping the aspect ratio (Python's round-half-to-even, the same double-precision steps);
  3. Pillow's bicubic resize on the uint8 image;
  4. rescale (x * rescale_factor in float64, then float32) and normalize ((x - mean) / std in float32);
  5. patches: one row per patch of patch x patch pixels, rows in the order of the 2x2 merge blocks (block row,
     block column, then the block's four patches row-major), each row's values ordered (channel, frame, pixel
     row, pixel column) with the image repeated as temporal_patch frames.
An image becomes grid_h * grid_w patches and grid_h * grid_w / merge^2 tokens of the language model.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from ._exceptions import BadRequestError

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"

# Decoding refuses images of more pixels than this (checked from the header, before any pixel is decoded): a
# small file can declare a huge image (a "decompression bomb"). Pillow's own default limit (89.5 M pixels, about
# 9459 x 9459), far above what the model keeps (Qwen3-VL resizes to at most 16.8 M pixels).
MAX_DECODED_PIXELS = 89_478_485


@dataclass(frozen=True)
class Patches:
    """An image as the vision tower takes it."""

    pixel_values: np.ndarray  # [grid_h * grid_w, C * temporal_patch * patch * patch] float32
    grid: tuple[int, int, int]  # (1, grid_h, grid_w): one temporal step (an image is one frame)
    size: tuple[int, int]  # the decoded image's (height, width)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def image_kind(data: bytes) -> str | None:
    """"png" or "jpeg" from the bytes' magic, or None."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    return None


def read_pointer(location: str, what: str) -> bytes:
    """The bytes of an ImageAssetPointerChunk's location: a local path or a file:// URL."""
    if not isinstance(location, str) or not location:
        raise BadRequestError(f"{what}: location must be a local file path or a file:// URL")
    parsed = urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise BadRequestError(f"{what}: file URL {location!r} names another host; only local files are read")
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise BadRequestError(f"{what}: location {location!r} is a {parsed.scheme}:// URL; this local engine reads "
                              f"only local files (a path or a file:// URL) and never downloads")
    else:
        path = Path(location).expanduser()
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadRequestError(f"{what}: cannot read image file {str(path)!r}: {e.strerror or e}") from None


def decode(data: bytes, what: str):
    """A fully decoded Pillow image from PNG or JPEG bytes; BadRequestError for anything else, a truncated or
    corrupt file, or an image past MAX_DECODED_PIXELS."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise BadRequestError(f"{what}: reading images needs Pillow (pip install pillow)") from e
    kind = image_kind(data)
    if kind is None:
        head = data[:8].hex(" ") if data else "no bytes"
        raise BadRequestError(f"{what}: the image data is neither PNG nor JPEG (it starts with {head}); only PNG and "
                              f"JPEG images are supported")
    def too_large(width, height):
        return BadRequestError(f"{what}: the {kind.upper()} image is {width} x {height} pixels; images of more than "
                               f"{MAX_DECODED_PIXELS} pixels are refused")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            with Image.open(io.BytesIO(data), formats=["PNG" if kind == "png" else "JPEG"]) as image:
                width, height = image.size
                if width < 1 or height < 1 or width * height > MAX_DECODED_PIXELS:
                    raise too_large(width, height)
                image.load()  # decode now: a truncated file fails here, not later
                return image.copy()
    except BadRequestError:
        raise
    except Image.DecompressionBombError:  # Pillow's limit, when a caller set it below ours
        raise BadRequestError(f"{what}: the {kind.upper()} image has more pixels than Pillow's limit "
                              f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}); images of more than "
                              f"{MAX_DECODED_PIXELS} pixels are refused") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadRequestError(f"{what}: cannot decode the {kind.upper()} image ({e}); the data is truncated or "
                              f"corrupt") from None


def to_rgb(image):
    """RGB as transformers' convert_to_rgb makes it: transparency is composited over white."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, what: str) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of `factor`, the pixel count in [min_pixels,
    max_pixels], the aspect ratio kept as well as that allows (the image processor's rule, step for step)."""
    if max(height, width) / min(height, width) > 200:
        raise BadRequestError(f"{what}: the image is {width} x {height} pixels; its aspect ratio "
                              f"{max(height, width) / min(height, width):.1f} is above the 200 the model accepts")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patch_grid(height: int, width: int, proc: dict, what: str = "image") -> tuple[int, int]:
    """(grid_h, grid_w) in patches of an image of that size."""
    h, w = smart_resize(height, width, proc["patch"] * proc["merge"], proc["min_pixels"], proc["max_pixels"], what)
    return h // proc["patch"], w // proc["patch"]


def token_count(height: int, width: int, proc: dict, what: str = "image") -> int:
    """The language-model tokens an image of that size becomes."""
    gh, gw = patch_grid(height, width, proc, what)
    return gh * gw // (proc["merge"] ** 2)


def _patchify(image: np.ndarray, proc: dict) -> np.ndarray:
    """[C, H, W] float32 -> [gh * gw, C * Tp * P * P] in merge-block order (module docstring, step 5)."""
    c, height, width = image.shape
    p, m, tp = proc["patch"], proc["merge"], proc["temporal_patch"]
    gh, gw = height // p, width // p
    # [C, H, W] -> [C, block row, row in block, pixel row, block col, col in block, pixel col]
    x = image.reshape(c, gh // m, m, p, gw // m, m, p)
    # -> [block row, block col, row in block, col in block, C, pixel row, pixel col]
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)
    # the frame axis after the channel: the same image in each of the Tp frames
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))
    return np.ascontiguousarray(x).reshape(gh * gw, c * tp * p * p)


def preprocess(data: bytes, proc: dict, what: str) -> Patches:
    """PNG / JPEG bytes -> the patches the vision tower takes (module docstring)."""
    from PIL import Image

    image = decode(data, what)
    size = (image.height, image.width)
    if proc["do_convert_rgb"]:
        image = to_rgb(image)
    elif image.mode != "RGB":
        raise BadRequestError(f"{what}: the image is {image.mode}, and this model's processor does not convert to RGB")
    if proc["do_resize"]:
        h, w = smart_resize(image.height, image.width, proc["patch"] * proc["merge"], proc["min_pixels"],
                            proc["max_pixels"], what)
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    elif image.height % (proc["patch"] * proc["merge"]) or image.width % (proc["patch"] * proc["merge"]):
        raise BadRequestError(f"{what}: without resizing, the image sides must be multiples of "
                              f"{proc['patch'] * proc['merge']}")
    x = np.asarray(image).transpose(2, 0, 1)  # [C, H, W] uint8
    if proc["do_rescale"]:
        x = (x.astype(np.float64) * proc["rescale_factor"]).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if proc["do_normalize"]:
        mean = np.asarray(proc["image_mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(proc["image_std"], dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    pixels = _patchify(x, proc)
    return Patches(pixels, (1, x.shape[1] // proc["patch"], x.shape[2] // proc["patch"]), size)
