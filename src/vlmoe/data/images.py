"""Image decoding: any file PIL reads → uint8 RGB tensor [3, S, S].

Images are decoded once and kept in memory as uint8 (easy-VQA's 4,000 64×64 train images
take 49 MB); normalisation to float happens per batch in `batching.py`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from vlmoe.data.errors import DataError, one_line

# Errors PIL raises for unreadable, truncated or hostile files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Below this many files a thread pool costs more than it saves (small PNGs hold the GIL).
_POOL_MIN_FILES = 256


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB. Transparent pixels are composited on white, not black:
    a drawing with a transparent background should look like a drawing on paper."""
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 / 65535.0 if img.mode.startswith("I;16") else 255.0 / max(arr.max(), 255.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def fit_image(img: Image.Image, size: int) -> np.ndarray:
    """A decoded PIL image as the model sees it: RGB uint8 [size, size, 3] (a writable copy)."""
    img = _to_rgb(img)
    if img.size != (size, size):
        # Stretch rather than crop: in VQA the object asked about may sit anywhere.
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8)


def _decode(
    src: str | os.PathLike | BinaryIO,
    size: int,
    name: str | os.PathLike | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decode one file (a path or an open binary stream) to a uint8 array [S, S, 3]; raises
    DataError naming `name` (default: the path). `max_pixels` bounds width × height, read
    from the header before any pixel is decoded."""
    name = src if name is None else name
    try:
        with Image.open(src) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                w, h = img.size
                raise DataError(
                    f"{name}: image too large ({w}×{h} pixels; at most {max_pixels:,} pixels)"
                )
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free; never below the target size.
            img.draft("RGB", (size, size))
            return fit_image(ImageOps.exif_transpose(img), size)
    except DataError:
        raise  # ours, already naming the file (DataError is a ValueError, caught below)
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except IsADirectoryError:
        raise DataError(f"{name}: expected an image file, got a directory") from None
    except PermissionError:
        raise DataError(f"{name}: image file not readable (permission denied)") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"{name}: cannot decode image ({one_line(e)})") from None


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Load one image as uint8 RGB [3, size, size].

    Any mode PIL reads (L, RGBA, P, CMYK, 16-bit, …) is converted to RGB (transparency over
    white); any size is resized with bilinear filtering (aspect ratio not kept); EXIF
    orientation is applied. A missing or corrupt file raises `DataError` naming the path.
    """
    _check_size(size)
    return torch.from_numpy(_decode(path, size)).permute(2, 0, 1).contiguous()


def decode_image_bytes(
    data: bytes, size: int, name: str = "image", max_pixels: int | None = None
) -> torch.Tensor:
    """An image file's bytes (an upload, say) → uint8 RGB [3, size, size], as `load_image`.

    Decoded in memory: nothing is written to disk. Bytes PIL cannot read, or an image of more
    than `max_pixels` pixels (checked before decoding), raise `DataError` naming `name`.
    """
    _check_size(size)
    arr = _decode(io.BytesIO(data), size, name=name, max_pixels=max_pixels)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_images(
    paths: Sequence[str | os.PathLike], size: int, workers: int | None = None
) -> tuple[torch.Tensor, dict[int, DataError]]:
    """Decode many files into one uint8 tensor [N, 3, size, size].

    Returns the tensor and the errors by position (rows of failed files are left zero), so a
    caller can report a failure with its own context (e.g. the JSONL line that named it).
    """
    _check_size(size)
    out_NHWC = torch.zeros((len(paths), size, size, 3), dtype=torch.uint8)
    errors: dict[int, DataError] = {}

    def work(i: int) -> None:
        try:
            out_NHWC[i] = torch.from_numpy(_decode(paths[i], size))
        except DataError as e:
            errors[i] = e

    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(paths) >= _POOL_MIN_FILES else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(len(paths)), chunksize=64))
    else:
        for i in range(len(paths)):
            work(i)
    return out_NHWC.permute(0, 3, 1, 2).contiguous(), errors


def load_images(paths: Sequence[str | os.PathLike], size: int) -> torch.Tensor:
    """Decode many files into uint8 [N, 3, size, size]; the first failure (in list order)
    raises `DataError` naming its path."""
    images, errors = decode_images(paths, size)
    if errors:
        raise errors[min(errors)]
    return images


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DataError(f"image size must be a positive integer, got {size!r}")


def resolve(path: str, base: Path) -> Path:
    """A path as written in a data file: absolute, or relative to the data file's folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p
