"""Readers on small files written here: Pick-a-Pic ties and label order, CoProV2 merging, errors."""
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import solid_image
from PIL import Image

from common.errors import InputError
from data.categories import normalize_category
from data.pairs import load_rgb, preprocess
from data.readers import CoProV2Reader, JsonlReader, PickAPicReader


def png_bytes(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE, GREEN, GREY = png_bytes((255, 0, 0)), png_bytes((0, 0, 255)), png_bytes((0, 255, 0)), png_bytes((9, 9, 9))


def pickapic_table():
    return pa.table({
        "caption": ["keep order", "swap", "tie"],
        "jpg_0": [RED, RED, GREY],
        "jpg_1": [BLUE, GREEN, GREY],
        "label_0": [1.0, 0.0, 0.5],
    })


def test_pickapic_parquet_drops_ties_and_swaps_label_zero(tmp_path):
    pq.write_table(pickapic_table(), tmp_path / "part-0.parquet")
    reader = PickAPicReader(tmp_path)
    pairs = reader.read()
    assert [p.prompt for p in pairs] == ["keep order", "swap"]
    assert (pairs[0].image_w, pairs[0].image_l) == (RED, BLUE)
    assert (pairs[1].image_w, pairs[1].image_l) == (GREEN, RED)
    assert reader.stats == {"pairs": 2, "ties_dropped": 1}


def test_pickapic_saved_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset(pickapic_table()).save_to_disk(str(tmp_path / "ds"))
    pairs = PickAPicReader(tmp_path / "ds").read()
    assert len(pairs) == 2 and pairs[1].image_w == GREEN


def test_pickapic_missing_column_names_file_and_column(tmp_path):
    pq.write_table(pickapic_table().drop(["label_0"]), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet: missing column\(s\) \['label_0'\]"):
        PickAPicReader(tmp_path / "bad.parquet").read()


def write_coprov2(tmp_path, rows, images=None):
    for name in images if images is not None else {r[1] for r in rows}:
        solid_image(tmp_path / name, (200, 0, 0) if name.startswith("u_") else (0, 200, 0))
    lines = ["prompt,image,category"] + [f'"{p}",{i},{c}' for p, i, c in rows]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.csv"


COPRO_ROWS = [
    ("a violent hateful scene", "u_idx_0_0.jpg", "hate"),
    ("a violent hateful scene", "u_idx_0_0.jpg", "Violence"),
    ("a calm friendly scene", "s_idx_0_0.jpg", "hate"),
    ("a calm friendly scene", "s_idx_0_0.jpg", "violence"),
    ("a person harming themself", "u_idx_1_0.jpg", "Self Harm"),
    ("a person resting", "s_idx_1_0.jpg", "Harrassment"),
]


def test_coprov2_merges_duplicate_rows_into_one_multi_category_pair(tmp_path):
    pairs = CoProV2Reader(write_coprov2(tmp_path, COPRO_ROWS)).read()
    assert len(pairs) == 2
    first = pairs[0]
    assert first.prompt == "a violent hateful scene" and first.safe_prompt == "a calm friendly scene"
    assert first.image_w.name == "s_idx_0_0.jpg" and first.image_l.name == "u_idx_0_0.jpg"
    assert first.categories == ("hate", "violence")
    assert pairs[1].categories == ("self_harm", "harassment")


def test_coprov2_missing_image_names_file_and_row(tmp_path):
    images = {r[1] for r in COPRO_ROWS} - {"u_idx_1_0.jpg"}
    csv = write_coprov2(tmp_path, COPRO_ROWS, images=images)
    with pytest.raises(InputError) as err:
        CoProV2Reader(csv).read()
    message = str(err.value)
    assert "\n" not in message
    assert "train.csv row 6" in message and "u_idx_1_0.jpg" in message


def test_coprov2_pair_without_partner_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no s_idx_0_0 partner"):
        CoProV2Reader(write_coprov2(tmp_path, COPRO_ROWS[:2])).read()


def test_category_aliases():
    assert normalize_category(" Self-Harm ") == "self_harm"
    assert normalize_category("Harrassment") == "harassment"
    assert normalize_category("illegal activity") == "illegal_activity"
    assert normalize_category("My Own Category") == "my_own_category"


def test_jsonl_reader(jsonl_pairs):
    pairs = JsonlReader(jsonl_pairs.parent).read()
    assert len(pairs) == 8 and pairs[1].categories == ("violence",) and pairs[0].safe_prompt == "a green circle"
    assert pairs[0].image_w.name == "w0.png" and pairs[0].image_l.name == "l0.png"


def test_jsonl_bad_line_is_named(tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "x", "chosen": "a.png"}\nnot json\n')
    solid_image(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(InputError, match=r"pairs\.jsonl line 2: invalid JSON"):
        JsonlReader(tmp_path).read()


@pytest.mark.parametrize("line, message", [
    ('["a list"]', r"line 2: expected a JSON object"),
    ('{"prompt": "x", "chosen": "a.png", "rejected": 5}', r"line 2: key 'rejected' must be an image path"),
    ('{"prompt": "x", "chosen": "a.png", "rejected": "gone.png"}', r"line 2: image file not found: .*gone\.png"),
])
def test_jsonl_bad_records_are_named(tmp_path, line, message):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "x", "chosen": "a.png"}\n' + line + "\n")
    solid_image(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(InputError, match=message):
        JsonlReader(tmp_path).read()


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P"])
def test_images_of_any_mode_become_rgb(tmp_path, mode):
    image = Image.new("RGB", (10, 6), (255, 128, 0)).convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    image.save(path)
    rgb = load_rgb(path, "test")
    assert rgb.mode == "RGB" and rgb.size == (10, 6)
    tensor = preprocess(rgb, 4)
    assert tensor.shape == (3, 4, 4) and tensor.min() >= -1 and tensor.max() <= 1


def test_corrupt_image_names_source(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="pairs.jsonl line 3: cannot read image .*broken.png"):
        load_rgb(tmp_path / "broken.png", "pairs.jsonl line 3")
