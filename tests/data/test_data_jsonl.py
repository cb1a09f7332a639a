"""JSONL data: the user's own files through the same pipeline; each bad line is named."""

import json

import pytest
from PIL import Image

from vlmoe.data import DataError, load_data, load_jsonl


def _write(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "imgs" / "red.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "imgs" / "black.jpg")
    Image.new("RGBA", (10, 10), (0, 0, 255, 255)).save(tmp_path / "blue.png")
    return tmp_path


def _good(folder):
    return [
        {"image": "imgs/red.png", "question": "what color is the shape?", "answer": "red"},
        "",
        {"image": "imgs/black.jpg", "question": "is there a black shape?", "answer": "yes"},
        {"image": "imgs/red.png", "question": "what shape is present?", "answer": "circle"},
        {"image": str(folder / "blue.png"), "question": "what color?", "answer": "blue", "x": 1},
    ]


def test_load_jsonl_decodes_each_image_once(folder):
    path = _write(folder / "data.jsonl", _good(folder))
    s = load_jsonl(path, image_size=16)
    assert len(s) == 4 and s.images.shape == (3, 3, 16, 16)
    assert s.image_index.tolist() == [0, 1, 0, 2]
    assert s.image_names[:2] == ["imgs/red.png", "imgs/black.jpg"]
    assert s.kinds == ["color", "yes/no", "shape", "color"]
    assert s.source == str(path)
    assert s.images[0, :, 0, 0].tolist() == [255, 0, 0]
    assert s.images[2, :, 0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"image": "imgs/red.png", "question": "q?"', r"invalid JSON \("),
        ('["a", "b"]', "expected a JSON object, got list"),
        ({"image": "imgs/red.png", "answer": "red"}, "missing field 'question'"),
        ({"image": "imgs/red.png", "question": 3, "answer": "red"}, "'question' must be a string, got int"),
        ({"image": "imgs/red.png", "question": "  ", "answer": "red"}, "field 'question' is empty"),
        ({"image": "imgs/none.png", "question": "q?", "answer": "red"}, r"none\.png: image file not found"),
        ({"image": "corrupt.png", "question": "q?", "answer": "red"}, r"corrupt\.png: cannot decode image"),
    ],
)  # fmt: skip
def test_bad_line_names_file_and_line(folder, bad, message):
    (folder / "corrupt.png").write_bytes(b"this is no png at all")
    records = _good(folder)
    records.insert(3, bad)  # line 4 of the file
    path = _write(folder / "bad.jsonl", records)
    with pytest.raises(DataError, match=message) as e:
        load_jsonl(path)
    assert str(e.value).startswith(f"{path}:4: ")
    assert "\n" not in str(e.value)


def test_image_error_reported_at_first_line_naming_it(folder):
    records = [{"image": "gone.png", "question": "q?", "answer": "a"}] * 2
    path = _write(folder / "d.jsonl", [_good(folder)[0], *records])
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*gone\.png: image file not found"):
        load_jsonl(path)


def test_missing_empty_and_binary_files(folder):
    with pytest.raises(DataError, match=r"missing\.jsonl: data file not found"):
        load_jsonl(folder / "missing.jsonl")
    (folder / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(folder / "empty.jsonl")
    (folder / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        load_jsonl(folder / "bin.jsonl")


def test_load_data_specs(folder):
    path = _write(folder / "data.jsonl", _good(folder))
    assert len(load_data(path, "test")) == 4
    train, val = (
        load_data(path, "train", val_fraction=0.34),
        load_data(path, "val", val_fraction=0.34),
    )
    assert len(train) + len(val) == 4 and not set(train.image_names) & set(val.image_names)
    assert load_data("easy-vqa", "test").source == "easy-vqa:test"
    with pytest.raises(DataError, match="data not found"):
        load_data(folder / "nope.jsonl", "train")
    with pytest.raises(DataError, match="unknown split"):
        load_data(path, "dev")
    # a folder of split files; without val.jsonl, val is carved from train.jsonl
    _write(folder / "train.jsonl", _good(folder))
    _write(folder / "test.jsonl", _good(folder)[:1])
    assert len(load_data(folder, "test")) == 1
    assert len(load_data(folder, "train", val_fraction=0.34)) == len(train)
    assert len(load_data(folder, "val", val_fraction=0.34)) == len(val)
