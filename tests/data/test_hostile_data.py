"""Hostile data: CSV encodings and headers, CoProV2 pair keys, image paths leaving the dataset's folder,
decompression bombs and degenerate images, corrupt latent caches, paths that are not files, bad parquet
rows. Each gets one line naming the file and row (or key) and what was expected. The direct tests call the
readers; tests/workflows/test_validation_table.py runs every case of hostile_data_cases.py through train.py."""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import solid_image
from PIL import Image

from common.errors import InputError
from data.pairs import ImageLimits, load_rgb
from data.readers import CoProV2Reader, JsonlReader, PickAPicReader
from data.readers.base import PairReader
from data.readers.coprov2 import read_test_prompts
from data.readers.dual import read_annotations
from data.readers.prompts import read_coco_captions, read_i2p, read_text
from tests.hostile_data_cases import CASES, COPRO_HEADER, COPRO_ROWS, bomb_png, coprov2, png_bytes

ROOT = Path(__file__).resolve().parents[2]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def copro_csv(tmp_path: Path, lines: list[str] | None = None, raw: bytes | None = None) -> Path:
    return Path(coprov2(tmp_path, lines, raw)[1].split("=", 1)[1])


def pairs_jsonl(tmp_path: Path, records: list[dict]) -> Path:
    for name in ("a.png", "b.png"):
        solid_image(tmp_path / "set" / name, (9, 9, 9))
    file = tmp_path / "set" / "pairs.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return file


# ------------------------------------------------------------------ CSV files
def test_a_utf8_bom_is_read_by_every_csv_reader(tmp_path):
    csv = copro_csv(tmp_path, raw=("\ufeff" + "\n".join([COPRO_HEADER] + COPRO_ROWS) + "\n").encode())
    assert [p.prompt for p in CoProV2Reader(csv).read()] == ["a violent scene", "a hateful sign"]
    (tmp_path / "i2p.csv").write_bytes("\ufeffprompt,categories,sd_seed\na fight,violence,7\n".encode())
    assert [(p.text, p.categories, p.seed) for p in read_i2p(tmp_path / "i2p.csv")] == [("a fight", ("violence",), 7)]
    (tmp_path / "test.csv").write_bytes("\ufeffprompt,image,category\na fight,0000000_0.jpg,violence\n".encode())
    assert read_test_prompts(tmp_path / "test.csv") == [("a fight", ("violence",))]


def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path):
    text = "\n".join([COPRO_HEADER] + COPRO_ROWS[:2] + ['"un caf\u00e9",u_idx_1_0.png,hate'] + COPRO_ROWS[3:]) + "\n"
    csv = copro_csv(tmp_path, raw=text.encode("latin-1"))
    with pytest.raises(InputError) as err:
        CoProV2Reader(csv).read()
    assert one_line(err).startswith(f"{csv} line 4: byte 0xe9 is not UTF-8; the file must be UTF-8")
    (tmp_path / "i2p.csv").write_bytes("prompt,categories\nun caf\u00e9,violence\n".encode("cp1252"))
    with pytest.raises(InputError, match=r"i2p\.csv line 2: byte 0xe9 is not UTF-8"):
        read_i2p(tmp_path / "i2p.csv")
    (tmp_path / "prompts.txt").write_bytes("a photo\nun caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"prompts\.txt line 2: byte 0xe9 is not UTF-8"):
        read_text(tmp_path / "prompts.txt")
    (tmp_path / "coco.json").write_bytes(b'{"annotations": [{"image_id": 1, "caption": "caf\xe9"}]}')
    with pytest.raises(InputError, match=r"coco\.json line 1: byte 0xe9 is not UTF-8"):
        read_coco_captions(tmp_path / "coco.json")


def test_a_column_named_twice_is_refused(tmp_path):
    header = "prompt,image,category,prompt"
    csv = copro_csv(tmp_path, raw=("\n".join([header] + [r + ',"a rewrite"' for r in COPRO_ROWS]) + "\n").encode())
    with pytest.raises(InputError) as err:
        CoProV2Reader(csv).read()
    assert one_line(err) == f"{csv}: column 'prompt' appears 2 times in the header; each column must be named once"
    (tmp_path / "i2p.csv").write_text("prompt,categories,categories\na fight,violence,hate\n")
    with pytest.raises(InputError, match=r"i2p\.csv: column 'categories' appears 2 times"):
        read_i2p(tmp_path / "i2p.csv")


@pytest.mark.parametrize("text, message", [
    ("", r"train\.csv: empty file; the CoProV2 format needs a header with columns \['prompt', 'image', 'category'\]"),
    ("\n\n", r"train\.csv: empty file"),
    ("prompt,image,category\n", r"train\.csv: no rows"),
    ("prompt,image,category\n\n,,\n", r"train\.csv: no rows"),
    ("prompt,image\nx,u_idx_0_0.png\n", r"train\.csv: missing column\(s\) \['category'\]; .*the header has \['prompt', 'image'\]"),
    ("prompt,image,category\na violent, bloody scene,u_idx_0_0.png,violence\n", r"train\.csv row 2: 4 cells, the header has 3"),
    ('prompt,image,category\n"a scene,u_idx_0_0.png,hate\nx,s_idx_0_0.png,hate\n',
     r"train\.csv line 2: not valid CSV \(unexpected end of data\); a quote in the row starting here is not closed"),
    ("prompt,image,category\nx,u_idx_0_0.png,???\n", r"train\.csv row 2: category '\?\?\?' holds an entry without a name"),
])
def test_bad_csv_files_are_one_line(tmp_path, text, message):
    csv = copro_csv(tmp_path, raw=text.encode())
    with pytest.raises(InputError, match=message) as err:
        CoProV2Reader(csv).read()
    one_line(err)


def test_short_rows_and_blank_lines_are_read(tmp_path):
    """Trailing cells left out read as empty; blank lines are skipped but counted, as a spreadsheet numbers rows."""
    csv = copro_csv(tmp_path, raw=b"prompt,image,category\n\nx,u_idx_0_0.png\ny,s_idx_0_0.png,hate,\n")
    pairs = CoProV2Reader(csv).read()
    assert pairs[0].source == f"{csv} row 3" and pairs[0].categories == ("hate",)


# ------------------------------------------------------------------ CoProV2 pair keys
def test_names_with_the_same_pair_key_are_refused(tmp_path):
    csv = copro_csv(tmp_path, COPRO_ROWS + ['"another scene",u_idx_0000000_0.png,hate'])
    with pytest.raises(InputError) as err:
        CoProV2Reader(csv).read()
    assert one_line(err) == (f"{csv} row 6: image 'u_idx_0000000_0.png' has the pair key u_idx_0_0 of row 2's image "
                             "'u_idx_0_0.png' (the same numbers, written differently); give each image one name")
    (tmp_path / "test.csv").write_text("prompt,image,category\na fight,0_0.jpg,violence\na brawl,0000000_0.jpg,hate\n")
    with pytest.raises(InputError, match=r"test\.csv row 3: image '0000000_0\.jpg' has the pair key 0_0 of row 2's image '0_0\.jpg'"):
        read_test_prompts(tmp_path / "test.csv")


def test_rows_repeating_one_image_still_merge(tmp_path):
    csv = copro_csv(tmp_path, COPRO_ROWS + ['"a violent scene",u_idx_0_0.png,hate'])
    assert CoProV2Reader(csv).read()[0].categories == ("violence", "hate")


# ------------------------------------------------------------------ image paths outside the dataset's folder
@pytest.mark.parametrize("value", ["../outside.png", "/etc/hostname", "img/../../outside.png"])
def test_jsonl_paths_outside_the_folder_are_refused_unless_allowed(tmp_path, value):
    solid_image(tmp_path / "outside.png", (1, 2, 3))
    file = pairs_jsonl(tmp_path, [{"prompt": "x", "chosen": "a.png", "rejected": value}])
    (file.parent / "img").mkdir()
    with pytest.raises(InputError) as err:
        JsonlReader(file).read()
    assert one_line(err).startswith(f"{file} line 1: rejected {value!r} leads outside the dataset's folder {file.parent}")
    if value != "/etc/hostname":
        assert JsonlReader(file, allow_outside_paths=True).read()[0].image_l == file.parent / value


def test_symlinks_count_where_they_lead(tmp_path):
    solid_image(tmp_path / "outside.png", (1, 2, 3))
    file = pairs_jsonl(tmp_path, [{"prompt": "x", "chosen": "a.png", "rejected": "out.png"},
                                  {"prompt": "y", "chosen": "a.png", "rejected": "in.png"}])
    (file.parent / "out.png").symlink_to(tmp_path / "outside.png")
    (file.parent / "in.png").symlink_to(file.parent / "b.png")
    with pytest.raises(InputError, match=r"line 1: rejected 'out\.png' leads outside"):
        JsonlReader(file).read()
    (file.parent / "out.png").unlink()
    (file.parent / "out.png").symlink_to("b.png")
    assert len(JsonlReader(file).read()) == 2
    # a dataset folder that is itself a symlink: its images are inside it
    (tmp_path / "linked").symlink_to(file.parent)
    assert len(JsonlReader(tmp_path / "linked" / "pairs.jsonl").read()) == 2


def test_coprov2_and_dual_paths_outside_are_refused(tmp_path):
    solid_image(tmp_path / "elsewhere" / "u_idx_0_0.png", (1, 2, 3))
    csv = copro_csv(tmp_path, ['"a violent scene",../elsewhere/u_idx_0_0.png,violence'] + COPRO_ROWS[1:])
    with pytest.raises(InputError, match=r"train\.csv row 2: image '\.\./elsewhere/u_idx_0_0\.png' leads outside .*copro"):
        CoProV2Reader(csv).read()
    assert len(CoProV2Reader(csv, allow_outside_paths=True).read()) == 2
    rows = [{"prompt": "p", "image": "../elsewhere/u_idx_0_0.png", "quality": 0.5, "unsafe": 0.0}]
    (tmp_path / "dual").mkdir()
    (tmp_path / "dual" / "a.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(InputError, match=r"a\.jsonl line 1: image '\.\./elsewhere/u_idx_0_0\.png' leads outside"):
        read_annotations(tmp_path / "dual" / "a.jsonl")
    assert len(read_annotations(tmp_path / "dual" / "a.jsonl", allow_outside=True)[0].images) == 1
    pq.write_table(pa.table({"prompt": ["p"], "image": [str(tmp_path / "elsewhere" / "u_idx_0_0.png")], "quality": [0.5]}),
                   tmp_path / "dual" / "a.parquet")
    with pytest.raises(InputError, match=r"a\.parquet row 0: image '/.*u_idx_0_0\.png' leads outside"):
        read_annotations(tmp_path / "dual" / "a.parquet")


def test_every_reader_of_image_paths_takes_data_allow_outside_paths():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        for group, node in (("coprov2", "reader"), ("jsonl", "reader"), ("dual", "reader"), ("scp", "reader.harmful")):
            cfg = compose(config_name="train", overrides=[f"data={group}", "data.allow_outside_paths=true"])
            assert OmegaConf.select(cfg.data, node).allow_outside_paths is True, group


# ------------------------------------------------------------------ paths that are not readable files
def test_path_problems_say_what_the_path_is(tmp_path):
    csv = copro_csv(tmp_path)
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop.csv")
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "gone.csv")
    for path, message in ((tmp_path / "none.csv", "does not exist"), (tmp_path / "loop.csv", "is a symlink loop"),
                          (tmp_path / "dangling.csv", f"is a broken symlink (to {tmp_path / 'gone.csv'})"),
                          (csv.parent, "is a directory, expected a file; expected the CoProV2 CSV file"),
                          (csv / "x.csv", "does not exist (a folder in the path is a file)")):
        with pytest.raises(InputError) as err:
            CoProV2Reader(path)
        assert one_line(err) == f"data.path={path}: {message}"
    with pytest.raises(InputError, match=r"^data\.reader\.image_dir=.*train\.csv: is not a directory"):
        CoProV2Reader(csv, image_dir=csv)
    with pytest.raises(InputError, match=r"^data\.reader\.harmful\.image_dir=.*nowhere: does not exist"):
        CoProV2Reader(csv, image_dir=tmp_path / "nowhere", key="data.reader.harmful.path")
    with pytest.raises(InputError, match=r"^data\.reader\.clean\.path: expected a path"):
        PairReader(None, key="data.reader.clean.path")
    with pytest.raises(InputError, match=r"^.*loop\.csv: prompt file is a symlink loop$"):
        read_i2p(tmp_path / "loop.csv")
    with pytest.raises(InputError, match=r"^.*copro: prompt file is a directory, expected a file$"):
        read_text(csv.parent)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_says_so(tmp_path):
    csv = copro_csv(tmp_path)
    csv.chmod(0)
    with pytest.raises(InputError, match=r"data\.path=.*train\.csv: is not readable \(permission denied\)"):
        CoProV2Reader(csv)


def test_nested_readers_name_their_own_key(tmp_path):
    """data=scp builds its readers itself (``_recursive_: false``), telling each the key of its path."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import workflows.cli  # noqa: F401 - registers the config schema and the ${repo:...} resolver

    csv = copro_csv(tmp_path)
    overrides = ["objective=scdpo", "data=scp", f"data.reader.harmful.path={csv}",
                 f"data.reader.clean.path={tmp_path / 'no.parquet'}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        spec = compose(config_name="train", overrides=overrides).data.reader
    with pytest.raises(InputError) as err:
        instantiate(spec)(None)
    assert one_line(err) == f"data.reader.clean.path={tmp_path / 'no.parquet'}: does not exist"


# ------------------------------------------------------------------ images
def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = write_bytes(tmp_path / "bomb.png", bomb_png(20000, 20000))
    with pytest.raises(InputError) as err:
        load_rgb(bomb, "pairs.jsonl line 4", ImageLimits())
    assert one_line(err) == (f"pairs.jsonl line 4: image {bomb} is 20000x20000 = 400000000 pixels, above "
                             "data.max_image_pixels=89478485 (a decompression bomb?)")
    # between once and twice PIL's limit PIL only warns: refused here all the same, without the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match=r"10000x10000 = 100000000 pixels, above data\.max_image_pixels"):
            load_rgb(bomb_png(10000, 10000), "row 3")
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's own limit is left as it was


def test_the_configured_pixel_limit_is_used_both_ways(tmp_path):
    image = write_bytes(tmp_path / "x.png", png_bytes((40, 40)))
    with pytest.raises(InputError, match=r"row 2: image .*x\.png is 40x40 = 1600 pixels, above data\.max_image_pixels=1000"):
        load_rgb(image, "row 2", ImageLimits(max_pixels=1000))
    big = write_bytes(tmp_path / "big.png", png_bytes((300, 300)))
    assert load_rgb(big, "row 2", ImageLimits(max_pixels=None)).size == (300, 300)
    saved = Image.MAX_IMAGE_PIXELS
    try:  # a limit above PIL's is honoured: PIL's check follows the configured one while decoding
        Image.MAX_IMAGE_PIXELS = 1000
        assert load_rgb(big, "row 2", ImageLimits(max_pixels=100_000)).size == (300, 300)
        assert Image.MAX_IMAGE_PIXELS == 1000
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@pytest.mark.parametrize("size, message", [
    ((4, 4), r"is 4x4 pixels, a side below data\.min_image_side=8"),
    ((24, 7), r"is 24x7 pixels, a side below data\.min_image_side=8"),
    ((400, 20), r"is 400x20 pixels, aspect ratio 20\.0 above data\.max_aspect_ratio=8"),
    ((20, 170), r"is 20x170 pixels, aspect ratio 8\.5 above data\.max_aspect_ratio=8"),
])
def test_degenerate_images_are_refused(tmp_path, size, message):
    image = write_bytes(tmp_path / "x.png", png_bytes(size))
    with pytest.raises(InputError, match=r"^row 5: image .*x\.png " + message):
        load_rgb(image, "row 5", ImageLimits())
    assert load_rgb(image, "row 5", ImageLimits(max_aspect_ratio=None, min_side=None)).size == size
    assert load_rgb(image, "row 5").size == size  # without limits: decompression bombs only


def test_bad_limits_name_their_key():
    with pytest.raises(InputError, match=r"^data\.max_aspect_ratio: expected null or a number >= 1, got 0\.5$"):
        ImageLimits(max_aspect_ratio=0.5)
    with pytest.raises(InputError, match=r"^data\.min_image_side: expected null or a number >= 1, got 0$"):
        ImageLimits(min_side=0)


def test_bombs_and_degenerate_images_are_skipped_with_on_bad_sample_skip(tiny_components, jsonl_pairs, tmp_path, caplog):
    import logging

    from tests.data.test_latent_cache import datamodule

    (jsonl_pairs.parent / "img" / "l2.png").write_bytes(bomb_png(20000, 20000))
    (jsonl_pairs.parent / "img" / "w5.png").write_bytes(png_bytes((400, 20)))
    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    with pytest.raises(InputError, match=r"pairs\.jsonl line 6: image .*w5\.png is 400x20 pixels, aspect ratio 20\.0"):
        dm.setup("fit")
    skip, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", on_bad_sample="skip")
    with caplog.at_level(logging.WARNING):
        skip.setup("fit")
    assert sorted(skip.train_set.indices) == [0, 1, 3, 4, 6, 7]
    assert "skipped 2 of 8 pairs" in caplog.text
    # other limits are another cache: the pairs they let through are encoded, not left marked invalid
    wide, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache", on_bad_sample="skip", max_aspect_ratio=None)
    wide.setup("fit")
    assert wide.cache_path() != skip.cache_path() and sorted(wide.train_set.indices) == [0, 1, 3, 4, 5, 6, 7]


# ------------------------------------------------------------------ the latent cache
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupt_cache_file_names_itself_and_the_fix(tiny_components, jsonl_pairs, tmp_path, damage):
    from tests.data.test_latent_cache import datamodule

    dm, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    dm.setup("fit")
    file = dm.cache_path()
    data = file.read_bytes()
    file.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    again, _ = datamodule(tiny_components, jsonl_pairs, tmp_path / "cache")
    with pytest.raises(InputError) as err:
        again.setup("fit")
    message = one_line(err)
    assert message.startswith(f"{file}: cannot read the latent cache (")
    assert message.endswith(f"it is truncated or corrupt: delete {file.parent} and rerun to rebuild it")


# ------------------------------------------------------------------ parquet rows
def pickapic_file(tmp_path: Path, **row) -> Path:
    columns = {"jpg_0": [png_bytes(), png_bytes()], "jpg_1": [png_bytes(color=(0, 0, 9))] * 2, "label_0": [1.0, 0.0],
               "caption": ["a", "b"]}
    for name, value in row.items():
        columns[name][1] = value
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "caption": pa.string()}
    table = pa.table({c: pa.array(v, types.get(c)) if c in types else v for c, v in columns.items()})
    pq.write_table(table, tmp_path / "p.parquet")
    return tmp_path / "p.parquet"


@pytest.mark.parametrize("row, message", [
    ({"label_0": 0.7}, r"row 1: label_0 must be 0, 0\.5 or 1, got 0\.7"),
    ({"label_0": None}, r"row 1: label_0 must be 0, 0\.5 or 1, got None"),
    ({"label_0": float("nan")}, r"row 1: label_0 must be 0, 0\.5 or 1, got nan"),
    ({"jpg_1": None}, r"row 1: column jpg_1 is null; expected encoded image bytes"),
    ({"jpg_0": b""}, r"row 1: column jpg_0 is empty; expected encoded image bytes"),
])
def test_bad_pickapic_rows_are_named(tmp_path, row, message):
    with pytest.raises(InputError, match=r"p\.parquet " + message) as err:
        PickAPicReader(pickapic_file(tmp_path, **row)).read()
    one_line(err)


def test_pickapic_text_labels_null_captions_and_image_structs(tmp_path):
    pq.write_table(pa.table({"jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": ["1"], "caption": ["a"]}), tmp_path / "s.parquet")
    with pytest.raises(InputError, match=r"s\.parquet row 0: label_0 must be 0, 0\.5 or 1, got '1'"):
        PickAPicReader(tmp_path / "s.parquet").read()
    # a null caption is an empty one: the DataModule names it, or skips it with on_bad_sample=skip
    assert PickAPicReader(pickapic_file(tmp_path, caption=None)).read()[1].prompt == ""
    struct = pa.array([{"bytes": png_bytes(), "path": None}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"jpg_0": struct, "jpg_1": struct, "label_0": [0.0], "caption": ["a"]}), tmp_path / "h.parquet")
    assert PickAPicReader(tmp_path / "h.parquet").read()[0].image_w == png_bytes()


def test_dual_parquet_scores_and_images(tmp_path):
    def write(**row1):
        rows = {"prompt": ["p", "p"], "image": [png_bytes(), png_bytes()], "quality": [0.2, 0.9], "unsafe": [0.0, 0.0]}
        for name, value in row1.items():
            rows[name][1] = value
        pq.write_table(pa.table({c: pa.array(v, pa.binary() if c == "image" else None) for c, v in rows.items()}),
                       tmp_path / "d.parquet")
        return tmp_path / "d.parquet"

    with pytest.raises(InputError, match=r"d\.parquet row 1: key 'quality' must be a number in \[0, 1\], got NaN"):
        read_annotations(write(quality=float("nan")))
    with pytest.raises(InputError, match=r"d\.parquet row 1: key 'unsafe' must be a number in \[0, 1\], got inf"):
        read_annotations(write(unsafe=float("inf")))
    with pytest.raises(InputError, match=r"d\.parquet row 1: column 'image' is null"):
        read_annotations(write(image=None))
    assert read_annotations(write(unsafe=float("nan")))[0].images[1].unsafe is None  # NaN: a missing score


# ------------------------------------------------------------------ JSONL values
@pytest.mark.parametrize("extra, message", [
    ({"extras": {"cost_w": "high"}}, r"line 1: extras\['cost_w'\] must be a finite number, got 'high'"),
    ({"extras": [1.0]}, r"line 1: key 'extras' must be an object of numbers"),
    ({"categories": {"a": 1}}, r"line 1: categories must be a list of names or a comma-separated string"),
    ({"categories": ["violence", "--"]}, r"line 1: categories \['violence', '--'\] holds an entry without a name"),
    ({"safe_prompt": 3}, r"line 1: key 'safe_prompt' must be a string or null, got 3"),
    ({"chosen": ""}, r"line 1: key 'chosen' must be an image path .*got ''"),
])
def test_bad_jsonl_values_are_named(tmp_path, extra, message):
    file = pairs_jsonl(tmp_path, [{"prompt": "x", "chosen": "a.png", "rejected": "b.png", **extra}])
    with pytest.raises(InputError, match=r"pairs\.jsonl " + message) as err:
        JsonlReader(file).read()
    one_line(err)


def test_jsonl_with_a_bom_and_without_pairs(tmp_path):
    file = pairs_jsonl(tmp_path, [{"prompt": "x", "chosen": "a.png", "rejected": "b.png"}])
    file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())
    assert len(JsonlReader(file).read()) == 1
    file.write_text("\n\n")
    with pytest.raises(InputError, match=r"pairs\.jsonl: no pairs"):
        JsonlReader(file).read()


# ------------------------------------------------------------------ the cases, end to end
def test_the_cases_are_many_distinct_and_cover_every_kind():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 35
    for kind in ("csv-", "coprov2-", "jsonl-", "image-", "pickapic-", "dual-", "data-path-"):
        assert any(i.startswith(kind) for i in ids), kind
    for case in CASES:
        re.compile(case.expect)
