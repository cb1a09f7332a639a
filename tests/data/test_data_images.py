"""Images of any mode and size load as uint8 RGB [3, S, S]; bad files raise DataError."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlmoe.data import DataError, load_image, load_images


def _save(tmp_path, name, img, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode,fmt", [("RGB", "png"), ("L", "png"), ("RGBA", "png"), ("P", "png"), ("RGB", "jpeg"),
                 ("L", "jpeg"), ("1", "png"), ("I;16", "png"), ("CMYK", "jpeg")],
)  # fmt: skip
def test_any_mode_and_size_loads_as_rgb(tmp_path, mode, fmt):
    img = Image.new(mode, (17, 31))  # width 17, height 31: not square, not the target size
    path = _save(tmp_path, f"x.{fmt}", img)
    for size in (8, 64):
        x = load_image(path, size)
        assert x.shape == (3, size, size) and x.dtype == torch.uint8


def test_colours_survive_and_alpha_goes_over_white(tmp_path):
    rgb = _save(tmp_path, "red.png", Image.new("RGB", (20, 10), (200, 10, 30)))
    assert load_image(rgb, 16)[:, 5, 5].tolist() == [200, 10, 30]
    gray = _save(tmp_path, "g.png", Image.new("L", (5, 5), 90))
    assert load_image(gray, 5)[:, 2, 2].tolist() == [90, 90, 90]
    clear = _save(tmp_path, "clear.png", Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert load_image(clear, 4).min() == 255
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_image(_save(tmp_path, "p.png", pal), 4)[:, 0, 0].tolist() == [10, 20, 30]


def test_resize_is_bilinear_of_content(tmp_path):
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, 32:] = 255  # left half black, right half white
    x = load_image(_save(tmp_path, "half.png", Image.fromarray(arr)), 8)
    assert x[:, :, 0].max() == 0 and x[:, :, -1].min() == 255


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: image file not found"):
        load_image(tmp_path / "nope.png", 8)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage, not an image" * 5)
    with pytest.raises(DataError, match=r"bad\.png: cannot decode image") as e:
        load_image(bad, 8)
    assert "\n" not in str(e.value)
    good = _save(tmp_path, "ok.png", Image.new("RGB", (3, 3)))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_image(truncated, 8)
    with pytest.raises(DataError, match="expected an image file, got a directory"):
        load_image(tmp_path, 8)
    with pytest.raises(DataError, match=r"cut\.png"):
        load_images([good, truncated, bad], 8)  # first failure in list order


def test_load_images_stacks(tmp_path):
    paths = [_save(tmp_path, f"{i}.png", Image.new("RGB", (9, 9), (i, 0, 0))) for i in range(3)]
    x = load_images(paths, 4)
    assert x.shape == (3, 3, 4, 4) and x[:, 0, 0, 0].tolist() == [0, 1, 2]
