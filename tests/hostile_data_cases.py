"""Hostile data inputs for train.py, one case each: ``make`` writes the bad files under a temporary folder and
returns the overrides that select them; ``expect`` is a regex the one error line (after ``error: ``) matches.

The data groups covered: CoProV2 CSVs (encodings, headers, names, pair keys, paths), JSONL pairs (lines,
keys, paths, images), Pick-a-Pic parquet (schema, labels, bytes, captions), dual-annotated rows (scores,
paths) and the images themselves (empty, truncated, not an image, decompression bombs, degenerate sizes).
Run by tests/data/test_hostile_data.py (train.py in a subprocess) and by the shared validation table. A path
that does not exist may be caught by train.py's checks before any reader runs: those cases accept both wordings.
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class HostileCase:
    id: str                                   # short unique name
    make: Callable[[Path, Path], list[str]]   # (tmp_path, tiny_pipeline_dir) -> train.py overrides
    expect: str                               # regex the single error line (after "error: ") must match


# ------------------------------------------------------------------ writers
def png_bytes(size: tuple[int, int] = (24, 24), color: tuple[int, int, int] = (200, 30, 30), noise: bool = False) -> bytes:
    """An encoded RGB PNG; ``noise`` makes it incompressible (so that a truncated copy lacks pixel data)."""
    import numpy as np
    from PIL import Image

    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", size, color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


COPRO_HEADER = "prompt,image,category"
COPRO_ROWS = [
    '"a violent scene",u_idx_0_0.png,violence',
    '"a calm scene",s_idx_0_0.png,violence',
    '"a hateful sign",u_idx_1_0.png,hate',
    '"a friendly sign",s_idx_1_0.png,hate',
]


def coprov2(tmp: Path, lines: list[str] | None = None, raw: bytes | None = None) -> list[str]:
    """A CoProV2 train CSV beside its four images; ``lines`` replace the rows after the header, ``raw`` the file."""
    folder = tmp / "copro"
    for name in ("u_idx_0_0.png", "s_idx_0_0.png", "u_idx_1_0.png", "s_idx_1_0.png"):
        write(folder / name, png_bytes(color=(200, 0, 0) if name.startswith("u") else (0, 200, 0)))
    text = "\n".join([COPRO_HEADER] + (COPRO_ROWS if lines is None else lines)) + "\n"
    csv = write(folder / "train.csv", raw if raw is not None else text)
    return ["data=coprov2", f"data.path={csv}"]


def good_pair(i: int) -> dict[str, Any]:
    return {"prompt": f"a red circle {i}", "chosen": f"img/w{i}.png", "rejected": f"img/l{i}.png",
            "categories": ["violence" if i % 2 else "hate"]}


def jsonl(tmp: Path, edit: Callable[[list[Any]], None] | None = None, bad_image: bytes | None = None,
          raw: bytes | None = None) -> list[str]:
    """Four pairs in the JSONL format; ``edit`` changes the records (dicts, or strings written as they are),
    ``bad_image`` becomes line 2's rejected image ``img/bad.png``; ``raw`` replaces the file."""
    folder = tmp / "pairs"
    for i in range(4):
        write(folder / "img" / f"w{i}.png", png_bytes(color=(200, 20 + i, 20)))
        write(folder / "img" / f"l{i}.png", png_bytes(color=(20, 20 + i, 200)))
    records: list[Any] = [good_pair(i) for i in range(4)]
    if bad_image is not None:
        write(folder / "img" / "bad.png", bad_image)
        records[1]["rejected"] = "img/bad.png"
    if edit is not None:
        edit(records)
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"
    file = write(folder / "pairs.jsonl", raw if raw is not None else text)
    return ["data=jsonl", f"data.path={file}"]


def set_line(index: int, **values: Any) -> Callable[[list[Any]], None]:
    def edit(records: list[Any]) -> None:
        records[index].update(values)
        for key in [k for k, v in values.items() if v is _DROP]:
            del records[index][key]
    return edit


_DROP = object()


def pickapic(tmp: Path, **row1: Any) -> list[str]:
    """Three Pick-a-Pic rows in one parquet file; ``row1`` overrides columns of row 1 (the second row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"jpg_0": png_bytes(color=(200, 0, i)), "jpg_1": png_bytes(color=(0, 0, 200 - i)), "label_0": 1.0,
             "caption": f"a red circle {i}"} for i in range(3)]
    rows[1].update(row1)
    table = pa.table({"jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
                      "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
                      "label_0": pa.array([r["label_0"] for r in rows]),
                      "caption": pa.array([r["caption"] for r in rows], pa.string())})
    file = tmp / "pickapic" / "train-0.parquet"
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, file)
    return ["data=pickapic", f"data.path={file}"]


def dual_rows(tmp: Path) -> list[dict[str, Any]]:
    folder = tmp / "dual"
    for i in range(4):
        write(folder / "images" / f"{i}.png", png_bytes(color=(60 * i, 100, 100)))
    return [{"prompt": f"a red circle {i // 2}", "image": f"images/{i}.png", "quality": 0.9 if i % 2 else 0.2,
             "unsafe": 0.0} for i in range(4)]


def dual_jsonl(tmp: Path, **row1: Any) -> list[str]:
    rows = dual_rows(tmp)
    rows[1].update(row1)
    file = write(tmp / "dual" / "annotations.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    return ["data=dual", "objective=spo", f"data.path={file}"]


def dual_parquet(tmp: Path, **row1: Any) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = dual_rows(tmp)
    for row in rows:
        row["image"] = (tmp / "dual" / row["image"]).read_bytes()
    rows[1].update(row1)
    table = pa.table({c: pa.array([r[c] for r in rows], type=pa.binary() if c == "image" else None) for c in rows[0]})
    file = tmp / "dual" / "annotations.parquet"
    pq.write_table(table, file)
    return ["data=dual", "objective=spo", f"data.path={file}"]


def symlink(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


# ------------------------------------------------------------------ cases
def _csv_latin1(tmp: Path, _: Path) -> list[str]:
    text = "\n".join([COPRO_HEADER, '"un caf\u00e9 violent",u_idx_0_0.png,violence'] + COPRO_ROWS[1:]) + "\n"
    return coprov2(tmp, raw=text.encode("latin-1"))


def _csv_utf16(tmp: Path, _: Path) -> list[str]:
    return coprov2(tmp, raw="\n".join([COPRO_HEADER] + COPRO_ROWS).encode("utf-16"))


def _data_path_loop(tmp: Path, _: Path) -> list[str]:
    coprov2(tmp)
    return ["data=coprov2", f"data.path={symlink(tmp / 'loop.csv', tmp / 'loop.csv')}"]


def _data_path_directory(tmp: Path, _: Path) -> list[str]:
    coprov2(tmp)
    return ["data=coprov2", f"data.path={tmp / 'copro'}"]


def _image_dir_missing(tmp: Path, _: Path) -> list[str]:
    return coprov2(tmp) + [f"data.reader.image_dir={tmp / 'no_such_folder'}"]


def _copro_absolute(tmp: Path, _: Path) -> list[str]:
    outside = write(tmp / "elsewhere" / "u_idx_0_0.png", png_bytes())
    return coprov2(tmp, [f'"a violent scene",{outside},violence'] + COPRO_ROWS[1:])


def _copro_symlink_out(tmp: Path, _: Path) -> list[str]:
    overrides = coprov2(tmp)
    outside = write(tmp / "elsewhere" / "x.png", png_bytes())
    (tmp / "copro" / "u_idx_1_0.png").unlink()
    symlink(tmp / "copro" / "u_idx_1_0.png", outside)
    return overrides


def _scp_nested_missing(tmp: Path, _: Path) -> list[str]:
    clean = pickapic(tmp)[1].split("=", 1)[1]
    return ["data=scp", "objective=scdpo", f"data.reader.harmful.path={tmp / 'missing.csv'}",
            f"data.reader.clean.path={clean}", f"data.cost_model={ROOT / 'assets' / 'toy' / 'cost_model'}"]


def _jsonl_outside_symlink(tmp: Path, _: Path) -> list[str]:
    overrides = jsonl(tmp, set_line(2, chosen="img/link.png"))
    symlink(tmp / "pairs" / "img" / "link.png", write(tmp / "elsewhere" / "x.png", png_bytes()))
    return overrides


def _jsonl_image_loop(tmp: Path, _: Path) -> list[str]:
    overrides = jsonl(tmp, set_line(2, chosen="img/loop.png"))
    symlink(tmp / "pairs" / "img" / "loop.png", tmp / "pairs" / "img" / "loop.png")
    return overrides


def _jsonl_image_directory(tmp: Path, _: Path) -> list[str]:
    overrides = jsonl(tmp, set_line(2, chosen="img/folder.png"))
    (tmp / "pairs" / "img" / "folder.png").mkdir()
    return overrides


def _jsonl_folder_without_pairs(tmp: Path, _: Path) -> list[str]:
    (tmp / "empty_folder").mkdir()
    return ["data=jsonl", f"data.path={tmp / 'empty_folder'}"]


def _dual_outside(tmp: Path, _: Path) -> list[str]:
    write(tmp / "elsewhere" / "x.png", png_bytes())
    return dual_jsonl(tmp, image="../elsewhere/x.png")


CASES: list[HostileCase] = [
    # --- CSV files (CoProV2 train CSV)
    HostileCase("csv-latin1-byte", _csv_latin1, r"train\.csv line 2: byte 0xe9 is not UTF-8; the file must be UTF-8"),
    HostileCase("csv-utf16", _csv_utf16, r"train\.csv: the file is UTF-16; expected UTF-8"),
    HostileCase("csv-duplicate-column", lambda t, _: coprov2(t, raw=(
        "prompt,image,category,prompt\n" + "\n".join(r + ',"other"' for r in COPRO_ROWS) + "\n").encode()),
        r"train\.csv: column 'prompt' appears 2 times in the header"),
    HostileCase("csv-empty-file", lambda t, _: coprov2(t, raw=b""), r"train\.csv: empty file; .*needs a header"),
    HostileCase("csv-header-only", lambda t, _: coprov2(t, []), r"train\.csv: no rows"),
    HostileCase("csv-missing-column", lambda t, _: coprov2(t, raw=b"prompt,image\nx,u_idx_0_0.png\n"),
                r"train\.csv: missing column\(s\) \['category'\]"),
    HostileCase("csv-unquoted-comma", lambda t, _: coprov2(t, ["a violent, bloody scene,u_idx_0_0.png,violence"] + COPRO_ROWS[1:]),
                r"train\.csv row 2: 4 cells, the header has 3"),
    HostileCase("csv-unclosed-quote", lambda t, _: coprov2(t, COPRO_ROWS[:2] + ['"a hateful sign,u_idx_1_0.png,hate'] + COPRO_ROWS[3:]),
                r"train\.csv line 4: not valid CSV \(.*\); a quote in the row starting here is not closed"),
    HostileCase("csv-category-without-name", lambda t, _: coprov2(t, ['"a violent scene",u_idx_0_0.png,???'] + COPRO_ROWS[1:]),
                r"train\.csv row 2: category '\?\?\?' holds an entry without a name"),
    # --- CoProV2 names and pair keys
    HostileCase("coprov2-key-collision", lambda t, _: coprov2(t, COPRO_ROWS + ['"a violent scene",u_idx_0000000_0.png,hate']),
                r"train\.csv row 6: image 'u_idx_0000000_0\.png' has the pair key u_idx_0_0 of row 2's image 'u_idx_0_0\.png'"),
    HostileCase("coprov2-bad-image-name", lambda t, _: coprov2(t, COPRO_ROWS + ['"x",photo.png,hate']),
                r"train\.csv row 6: image 'photo\.png' is not named u_idx_<k>_<j>"),
    HostileCase("coprov2-test-layout", lambda t, _: coprov2(t, ['"a fight",0000000_0.jpg,violence']),
                r"train\.csv row 2: image '0000000_0\.jpg' is named like the CoProV2 test CSV"),
    HostileCase("coprov2-missing-partner", lambda t, _: coprov2(t, COPRO_ROWS[:3]), r"train\.csv row 4: .*has no s_idx_1_0 partner"),
    HostileCase("coprov2-image-missing", lambda t, _: coprov2(t, COPRO_ROWS + ['"x",u_idx_2_0.png,hate']),
                r"train\.csv row 6: image file not found: .*u_idx_2_0\.png"),
    HostileCase("coprov2-parent-path", lambda t, _: coprov2(t, ['"a violent scene",../u_idx_0_0.png,violence'] + COPRO_ROWS[1:]),
                r"train\.csv row 2: image '\.\./u_idx_0_0\.png' leads outside the dataset's folder"),
    HostileCase("coprov2-absolute-path", _copro_absolute, r"train\.csv row 2: image '/.*u_idx_0_0\.png' leads outside"),
    HostileCase("coprov2-symlink-outside", _copro_symlink_out, r"train\.csv row 4: image 'u_idx_1_0\.png' leads outside"),
    HostileCase("coprov2-image-dir-missing", _image_dir_missing, r"data\.reader\.image_dir=.*no_such_folder: does not exist"),
    # --- data.path itself
    HostileCase("data-path-missing", lambda t, _: ["data=coprov2", f"data.path={t / 'none.csv'}"],
                r"data\.path=.*none\.csv: (does not exist|no such file or directory)"),
    HostileCase("data-path-symlink-loop", _data_path_loop, r"data\.path=.*loop\.csv: (is )?a symlink loop"),
    HostileCase("data-path-directory", _data_path_directory,
                r"data\.path=.*copro: is a directory, expected a file; expected the CoProV2 CSV file"),
    HostileCase("scp-nested-path-missing", _scp_nested_missing,
                r"data\.reader\.harmful\.path=.*missing\.csv: (does not exist|no such file or directory)"),
    HostileCase("jsonl-folder-without-pairs", _jsonl_folder_without_pairs,
                r"data\.path=.*empty_folder: .*pairs\.jsonl does not exist; expected a \.jsonl file or a folder with pairs\.jsonl"),
    # --- JSONL lines and keys
    HostileCase("jsonl-invalid-json", lambda t, _: jsonl(t, lambda r: r.insert(1, "{not json")),
                r"pairs\.jsonl line 2: invalid JSON"),
    HostileCase("jsonl-not-an-object", lambda t, _: jsonl(t, lambda r: r.insert(1, "[1, 2]")),
                r"pairs\.jsonl line 2: expected a JSON object"),
    HostileCase("jsonl-missing-chosen", lambda t, _: jsonl(t, set_line(1, chosen=_DROP)),
                r"pairs\.jsonl line 2: key 'chosen' must be a string"),
    HostileCase("jsonl-extras-not-a-number", lambda t, _: jsonl(t, set_line(1, extras={"cost_w": "high"})),
                r"pairs\.jsonl line 2: extras\['cost_w'\] must be a finite number"),
    HostileCase("jsonl-categories-not-names", lambda t, _: jsonl(t, set_line(1, categories=[1, 2])),
                r"pairs\.jsonl line 2: categories must be a list of names"),
    HostileCase("jsonl-safe-prompt-not-text", lambda t, _: jsonl(t, set_line(1, safe_prompt=["x"])),
                r"pairs\.jsonl line 2: key 'safe_prompt' must be a string or null"),
    HostileCase("jsonl-some-without-rejected", lambda t, _: jsonl(t, set_line(1, rejected=_DROP)),
                r"pairs\.jsonl: either every line has 'rejected'"),
    HostileCase("jsonl-latin1-byte", lambda t, _: jsonl(t, raw=(json.dumps(good_pair(0)) + "\n" +
                                                              json.dumps(good_pair(1)).replace("red", "r\u00e9d")).encode("latin-1")),
                r"pairs\.jsonl line 2: byte 0xe9 is not UTF-8"),
    HostileCase("jsonl-empty-caption", lambda t, _: jsonl(t, set_line(2, prompt="  ")),
                r"pairs\.jsonl line 3: empty caption"),
    HostileCase("jsonl-parent-path", lambda t, _: jsonl(t, set_line(2, rejected="../outside.png")),
                r"pairs\.jsonl line 3: rejected '\.\./outside\.png' leads outside the dataset's folder"),
    HostileCase("jsonl-absolute-path", lambda t, _: jsonl(t, set_line(2, rejected="/etc/hostname")),
                r"pairs\.jsonl line 3: rejected '/etc/hostname' leads outside"),
    HostileCase("jsonl-symlink-outside", _jsonl_outside_symlink, r"pairs\.jsonl line 3: chosen 'img/link\.png' leads outside"),
    HostileCase("jsonl-image-symlink-loop", _jsonl_image_loop, r"pairs\.jsonl line 3: image file .*loop\.png is a symlink loop"),
    HostileCase("jsonl-image-is-directory", _jsonl_image_directory,
                r"pairs\.jsonl line 3: image file .*folder\.png is a directory"),
    HostileCase("unknown-category", lambda t, _: jsonl(t) + ["data.categories=[nudity_typo]"],
                r"data\.categories: unknown category \['nudity_typo'\]"),
    # --- images
    HostileCase("image-zero-byte", lambda t, _: jsonl(t, bad_image=b""), r"pairs\.jsonl line 2: cannot read image .*bad\.png"),
    HostileCase("image-truncated", lambda t, _: jsonl(t, bad_image=png_bytes((64, 64), noise=True)[:3000]),
                r"pairs\.jsonl line 2: cannot read image .*bad\.png: .*truncated"),
    HostileCase("image-not-an-image", lambda t, _: jsonl(t, bad_image=b"<html>not found</html>"),
                r"pairs\.jsonl line 2: cannot read image .*bad\.png: cannot identify image file"),
    HostileCase("image-decompression-bomb", lambda t, _: jsonl(t, bad_image=bomb_png(20000, 20000)),
                r"pairs\.jsonl line 2: image .*bad\.png is 20000x20000 = 400000000 pixels, above data\.max_image_pixels=89478485"),
    HostileCase("image-above-configured-pixels", lambda t, _: jsonl(t, bad_image=png_bytes((40, 40))) + ["data.max_image_pixels=1000"],
                r"pairs\.jsonl line 2: image .*bad\.png is 40x40 = 1600 pixels, above data\.max_image_pixels=1000"),
    HostileCase("image-too-small", lambda t, _: jsonl(t, bad_image=png_bytes((4, 4))),
                r"pairs\.jsonl line 2: image .*bad\.png is 4x4 pixels, a side below data\.min_image_side=8"),
    HostileCase("image-extreme-aspect-ratio", lambda t, _: jsonl(t, bad_image=png_bytes((400, 20))),
                r"pairs\.jsonl line 2: image .*bad\.png is 400x20 pixels, aspect ratio 20\.0 above data\.max_aspect_ratio=8"),
    HostileCase("image-bomb-in-parquet-bytes", lambda t, _: pickapic(t, jpg_1=bomb_png(30000, 10000)),
                r"train-0\.parquet row 1: image <bytes> is 30000x10000 = 300000000 pixels, above data\.max_image_pixels"),
    # --- Pick-a-Pic parquet
    HostileCase("pickapic-not-parquet", lambda t, _: ["data=pickapic", f"data.path={write(t / 'x.parquet', b'PAR1 nope')}"],
                r"x\.parquet: not a readable parquet file"),
    HostileCase("pickapic-wrong-schema", lambda t, _: ["data=pickapic", f"data.path={_parquet(t, image=[b'x'], text=['y'])}"],
                r"other\.parquet: missing column\(s\) \['jpg_0', 'jpg_1', 'label_0', 'caption'\]"),
    HostileCase("pickapic-label-out-of-range", lambda t, _: pickapic(t, label_0=0.7),
                r"train-0\.parquet row 1: label_0 must be 0, 0\.5 or 1, got 0\.7"),
    HostileCase("pickapic-label-null", lambda t, _: pickapic(t, label_0=None),
                r"train-0\.parquet row 1: label_0 must be 0, 0\.5 or 1, got None"),
    HostileCase("pickapic-label-nan", lambda t, _: pickapic(t, label_0=float("nan")),
                r"train-0\.parquet row 1: label_0 must be 0, 0\.5 or 1, got nan"),
    HostileCase("pickapic-null-image", lambda t, _: pickapic(t, jpg_1=None),
                r"train-0\.parquet row 1: column jpg_1 is null; expected encoded image bytes"),
    HostileCase("pickapic-null-caption", lambda t, _: pickapic(t, caption=None), r"train-0\.parquet row 1: empty caption"),
    HostileCase("pickapic-garbage-bytes", lambda t, _: pickapic(t, jpg_0=b"\xff\xd8 not a jpeg"),
                r"train-0\.parquet row 1: cannot read image <bytes>"),
    # --- dual-annotated rows
    HostileCase("dual-quality-above-one", lambda t, _: dual_jsonl(t, quality=1.5),
                r"annotations\.jsonl line 2: key 'quality' must be a number in \[0, 1\], got 1\.5"),
    HostileCase("dual-unsafe-negative", lambda t, _: dual_jsonl(t, unsafe=-0.1),
                r"annotations\.jsonl line 2: key 'unsafe' must be a number in \[0, 1\], got -0\.1"),
    HostileCase("dual-quality-nan-parquet", lambda t, _: dual_parquet(t, quality=float("nan")),
                r"annotations\.parquet row 1: key 'quality' must be a number in \[0, 1\], got NaN"),
    HostileCase("dual-null-image-parquet", lambda t, _: dual_parquet(t, image=None),
                r"annotations\.parquet row 1: column 'image' is null"),
    HostileCase("dual-image-outside", _dual_outside,
                r"annotations\.jsonl line 2: image '\.\./elsewhere/x\.png' leads outside the dataset's folder"),
]


def _parquet(tmp: Path, **columns: list[Any]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = tmp / "other.parquet"
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), file)
    return file
