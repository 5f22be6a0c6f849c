"""Data folders: the imagefolder reader, `check_folder` on each kind of problem, the stable split, the CLI."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from engine.cli import main
from train.data import DataError, check_folder, load_split, read_examples, split_of

REPO = Path(__file__).resolve().parents[1]


def _image(path: Path, size: tuple[int, int] = (40, 30), fmt: str = "JPEG") -> Path:
    """A solid image of a colour of its own (`data check` warns about listed images with the same bytes)."""
    import hashlib

    path.parent.mkdir(parents=True, exist_ok=True)
    colour = tuple(hashlib.sha256(path.name.encode("utf-8", "surrogateescape")).digest()[:3])
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _jsonl(folder: Path, rows: list[dict[str, object]] | list[str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path = folder / "metadata.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three good images, one in a subfolder, listed in metadata.jsonl."""
    _image(tmp_path / "a.jpg", (40, 30))
    _image(tmp_path / "b.png", (20, 50), "PNG")
    _image(tmp_path / "sub" / "c.jpg", (60, 60))
    _jsonl(
        tmp_path,
        [
            {"file_name": "a.jpg", "text": "The student wrote 7 + 5 = 12, which is correct."},
            {"file_name": "./b.png", "text": "  A clock showing 3:30.  ", "extra": 1},
            {"file_name": "sub/c.jpg", "text": "Tally marks for 4 and 9."},
        ],
    )
    return tmp_path


# ---------------------------------------------------------------------------------------------------------
# The reader.


def test_read_jsonl_keeps_order_normalises_names_and_strips_captions(folder: Path) -> None:
    examples = read_examples(folder)
    assert [e.file_name for e in examples] == ["a.jpg", "b.png", "sub/c.jpg"]
    assert examples[1].text == "A clock showing 3:30."
    assert examples[2].path == folder / "sub" / "c.jpg"


def test_read_csv_with_quoted_commas(tmp_path: Path) -> None:
    _image(tmp_path / "x" / "1.jpg")
    _image(tmp_path / "2.jpg")
    (tmp_path / "metadata.csv").write_text(
        'file_name,text\nx/1.jpg,"Bar graph: 3, 5 and 2."\n2.jpg,Number line: 3 jumps of 2.\n', encoding="utf-8"
    )
    examples = read_examples(tmp_path)
    assert [(e.file_name, e.text) for e in examples] == [
        ("x/1.jpg", "Bar graph: 3, 5 and 2."),
        ("2.jpg", "Number line: 3 jumps of 2."),
    ]


def test_other_caption_column_in_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl, csvf = tmp_path / "j", tmp_path / "c"
    for f in (jsonl, csvf):
        _image(f / "a.jpg")
    _jsonl(jsonl, [{"file_name": "a.jpg", "description": "Four stars."}])
    (csvf / "metadata.csv").write_text("description,file_name\nFour stars.,a.jpg\n", encoding="utf-8")
    for f in (jsonl, csvf):
        assert [e.text for e in read_examples(f, caption_column="description")] == ["Four stars."]
        with pytest.raises(DataError):
            read_examples(f)  # no "text" column there


def test_read_examples_raises_with_every_bad_line(tmp_path: Path) -> None:
    _jsonl(tmp_path, [{"file_name": "a.jpg", "text": "ok"}, "{not json", {"file_name": "b.jpg", "text": ""}])
    with pytest.raises(DataError) as info:
        read_examples(tmp_path)
    message = str(info.value)
    assert "metadata.jsonl:2: malformed JSON" in message
    assert "metadata.jsonl:3: empty caption for b.jpg" in message
    assert len(info.value.problems) == 2


# ---------------------------------------------------------------------------------------------------------
# check_folder: one test per kind of problem, then all at once.


def _only_problem(folder: Path) -> str:
    report = check_folder(folder)
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    return str(report.problems[0])


def test_clean_folder_is_ok_with_stats(folder: Path) -> None:
    report = check_folder(folder)
    assert report.ok and not report.warnings
    assert len(report.examples) == 3
    assert report.sizes["b.png"] == (20, 50)
    stats = report.stats()
    assert stats["examples"] == 3
    assert stats["image_width"] == {"min": 20, "median": 40, "mean": 40.0, "max": 60}
    assert stats["caption_words"]["max"] == 11  # type: ignore[index]
    summary = report.summary()
    assert "3 usable, 0 problems" in summary and "image width px: min 20" in summary


def test_missing_image(folder: Path) -> None:
    (folder / "sub" / "c.jpg").unlink()
    # Named with the metadata line that lists it, so the line to fix is easy to find.
    assert _only_problem(folder) == "sub/c.jpg: image not found (listed at metadata.jsonl:3)"


def test_unreadable_image(folder: Path) -> None:
    (folder / "a.jpg").write_text("this is not a picture")
    assert _only_problem(folder).startswith("a.jpg: unreadable image")


def test_postscript_under_an_image_name_is_not_handed_to_ghostscript(folder: Path) -> None:
    (folder / "a.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto stroke\n")
    assert _only_problem(folder).startswith("a.jpg: unreadable image (not an image format")  # as the engine refuses it


def test_a_file_the_system_refuses_is_named_as_such_not_as_corrupt(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    real_open = Image.open

    def open_image(fp: object, *args: object, **kwargs: object) -> object:
        if Path(str(fp)).name == "a.jpg":  # what open() raises for a file of mode 000, to a user other than root
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", open_image)
    assert _only_problem(folder) == "a.jpg: cannot read the file: Permission denied (listed at metadata.jsonl:1)"


def test_a_heic_photo_is_read_as_the_engine_reads_it(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    from engine import images

    with Image.open(folder / "a.jpg") as photo:
        pillow_heif.from_pillow(photo).save(folder / "a.heic")  # without registering PIL's HEIF opener here
    (folder / "a.jpg").unlink()
    text = (folder / "metadata.jsonl").read_text().replace('"a.jpg"', '"a.heic"')
    (folder / "metadata.jsonl").write_text(text)
    # Each in a fresh process, where nothing else has taught PIL to read HEIF: the data check, and the
    # training loader (as in a DataLoader worker).
    check = f"""
from pathlib import Path
from train.data import check_folder
report = check_folder(Path({str(folder)!r}))
assert report.ok and [e.file_name for e in report.examples] == ["a.heic", "b.png", "sub/c.jpg"], report.problems
print("ok")
"""
    load = f"""
from pathlib import Path
from transformers import Pix2StructImageProcessor, Pix2StructProcessor
from train.data import Example
from train.loop import CaptionDataset
from train.presets import train_tokenizer
processor = Pix2StructProcessor(image_processor=Pix2StructImageProcessor(max_patches=64), tokenizer=train_tokenizer(["a"], 100))
print(CaptionDataset([Example("a.heic", "x", Path({str(folder / "a.heic")!r}))], processor, augment=False, seed=0)._load(0).size)
"""
    for code, expected in ((check, "ok"), (load, "(40, 30)")):
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == expected, result.stderr[-2000:]
    # Without pillow-heif: named as a HEIC photo, with what to install (not "not an image").
    monkeypatch.setattr(images, "enable_heif", lambda: False)
    monkeypatch.setattr("train.data.enable_heif", lambda: False)
    monkeypatch.setattr(Image, "ID", [name for name in Image.ID if "HEIF" not in name.upper()])
    assert re.match(r"a\.heic: a HEIC/HEIF photo, which needs pillow-heif to be read \(.*pip install '\.\[heif\]'", _only_problem(folder))


def test_spreadsheet_blank_rows_backslash_paths_and_json_columns(tmp_path: Path) -> None:
    _image(tmp_path / "sub" / "a.jpg")
    _image(tmp_path / "b.jpg")
    # Spreadsheets save empty rows as ",,": blank lines, not errors. A Windows path gets a hint.
    (tmp_path / "metadata.csv").write_text("file_name,text\nb.jpg,hello\nsub\\a.jpg,x\n,,\n , \n")
    assert _only_problem(tmp_path) == (
        "sub\\a.jpg: image not found (file_name uses '\\'; write paths with '/') (listed at metadata.csv:3)"
    )
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "b.jpg", "text": "x"\n')  # no closing brace
    assert _only_problem(tmp_path) == "metadata.jsonl:1: malformed JSON (Expecting ',' delimiter at column 35)"


def test_truncated_image_is_caught_by_a_full_decode(folder: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((300, 200), 60).convert("RGB").save(buf, format="JPEG", quality=90)
    (folder / "a.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(folder / "a.jpg") as im:  # the header alone looks fine
        assert im.size == (300, 200)
    assert _only_problem(folder).startswith("a.jpg: truncated image")


def test_image_above_the_pixel_cap_is_a_problem_before_training_meets_it(folder: Path) -> None:
    # 8000 x 7000 = 56 MP: training and the engine refuse to decode it, so the check must too.
    Image.new("1", (8000, 7000)).save(folder / "b.png")
    problem = _only_problem(folder)
    assert problem.startswith("b.png: image too large: 8000x7000 = 56.0 MP, above the 50 MP"), problem
    # Above PIL's own warning size (89 MP) the check said the same after Pillow's "DecompressionBombWarning"
    # and its source line.
    Image.new("1", (12000, 12000)).save(folder / "b.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        problem = _only_problem(folder)
    assert problem.startswith("b.png: image too large: 12000x12000 = 144.0 MP"), problem


@pytest.mark.parametrize(
    ("name", "expected"),
    # Python 3.11's is_file raises for a too-long name (-> cannot access); newer ones say False (-> not found).
    [("a\x00.jpg", "contains a NUL character"), ("x" * 300 + ".jpg", "cannot access the file|image not found")],
)
def test_impossible_file_names_are_problems(tmp_path: Path, name: str, expected: str) -> None:
    _image(tmp_path / "ok.jpg")
    _jsonl(tmp_path, [{"file_name": "ok.jpg", "text": "fine"}, {"file_name": name, "text": "bad"}])
    assert re.search(expected, _only_problem(tmp_path))


def test_malformed_json_line_has_its_number(folder: Path) -> None:
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines.insert(1, '{"file_name": "d.jpg", "text": "oops"')
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert _only_problem(folder).startswith("metadata.jsonl:2: malformed JSON")


def test_non_object_json_line(folder: Path) -> None:
    with (folder / "metadata.jsonl").open("a") as f:
        f.write('["a.jpg", "text"]\n')
    assert _only_problem(folder) == "metadata.jsonl:4: expected a JSON object, got list"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"file_name": "a.jpg", "text": "   "}, "metadata.jsonl:1: empty caption for a.jpg"),
        ({"file_name": "a.jpg"}, "metadata.jsonl:1: missing caption column 'text' for a.jpg"),
        ({"file_name": "a.jpg", "text": 7}, "metadata.jsonl:1: caption 'text' of a.jpg is not text: 7"),
        ({"text": "no file"}, "metadata.jsonl:1: missing or empty file_name"),
        # A JSON writer that cut an emoji in half: json.dumps escapes it as \\ud83d, which reads back alone.
        ({"file_name": "a.jpg", "text": "well done \ud83d"},
         "metadata.jsonl:1: caption of a.jpg is not valid Unicode: half of a character ('\\ud83d') at character 11"),
    ],
)
def test_missing_or_empty_caption_or_name(tmp_path: Path, row: dict[str, object], expected: str) -> None:
    _image(tmp_path / "a.jpg")
    _jsonl(tmp_path, [row])
    report = check_folder(tmp_path)
    assert [str(p) for p in report.problems] == [expected]


def test_duplicate_file_name(folder: Path) -> None:
    with (folder / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "sub/./c.jpg", "text": "again"}) + "\n")
    assert _only_problem(folder) == "metadata.jsonl:4: duplicate file_name 'sub/c.jpg' (first listed at metadata.jsonl:3)"


@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/passwd", "sub/../../outside.jpg", "C:/outside.jpg"])
def test_path_escaping_the_folder(tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    _image(tmp_path / "outside.jpg")
    _image(data / "a.jpg")
    _jsonl(data, [{"file_name": "a.jpg", "text": "fine"}, {"file_name": name, "text": "sneaky"}])
    report = check_folder(data)
    assert [str(p) for p in report.problems] == [f"metadata.jsonl:2: file_name {name!r} points outside the folder"]


def test_an_absolute_path_inside_the_folder_is_named_with_its_relative_name(folder: Path) -> None:
    _jsonl(folder, [{"file_name": str(folder.absolute() / "sub" / "c.jpg"), "text": "Tally marks for 4 and 9."}])
    assert _only_problem(folder) == (
        f"metadata.jsonl:1: file_name {str(folder.absolute() / 'sub' / 'c.jpg')!r} is an absolute path; names are "
        "relative to the folder: 'sub/c.jpg'"
    )


def test_symlink_escaping_the_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _image(tmp_path / "outside.jpg")
    _image(data / "a.jpg")
    (data / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    _jsonl(data, [{"file_name": "a.jpg", "text": "fine"}, {"file_name": "link.jpg", "text": "sneaky"}])
    assert "points outside the folder (through a link)" in _only_problem(data)


def test_unlisted_images_are_warnings_only(folder: Path) -> None:
    _image(folder / "sub" / "extra.png", fmt="PNG")
    (folder / "notes.txt").write_text("not an image, not a warning")
    _image(folder / "runs" / "a" / "curves.png", fmt="PNG")  # a training run written inside the data folder
    (folder / "runs" / "a" / "run_config.json").write_text("{}")
    report = check_folder(folder)
    assert report.ok
    assert [str(w) for w in report.warnings] == ["sub/extra.png: image is not listed in metadata.jsonl"]


def test_system_folders_are_neither_read_nor_reported(folder: Path) -> None:
    """A data folder on a Synology share has an @eaDir of thumbnails beside the photos, and a #recycle that may
    hold an old metadata file: neither is data (as `edlight caption` leaves them out)."""
    listed = [e.file_name for e in check_folder(folder).examples]
    _image(folder / "@eaDir" / "a.jpg" / "SYNOPHOTO_THUMB_M.jpg")
    _image(folder / "#recycle" / "old" / "x.jpg")
    _jsonl(folder / "#recycle" / "old", [{"file_name": "x.jpg", "text": "deleted"}])
    report = check_folder(folder)
    assert report.ok and not report.warnings, [str(w) for w in report.warnings]
    assert [e.file_name for e in report.examples] == listed


def test_metadata_file_missing_or_ambiguous(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    assert "no metadata.jsonl or metadata.csv" in _only_problem(tmp_path)
    _jsonl(tmp_path, [{"file_name": "a.jpg", "text": "x"}])
    (tmp_path / "metadata.csv").write_text("file_name,text\na.jpg,x\n")
    assert "both metadata.jsonl and metadata.csv" in _only_problem(tmp_path)


def test_metadata_in_subfolders_lists_images_relative_to_its_folder(tmp_path: Path) -> None:
    """The Hugging Face imagefolder layout with one metadata file per split folder (and one at the top)."""
    _image(tmp_path / "top.jpg")
    _image(tmp_path / "train" / "a.jpg")
    _image(tmp_path / "train" / "deep" / "b.jpg")
    _image(tmp_path / "test" / "c.png", fmt="PNG")
    _jsonl(tmp_path, [{"file_name": "top.jpg", "text": "top"}])
    _jsonl(tmp_path / "train", [{"file_name": "a.jpg", "text": "a"}, {"file_name": "deep/b.jpg", "text": "b"}])
    (tmp_path / "test" / "metadata.csv").write_text("file_name,text\nc.png,c\n")
    examples = read_examples(tmp_path)
    assert [(e.file_name, e.text) for e in examples] == [
        ("top.jpg", "top"), ("test/c.png", "c"), ("train/a.jpg", "a"), ("train/deep/b.jpg", "b"),
    ]  # fmt: skip
    assert examples[3].path == tmp_path / "train" / "deep" / "b.jpg"
    report = check_folder(tmp_path)
    assert report.ok and not report.warnings
    assert report.metadata == "metadata.jsonl, test/metadata.csv, train/metadata.jsonl"


def test_problems_in_subfolder_metadata_name_that_file(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "train" / "b.jpg")
    _image(tmp_path / "other.jpg")
    _jsonl(tmp_path, [{"file_name": "a.jpg", "text": "a"}, {"file_name": "train/b.jpg", "text": "b"}])
    _jsonl(
        tmp_path / "train",
        ["{broken", {"file_name": "b.jpg", "text": "again"}, {"file_name": "../other.jpg", "text": "out"}],
    )
    report = check_folder(tmp_path)
    assert [str(p) for p in report.problems] == [
        "train/metadata.jsonl:1: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        "train/metadata.jsonl:2: duplicate file_name 'train/b.jpg' (first listed at metadata.jsonl:2)",
        "train/metadata.jsonl:3: file_name '../other.jpg' points outside train/ (the names in train/metadata.jsonl are "
        "relative to its folder)",
    ]
    assert not report.warnings  # other.jpg is named by the problem already: no "not listed" as well


def test_a_link_listed_in_a_subfolder_is_one_problem_not_also_unlisted(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "a.jpg")
    _image(tmp_path / "test" / "b.jpg")
    (tmp_path / "test" / "t.jpg").symlink_to(tmp_path / "train" / "a.jpg")
    _jsonl(tmp_path / "train", [{"file_name": "a.jpg", "text": "a"}])
    _jsonl(tmp_path / "test", [{"file_name": "b.jpg", "text": "b"}, {"file_name": "t.jpg", "text": "t"}])
    report = check_folder(tmp_path)
    assert [str(p) for p in report.problems] == [
        "test/metadata.jsonl:2: file_name 't.jpg' points outside test/ (the names in test/metadata.jsonl are relative "
        "to its folder) (through a link)"
    ]
    assert not report.warnings


def test_a_linked_split_folder_is_a_problem_not_a_silent_gap(tmp_path: Path) -> None:
    """The walk does not follow links to folders: a held-out split linked in would vanish unseen."""
    data = tmp_path / "data"
    _image(data / "train" / "a.jpg")
    _jsonl(data / "train", [{"file_name": "a.jpg", "text": "a"}])
    _image(tmp_path / "elsewhere" / "inner" / "b.jpg")
    _jsonl(tmp_path / "elsewhere" / "inner", [{"file_name": "b.jpg", "text": "b"}])
    (data / "test").symlink_to(tmp_path / "elsewhere")  # its metadata is one folder down
    (data / "photos").symlink_to(tmp_path / "elsewhere" / "inner" / "b.jpg")  # a file link is not a folder
    (tmp_path / "empty").mkdir()
    (data / "scratch").symlink_to(tmp_path / "empty")  # a linked folder holding no metadata loses nothing
    (data / "latest").symlink_to(data / "train")  # nor does one to a folder inside: that is read anyway
    assert _only_problem(data) == (
        "test/: a link to a folder holding metadata; links to folders are not followed, so its metadata and images "
        "would be left out: put the folder itself (or a copy) here"
    )
    with pytest.raises(DataError, match="test/: a link to a folder holding metadata"):
        load_split(data, "train")


def test_an_unreadable_or_dangling_metadata_file_is_a_named_problem(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    (tmp_path / "metadata.jsonl").symlink_to(tmp_path / "gone" / "metadata.jsonl")  # a copy that lost its target
    assert _only_problem(tmp_path) == "metadata.jsonl: cannot read the file (No such file or directory)"
    with pytest.raises(DataError, match="metadata.jsonl: cannot read the file"):
        load_split(tmp_path, split="all", skip_bad=True)


def _refuse_listing(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Listing `folder` fails as it does for a user without permission (the tests run as root)."""
    import errno
    import os

    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if Path(str(path)) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_subfolder_is_fatal_not_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder the walk cannot list (as a user without permission meets it) would drop a whole split."""

    _image(tmp_path / "train" / "a.jpg")
    _image(tmp_path / "test" / "b.jpg")
    _jsonl(tmp_path / "train", [{"file_name": "a.jpg", "text": "a"}])
    _jsonl(tmp_path / "test", [{"file_name": "b.jpg", "text": "b"}])
    _refuse_listing(monkeypatch, tmp_path / "test")
    report = check_folder(tmp_path)
    assert [str(p) for p in report.problems] == [
        "test/: cannot read this folder (Permission denied): its metadata and images would be left out"
    ]
    with pytest.raises(DataError, match="test/: cannot read this folder"):
        load_split(tmp_path, split="all", skip_bad=True)


def test_an_unreadable_lost_and_found_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A volume's lost+found (root's, mode 0700) sits in the top folder of a data set on its own disk."""

    _image(tmp_path / "a.jpg")
    _jsonl(tmp_path, [{"file_name": "a.jpg", "text": "a"}])
    (tmp_path / "lost+found").mkdir()
    _refuse_listing(monkeypatch, tmp_path / "lost+found")
    report = check_folder(tmp_path)
    assert report.ok and [str(w) for w in report.warnings] == [
        "lost+found/: cannot read this folder (Permission denied): any metadata and images in it are left out"
    ]
    with caplog.at_level(logging.WARNING, logger="train.data"):
        assert [e.file_name for e in load_split(tmp_path, split="all")] == ["a.jpg"]
    assert "lost+found/: cannot read this folder" in caplog.text


def test_a_name_differing_only_in_unicode_normalisation_gets_a_hint(tmp_path: Path) -> None:
    import unicodedata

    _image(tmp_path / unicodedata.normalize("NFD", "café.jpg"))  # as macOS writes names
    _jsonl(tmp_path, [{"file_name": unicodedata.normalize("NFC", "café.jpg"), "text": "x"}])
    message = _only_problem(tmp_path)
    assert "image not found (the folder has" in message and "differs only in Unicode normalisation" in message


def test_rows_without_a_file_name_key_are_one_problem_naming_the_keys(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    _jsonl(tmp_path, [{"image": "a.jpg", "text": "a"}, {"image": "b.jpg", "text": "b"}])
    assert _only_problem(tmp_path) == "metadata.jsonl: no row has 'file_name'; columns seen: image, text"
    _jsonl(tmp_path, [{"file_name": 12, "text": "a"}])
    assert _only_problem(tmp_path) == "metadata.jsonl:1: file_name is not text: 12"


def test_names_keep_their_own_spaces_and_captions_are_read_composed(tmp_path: Path) -> None:
    import unicodedata

    _image(tmp_path / " lead.jpg")  # a name that begins with a space
    _image(tmp_path / "b.jpg")
    _image(tmp_path / "scan")  # a JPEG without an extension: trains, but a caption run's folder walk skips it
    decomposed = unicodedata.normalize("NFD", "Élève: ½ of 3² is 4.5")
    _jsonl(tmp_path, [
        {"file_name": " lead.jpg", "text": decomposed},
        {"file_name": "b.jpg ", "text": "b"},  # a spreadsheet's stray space after a name that has none
        {"file_name": "scan", "text": "c"},
    ])  # fmt: skip
    report = check_folder(tmp_path)
    assert report.ok and [e.file_name for e in report.examples] == [" lead.jpg", "b.jpg", "scan"]
    # As the training tokenizer writes it (NFC): scored as typed, a perfect caption would lose ~5 BLEU.
    assert report.examples[0].text == unicodedata.normalize("NFC", decomposed) != decomposed
    assert [str(w) for w in report.warnings] == [
        "scan: listed, but `edlight caption` skips it in a folder walk: its name has no image extension the engine "
        "knows (such as .jpg or .png)"
    ]


def test_the_caption_column_cannot_be_the_file_name(folder: Path) -> None:
    with pytest.raises(DataError, match="caption column cannot be 'file_name'"):
        check_folder(folder, caption_column="file_name")


def test_both_formats_in_one_subfolder_is_fatal(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "a.jpg")
    _jsonl(tmp_path / "train", [{"file_name": "a.jpg", "text": "x"}])
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text\na.jpg,x\n")
    with pytest.raises(DataError, match="both metadata.jsonl and metadata.csv"):
        load_split(tmp_path, split="all", skip_bad=True)


def test_csv_problems_have_line_numbers(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.jpg,"one, two",three\nb.jpg,\nc.jpg\n')
    report = check_folder(tmp_path)
    assert [str(p) for p in report.problems] == [
        "metadata.csv:2: expected 2 fields, found 3 (a caption holding ',' must be in double quotes)",
        "metadata.csv:3: empty caption for b.jpg",
        "metadata.csv:4: expected 2 fields, found 1",
    ]
    assert not report.warnings  # a.jpg's row was named above: not "not listed" as well
    (tmp_path / "metadata.csv").write_text("image,text\na.jpg,x\n")
    assert "metadata.csv:1: no 'file_name' column" in _only_problem(tmp_path)


@pytest.mark.parametrize("last_row_too", [False, True])
def test_csv_unclosed_quote_is_malformed_with_its_line(tmp_path: Path, last_row_too: bool) -> None:
    """An unclosed quote must not turn the rows after it into one long caption."""
    for name in "abcd":
        _image(tmp_path / f"{name}.jpg")
    rows = ['a.jpg,"Two rows."', 'b.jpg,"An unclosed quote.', 'c.jpg,"Swallowed."', 'd.jpg,"Swallowed too."']
    if last_row_too:  # the open quote on the last line runs into the end of the file
        rows = ['a.jpg,"Two rows."', 'b.jpg,"Fine."', 'c.jpg,"Fine too."', 'd.jpg,"unterminated']
    (tmp_path / "metadata.csv").write_text("file_name,text\n" + "\n".join(rows) + "\n", encoding="utf-8")
    problem = _only_problem(tmp_path)
    if last_row_too:
        assert problem == "metadata.csv:5: malformed CSV: unexpected end of data; a quote opened in this row is never closed"
    else:
        assert problem.startswith("metadata.csv:3: malformed CSV (found at line 4): ',' expected after '\"'"), problem
    with pytest.raises(DataError, match="malformed CSV"):
        load_split(tmp_path, "all", skip_bad=True)  # the rows after it cannot be trusted: fatal


def test_csv_repeated_column_in_the_header_is_refused(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    (tmp_path / "metadata.csv").write_text('file_name,text,text\na.jpg,"A clock.",other\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_examples(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: 1 problem")
    assert "metadata.csv:1: column 'text' appears more than once in the header" in str(info.value)
    # A repeated column that is not read is harmless.
    (tmp_path / "metadata.csv").write_text('file_name,text,kind,kind\na.jpg,"A clock.",x,y\n', encoding="utf-8")
    assert [e.text for e in read_examples(tmp_path)] == ["A clock."]


def test_an_unknown_caption_column_is_one_problem_naming_the_columns(folder: Path) -> None:
    report = check_folder(folder, caption_column="caption")
    assert [str(p) for p in report.problems] == ["metadata.jsonl: no row has 'caption'; columns seen: extra, file_name, text"]
    with pytest.raises(DataError, match="no row has 'caption'"):
        load_split(folder, "all", caption_column="caption", skip_bad=True)
    # Some rows with it: the others are named one by one.
    with (folder / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "d.jpg", "caption": "x"}) + "\n")
    assert "metadata.jsonl:1: missing caption column 'caption' for a.jpg" in [str(p) for p in check_folder(folder, "caption").problems]


def test_every_problem_is_reported_at_once(folder: Path) -> None:
    (folder / "b.png").unlink()
    (folder / "sub" / "c.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with (folder / "metadata.jsonl").open("a") as f:
        f.write("{broken\n")
        f.write(json.dumps({"file_name": "a.jpg", "text": "dup"}) + "\n")
        f.write(json.dumps({"file_name": "e.jpg", "text": ""}) + "\n")
        f.write(json.dumps({"file_name": "../x.jpg", "text": "out"}) + "\n")
    report = check_folder(folder)
    wheres = sorted(p.where for p in report.problems)
    assert wheres == sorted(
        ["b.png", "sub/c.jpg", "metadata.jsonl:4", "metadata.jsonl:5", "metadata.jsonl:6", "metadata.jsonl:7"]
    )
    assert [e.file_name for e in report.examples] == ["a.jpg"]


# ---------------------------------------------------------------------------------------------------------
# The split.


def test_split_of_is_deterministic_and_roughly_the_ratio() -> None:
    names = [f"img_{i:05d}.jpg" for i in range(10_000)]
    test = [n for n in names if split_of(n) == "test"]
    assert 900 <= len(test) <= 1100
    assert [split_of(n) for n in names[:50]] == [split_of(n) for n in names[:50]]
    assert 2800 <= sum(split_of(n, test_ratio=0.3) == "test" for n in names) <= 3200
    # A larger ratio only moves files into test; another seed reshuffles.
    assert all(split_of(n, test_ratio=0.3) == "test" for n in test)
    assert [split_of(n, seed=1) for n in names[:200]] != [split_of(n) for n in names[:200]]
    assert {split_of(n, test_ratio=0.0) for n in names[:100]} == {"train"}
    assert {split_of(n, test_ratio=1.0) for n in names[:100]} == {"test"}
    with pytest.raises(ValueError):
        split_of("a.jpg", test_ratio=1.5)


def test_adding_images_never_moves_existing_ones(tmp_path: Path) -> None:
    def build(n: int) -> None:
        for i in range(n):
            if not (tmp_path / f"{i:03d}.jpg").exists():
                _image(tmp_path / f"{i:03d}.jpg", (8, 8))
        _jsonl(tmp_path, [{"file_name": f"{i:03d}.jpg", "text": f"image {i}"} for i in range(n)])

    build(60)
    before = {s: {e.file_name for e in load_split(tmp_path, s, test_ratio=0.25)} for s in ("train", "test")}
    assert before["train"] and before["test"] and not before["train"] & before["test"]
    build(150)
    after = {s: {e.file_name for e in load_split(tmp_path, s, test_ratio=0.25)} for s in ("train", "test")}
    assert before["train"] <= after["train"] and before["test"] <= after["test"]
    assert len(after["train"] | after["test"]) == 150
    assert 20 <= len(after["test"]) <= 60
    assert len(load_split(tmp_path, "all")) == 150


def _split_folders(root: Path) -> None:
    """The imagefolder split layout: train/, test/ and validation/ with their own metadata, one loose image."""
    for split, names in (("train", ["t1", "t2", "t3", "t4"]), ("test", ["s1", "s2"]), ("Validation", ["v1"])):
        for name in names:
            _image(root / split / f"{name}.jpg")
        _jsonl(root / split, [{"file_name": f"{n}.jpg", "text": f"caption {n}"} for n in names])
    _image(root / "loose.jpg")
    _jsonl(root, [{"file_name": "loose.jpg", "text": "loose"}])


def test_split_folders_decide_the_split(tmp_path: Path) -> None:
    """Images in the user's test/ folder must never be trained on, whatever their names hash to."""
    _split_folders(tmp_path)
    loose = ["loose.jpg"]  # outside the split folders: split by hash, like any other folder
    by_hash = split_of("loose.jpg")
    assert [e.file_name for e in load_split(tmp_path, "test")] == (
        (loose if by_hash == "test" else []) + ["Validation/v1.jpg", "test/s1.jpg", "test/s2.jpg"]
    )
    assert [e.file_name for e in load_split(tmp_path, "train")] == (
        (loose if by_hash == "train" else []) + ["train/t1.jpg", "train/t2.jpg", "train/t3.jpg", "train/t4.jpg"]
    )
    for ratio in (0.0, 1.0):  # whatever the ratio, the folders decide
        assert {split_of(f"test/{i}.jpg", ratio) for i in range(50)} == {"test"}
        assert {split_of(f"dev/{i}.jpg", ratio) for i in range(50)} == {"test"}
        assert {split_of(f"train/{i}.jpg", ratio) for i in range(50)} == {"train"}
    for name in ("loose.jpg", "test.jpg", "trainee/a.jpg", "sub/test/a.jpg"):  # only a top-level folder's exact name
        assert (split_of(name, 0.0), split_of(name, 1.0)) == ("train", "test")
    summary = check_folder(tmp_path).summary()
    assert "split (from the split folders Validation/ 1 as test, test/ 2, train/ 4; 1 other file by hash, test_ratio 0.1, seed 0)" in summary


def test_load_split_raises_listing_all_bad_files(folder: Path) -> None:
    (folder / "a.jpg").unlink()
    (folder / "b.png").write_bytes(b"nope")
    with pytest.raises(DataError) as info:
        load_split(folder, "all")
    assert "a.jpg: image not found" in str(info.value)
    assert "b.png: unreadable image" in str(info.value)
    assert {p.file_name for p in info.value.problems} == {"a.jpg", "b.png"}


def test_load_split_skip_bad_returns_good_ones_and_records_the_rest(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (folder / "a.jpg").unlink()
    with (folder / "metadata.jsonl").open("a") as f:
        f.write("{broken\n")
    with caplog.at_level(logging.WARNING, logger="train.data"):
        examples = load_split(folder, "all", skip_bad=True)
    assert [e.file_name for e in examples] == ["b.png", "sub/c.jpg"]
    assert [str(p) for p in examples.skipped] == [
        "metadata.jsonl:4: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        "a.jpg: image not found (listed at metadata.jsonl:1)",
    ]
    assert "skipped 2 bad entries" in caplog.text and "a.jpg: image not found" in caplog.text
    assert load_split(folder.parent / folder.name, "all", skip_bad=True).skipped  # still recorded on reload


def test_load_split_without_metadata_raises_even_with_skip_bad(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    with pytest.raises(DataError, match="no metadata.jsonl or metadata.csv"):
        load_split(tmp_path, "all", skip_bad=True)
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(tmp_path, "validation")
    with pytest.raises(DataError, match="not a folder"):
        load_split(tmp_path / "missing")


def test_data_modules_do_not_import_torch() -> None:
    code = (
        "import sys, train, train.data, train.synth, train.data_cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------
# The CLI, through the top-level `edlight` group (lazy loading included).


def test_cli_check_clean_folder_prints_summary(folder: Path) -> None:
    result = CliRunner().invoke(main, ["data", "check", str(folder), "--test-ratio", "0.5"])
    assert result.exit_code == 0, result.output
    assert "examples: 3 usable, 0 problems, 0 warnings" in result.output
    assert "split (test_ratio 0.5, seed 0):" in result.output


def test_cli_check_lists_every_problem_and_exits_1(folder: Path) -> None:
    (folder / "a.jpg").unlink()
    _image(folder / "stray.jpg")
    with (folder / "metadata.jsonl").open("a") as f:
        f.write("nope\n")
    result = CliRunner().invoke(main, ["data", "check", str(folder)])
    assert result.exit_code == 1
    assert "error: a.jpg: image not found" in result.output
    assert "error: metadata.jsonl:4: malformed JSON" in result.output
    assert "warning: stray.jpg: image is not listed in metadata.jsonl" in result.output
    assert "2 problem(s)" in result.output


def test_cli_check_caption_column(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _jsonl(tmp_path, [{"file_name": "a.jpg", "caption": "Four stars."}])
    assert CliRunner().invoke(main, ["data", "check", str(tmp_path)]).exit_code == 1
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path), "--caption-column", "caption"])
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(main, ["data", "check", str(tmp_path), "--caption-column", "file_name"])
    assert refused.exit_code == 2 and "caption column cannot be 'file_name'" in refused.output  # cannot run: 2


def test_cli_check_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_images_too_long_and_thin_for_the_models_positions_are_problems(folder: Path) -> None:
    from engine.preprocess import PatchConfig

    _image(folder / "strip.png", (2000, 10), "PNG")  # a 1 x 40 patch grid at 40 patches
    sideways = Image.new("RGB", (10, 2000), (200, 120, 40))  # stored upright-thin, shown lying down
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(folder / "turned.jpg", exif=exif.tobytes())
    with (folder / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "strip.png", "text": "a number line from 0 to 20."}) + "\n")
        f.write(json.dumps({"file_name": "turned.jpg", "text": "a number line from 0 to 10."}) + "\n")
    positions = (PatchConfig(max_patches=40), 32)  # position tables of 32 rows: grid sides up to 31
    with pytest.raises(DataError) as refused:
        load_split(folder, "all", positions=positions)
    assert [str(p) for p in refused.value.problems] == [
        "strip.png: a 2000x10 image becomes a 1x40 patch grid, beyond this model's 31 row/column positions (aspect ratio too extreme)",
        "turned.jpg: a 2000x10 image becomes a 1x40 patch grid, beyond this model's 31 row/column positions (aspect ratio too extreme)",
    ]
    assert [e.file_name for e in load_split(folder, "all", positions=positions, skip_bad=True)] == ["a.jpg", "b.png", "sub/c.jpg"]
    assert len(load_split(folder, "all", positions=(PatchConfig(max_patches=40), 41))) == 5  # tables that fit


@pytest.mark.parametrize(("name", "text"), [("metadata.jsonl", ""), ("metadata.csv", "file_name,text\n")])
def test_metadata_without_rows_is_named_not_taken_for_an_empty_split(tmp_path: Path, name: str, text: str) -> None:
    # evaluate, parity and export --data said "the test split is empty", as if the split had been unlucky.
    (tmp_path / name).write_text(text)
    for split in ("train", "test"):
        with pytest.raises(DataError, match=rf"1 problem in the data folder:\n  {name}: lists no images"):
            load_split(tmp_path, split=split)


# What spreadsheets and editors really save: read where it is unambiguous, else one problem saying what to do.


@pytest.mark.parametrize(
    "content",
    [
        "file_name;text\na.jpg;Three apples, two pears.\nb.jpg;A number line\n",  # Excel where ',' is the decimal mark
        "file_name\ttext\na.jpg\tThree apples, two pears.\nb.jpg\tA number line\n",  # tab-separated
        "sep=;\nfile_name;text\na.jpg;Three apples, two pears.\nb.jpg;A number line\n",  # Excel's separator line
        "file_name , text\na.jpg,\"Three apples, two pears.\"\nb.jpg,A number line\n",  # spaces around header cells
    ],
)
def test_spreadsheet_csv_variants_are_read_row_by_row(tmp_path: Path, content: str) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    (tmp_path / "metadata.csv").write_text(content, encoding="utf-8")
    examples = read_examples(tmp_path)
    assert [(e.file_name, e.text) for e in examples] == [("a.jpg", "Three apples, two pears."), ("b.jpg", "A number line")]
    first_row = content.splitlines().index(next(line for line in content.splitlines() if line.startswith("a.jpg"))) + 1
    assert examples[0].listed_at == f"metadata.csv:{first_row}"


def test_utf16_with_its_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Excel's "Unicode Text" and Notepad's "Unicode": UTF-16 (here tab-separated), told by its mark."""
    _image(tmp_path / "a.jpg")
    (tmp_path / "metadata.csv").write_text("file_name\ttext\r\na.jpg\tÉlève: 3 × 4\r\n", encoding="utf-16")
    assert [(e.file_name, e.text) for e in read_examples(tmp_path)] == [("a.jpg", "Élève: 3 × 4")]


def test_text_that_is_not_utf8_names_its_line_and_how_to_save_it(tmp_path: Path) -> None:
    _SAVE_AS_UTF8 = 'save it as UTF-8 (in Excel: "CSV UTF-8"; in other editors: encoding UTF-8)'
    """Windows Excel's "CSV (Comma delimited)" is cp1252: the line of the first foreign byte, counted in the
    file (past the first 8 KiB a text reader's own offsets restart), and the save option to use."""
    rows = "".join(f"img{i}.jpg,caption number {i}\n" for i in range(400))
    (tmp_path / "metadata.csv").write_bytes(("file_name,text\n" + rows).encode() + "x.jpg,élève\n".encode("cp1252"))
    message = _only_problem(tmp_path)
    offset = len(("file_name,text\n" + rows).encode()) + len("x.jpg,")
    assert message == f"metadata.csv:402: not UTF-8 text (invalid continuation byte at byte {offset} of the file): {_SAVE_AS_UTF8}"
    # A character cut at the end of a chunk the check reads (1 MiB): the offset still counts from the file's start.
    body = "file_name,text\n" + "a.jpg," + "é" * ((1 << 20) // 2) + "\n"
    cut = body.encode()[: 1 << 20]  # ends with the first byte of an "é"
    assert cut[-1:] == "é".encode()[:1]
    (tmp_path / "metadata.csv").write_bytes(cut + b"x\n")
    assert _only_problem(tmp_path).startswith(f"metadata.csv:2: not UTF-8 text (invalid continuation byte at byte {(1 << 20) - 1} of")
    # Old Mac Excel ("CSV (Macintosh)"): lines end with \r alone, text in Mac Roman.
    (tmp_path / "metadata.csv").write_bytes(b"file_name,text\ra.jpg,x\rb.jpg,\x8el\x8fve\r")
    assert _only_problem(tmp_path).startswith("metadata.csv:3: not UTF-8 text (invalid start byte at byte 29 of")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.jpg,x\n", encoding="utf-32")
    assert _only_problem(tmp_path) == f"metadata.csv: UTF-32 text: {_SAVE_AS_UTF8}"
    (tmp_path / "metadata.csv").unlink()
    line = b'{"file_name": "a.jpg", "text": "\xe9l\xe8ve"}\n'
    (tmp_path / "metadata.jsonl").write_bytes(line)
    at = line.index(b"\xe9")
    assert _only_problem(tmp_path).startswith(f"metadata.jsonl:1: not UTF-8 text (invalid continuation byte at byte {at} of")


def test_a_workbook_saved_as_csv_is_named_as_such(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "metadata.csv", "w") as book:  # an .xlsx is a zip of XML parts
        book.writestr("[Content_Types].xml", "<Types/>")
        book.writestr("xl/workbook.xml", "<workbook/>")  # stored, all ASCII: the file would pass as UTF-8
    assert _only_problem(tmp_path) == (
        'metadata.csv: a zip archive (an Excel .xlsx workbook saved under this name?), not text: save the sheet as CSV ("CSV UTF-8")'
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "metadata.csv:1: the file is empty; it needs a header row naming 'file_name' and 'text'"),
        ("\nfile_name,text\na.jpg,x\n", "metadata.csv:1: no header: line 1 is blank (the header row must come first); "
         "it needs a header row naming 'file_name' and 'text'"),
        ("sep=;\nimage;text\na.jpg;x\n", "metadata.csv:2: no 'file_name' column (header: ['image', 'text'])"),
        ("sep=;\n\nfile_name;text\n", "metadata.csv:2: no header: line 2 is blank (the header row must come first); "
         "it needs a header row naming 'file_name' and 'text'"),
        ("file_name;caption\na.jpg;x\n", "metadata.csv:1: no 'text' column (header: ['file_name', 'caption'])"),
        ('sep="\nfile_name,text\na.jpg,x\n', "metadata.csv:1: no 'file_name' or 'text' column (header: ['sep=\"'])"),
        ("file_name,text,text \na.jpg,x,y\n", None),
    ],
)  # fmt: skip
def test_a_csv_without_a_header_says_what_is_wrong(tmp_path: Path, content: str, expected: str | None) -> None:
    _image(tmp_path / "a.jpg")
    (tmp_path / "metadata.csv").write_text(content, encoding="utf-8")
    if expected is None:  # "text" and "text " side by side: the exact name is the caption column, as it always was
        assert [(e.file_name, e.text) for e in read_examples(tmp_path)] == [("a.jpg", "x")]
    else:
        assert _only_problem(tmp_path) == expected


def test_a_comma_csv_keeps_semicolons_and_tabs_in_its_captions(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.jpg,3; 4; 5\nb.jpg,"tab\there; and, there"\n', encoding="utf-8")
    assert [e.text for e in read_examples(tmp_path)] == ["3; 4; 5", "tab\there; and, there"]


@pytest.mark.parametrize(
    ("caption", "problem"),
    [
        ("\u200b", "empty caption for a.jpg (only invisible characters: U+200B)"),
        ("\ufeff \u2060", "empty caption for a.jpg (only invisible characters: U+FEFF, U+2060)"),
        ("3 apples\x00", "caption of a.jpg contains a control character (U+0000) at character 9: a damaged or mis-decoded file?"),
        ("\x1b[31mred", "caption of a.jpg contains a control character (U+001B) at character 1: a damaged or mis-decoded file?"),
        ("it\u00e2\u0080\u0099s", "caption of a.jpg contains a control character (U+0080) at character 4: a damaged or mis-decoded file?"),
        ("twenty\x1eone", "caption of a.jpg contains a control character (U+001E) at character 7: Word's non-breaking hyphen (write '-' or U+2011)"),
    ],
)  # fmt: skip
def test_captions_that_show_nothing_or_hold_control_characters_are_refused(tmp_path: Path, caption: str, problem: str) -> None:
    _image(tmp_path / "a.jpg")
    _jsonl(tmp_path, [{"file_name": "a.jpg", "text": caption}])
    assert _only_problem(tmp_path) == f"metadata.jsonl:1: {problem}"


def test_line_breaks_tabs_and_joiners_stay_in_a_caption(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    caption = "Line one\r\nline\ttwo\u2028three \u0085four\vfive 👩\u200d🏫"
    _jsonl(tmp_path, [{"file_name": "a.jpg", "text": caption}])
    assert [e.text for e in read_examples(tmp_path)] == [caption]


def test_a_key_given_twice_in_a_json_line_is_a_problem_not_the_last_one_silently(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    _jsonl(tmp_path, ['{"file_name": "a.jpg", "text": "first", "text": "second"}', {"file_name": "b.jpg", "text": "b"}])
    report = check_folder(tmp_path)
    assert [str(p) for p in report.problems] == ["metadata.jsonl:1: key 'text' appears twice in this object; keep one"]


def test_a_json_array_is_one_problem_not_one_per_line(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    rows = [{"file_name": "a.jpg", "text": "a"}, {"file_name": "b.jpg", "text": "b"}]
    (tmp_path / "metadata.jsonl").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    assert _only_problem(tmp_path).startswith("metadata.jsonl: holds one JSON array, not JSON Lines: write one object per line")
    # Pretty-printed objects one after another (jq without -c): 4 errors per row, and every image "not listed".
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row, indent=2) for row in rows) + "\n", encoding="utf-8")
    assert _only_problem(tmp_path).startswith("metadata.jsonl: holds JSON objects spread over several lines (pretty-printed)")
    assert not check_folder(tmp_path).warnings
    (tmp_path / "metadata.jsonl").write_text('{\n"file_name": "a.jpg",\n"text": "a"\n', encoding="utf-8")  # cut short
    assert "malformed JSON" in str(check_folder(tmp_path).problems[0])


@pytest.mark.parametrize(("listed", "on_disk"), [("IMG_0001.jpg", "IMG_0001.JPG"), ("a.jpg", "A.jpg"), ("straße.jpg", "STRASSE.jpg")])
def test_a_name_differing_only_in_letter_case_gets_a_hint(tmp_path: Path, listed: str, on_disk: str) -> None:
    if (tmp_path / "probe").touch() or (tmp_path / "PROBE").exists():
        pytest.skip("a case-insensitive file system finds the file anyway")
    _image(tmp_path / on_disk)
    _jsonl(tmp_path, [{"file_name": listed, "text": "x"}])
    assert check_folder(tmp_path).problems[0].message == (
        f"image not found (the folder has {on_disk!r}, which differs only in letter case (names are case-sensitive "
        "here); rename one to match) (listed at metadata.jsonl:1)"
    )


def test_a_subfolders_name_written_from_the_data_folder_gets_a_hint(tmp_path: Path) -> None:
    """train/metadata.jsonl listing "train/a.jpg" (a script that walked the whole folder wrote it) was only
    "train/train/a.jpg: image not found", beside a.jpg said to be unlisted."""
    _image(tmp_path / "train" / "a.jpg")
    _jsonl(tmp_path / "train", [{"file_name": "train/a.jpg", "text": "x"}])
    assert check_folder(tmp_path).problems[0].message == (
        "image not found (the names in train/metadata.jsonl are relative to train/; 'train/a.jpg' is a path from "
        "the data folder: write 'a.jpg') (listed at train/metadata.jsonl:1)"
    )
    _jsonl(tmp_path / "train", [{"file_name": "b.jpg", "text": "x"}])  # missing for another reason: no hint
    assert check_folder(tmp_path).problems[0].message == "image not found (listed at train/metadata.jsonl:1)"
    _image(tmp_path / "b.jpg")  # a b.jpg above: "b.jpg" in train/ was still written as it should be
    assert check_folder(tmp_path).problems[0].message == "image not found (listed at train/metadata.jsonl:1)"


def test_an_icon_listed_as_an_image_is_named_as_one(tmp_path: Path) -> None:
    """Icons are not read (Pillow decodes an ICO's pixels before its size can be checked): data check says so,
    as the engine does, rather than calling it a format Pillow cannot read."""
    import io
    import struct

    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 120, 40)).save(png, format="PNG")
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png.getvalue()), 22)
    (tmp_path / "a.png").write_bytes(struct.pack("<HHH", 0, 1, 1) + entry + png.getvalue())
    _jsonl(tmp_path, [{"file_name": "a.png", "text": "x"}])
    assert _only_problem(tmp_path).startswith("a.png: an icon file (ICO/ICNS), which is not read")


def test_an_image_listed_under_two_names_is_warned_about(tmp_path: Path) -> None:
    """A link to a listed image, or a hard link, passed as another image: the split hashes names, so one name
    could train and the other test (seen: p0.jpg in train, its link dup.jpg in test). Below one top-level split
    folder both names are in the same split (several captions of one image): nothing to say."""
    import os

    _image(tmp_path / "img" / "p0.jpg")
    _image(tmp_path / "img" / "p1.jpg", (30, 30))
    (tmp_path / "img" / "dup.jpg").symlink_to("p0.jpg")
    os.link(tmp_path / "img" / "p1.jpg", tmp_path / "img" / "again.jpg")
    _image(tmp_path / "train" / "t.jpg")
    (tmp_path / "train" / "t2.jpg").symlink_to("t.jpg")
    names = [f"img/{n}.jpg" for n in ("p0", "p1", "dup", "again")] + ["train/t.jpg", "train/t2.jpg"]
    _jsonl(tmp_path, [{"file_name": n, "text": f"picture {i}"} for i, n in enumerate(names)])
    report = check_folder(tmp_path)
    assert report.ok and [str(w) for w in report.warnings] == [
        "metadata.jsonl:3: img/dup.jpg is the image file img/p0.jpg (listed at metadata.jsonl:1) through a link: the "
        "two names may split apart, and the image be both trained and tested on",
        "metadata.jsonl:4: img/again.jpg is the image file img/p1.jpg (listed at metadata.jsonl:2) under another "
        "name: the two names may split apart, and the image be both trained and tested on",
    ]
    assert [e.file_name for e in load_split(tmp_path, "all")] == names  # a warning: training goes on with them


def test_split_folders_below_the_top_are_warned_about(tmp_path: Path) -> None:
    """data/train/ and data/test/ under one top-level metadata: their images were split by hash, held-out ones
    into training, without a word."""
    rows = []
    for split in ("train", "test"):
        for i in range(3):
            _image(tmp_path / "data" / split / f"{split}{i}.jpg")
            rows.append({"file_name": f"data/{split}/{split}{i}.jpg", "text": f"{split} picture {i}"})
    _jsonl(tmp_path, rows)
    report = check_folder(tmp_path)
    assert report.ok
    assert [str(w) for w in report.warnings] == [
        f"data/{split}/: named like a split folder but below the top, so its 3 image(s) are split by hash with the "
        "rest (test images may be trained on); only top-level train/, test/ and validation/ decide a split: move "
        "them up" for split in ("test", "train")
    ]


def test_thousands_of_problems_are_counted_not_all_spelled_out(tmp_path: Path) -> None:
    """45,000 "image not found" lines scrolled the count, said only on the first line, out of sight."""
    _jsonl(tmp_path, [{"file_name": f"gone{i}.jpg", "text": "a picture"} for i in range(75)])
    with pytest.raises(DataError) as info:
        load_split(tmp_path, "all")
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + 50 + 1 and len(info.value.problems) == 75
    assert lines[-1] == f"  ... and 25 more: 75 problems in all (`edlight data check {tmp_path}` lists every one)"


def test_data_check_output_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """`data check` printed with click.echo: a full disk gave a traceback (and `| head` made a clean folder's
    check exit 1, "problems found"; now 141, as print_result ends any command's output)."""
    _image(tmp_path / "a.jpg")
    _jsonl(tmp_path, [{"file_name": "a.jpg", "text": "a picture"}])
    command = [sys.executable, "-m", "engine.cli", "data", "check", str(tmp_path)]
    with open("/dev/full", "w") as full:
        result = subprocess.run(command, cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_folder_name_differing_in_case_or_normalisation_is_hinted_at(tmp_path: Path) -> None:
    """The hint named only a file's own name: `sub/b.jpg` listed with `Sub/b.jpg` on disk, or a folder written
    decomposed (NFD) by a Mac, was a bare "image not found"."""
    import unicodedata

    _image(tmp_path / "Sub" / "b.jpg")
    _image(tmp_path / unicodedata.normalize("NFD", "café") / "c.jpg")
    _jsonl(tmp_path, [{"file_name": "sub/b.jpg", "text": "a picture"},
                      {"file_name": unicodedata.normalize("NFC", "café") + "/c.jpg", "text": "a picture"}])
    messages = [p.message for p in check_folder(tmp_path).problems]
    assert "(the folder has 'Sub', which differs only in letter case" in messages[0]
    assert "which differs only in Unicode normalisation: NFC vs NFD" in messages[1]


def test_listed_copies_of_one_image_are_warned_about(tmp_path: Path) -> None:
    """IMG_1.jpg and `IMG_1 (1).jpg` (a download made twice) are split by name each: one could train, one test.
    Copies below one top-level split folder stay in one split; files of one size are read to tell."""
    import shutil

    _image(tmp_path / "IMG_1.jpg")
    shutil.copy(tmp_path / "IMG_1.jpg", tmp_path / "IMG_1 (1).jpg")
    _image(tmp_path / "IMG_2.jpg")
    _image(tmp_path / "train" / "t.jpg")
    shutil.copy(tmp_path / "train" / "t.jpg", tmp_path / "train" / "t (1).jpg")
    names = ("IMG_1.jpg", "IMG_2.jpg", "IMG_1 (1).jpg", "train/t.jpg", "train/t (1).jpg")
    _jsonl(tmp_path, [{"file_name": n, "text": "a picture"} for n in names])
    report = check_folder(tmp_path)
    assert report.ok and [str(w) for w in report.warnings] == [
        "metadata.jsonl:3: IMG_1 (1).jpg has the same bytes as IMG_1.jpg (listed at metadata.jsonl:1): a copy may "
        "land in the other split, and be both trained and tested on"
    ]


def test_many_nested_split_folders_are_one_warning(tmp_path: Path) -> None:
    """A class per folder with a val/ in each (1000 classes: 1000 lines at every load) is counted in one line."""
    rows = []
    for kind in range(7):
        _image(tmp_path / f"kind{kind}" / "val" / f"k{kind}.jpg")
        rows.append({"file_name": f"kind{kind}/val/k{kind}.jpg", "text": f"kind {kind}"})
    _jsonl(tmp_path, rows)
    assert [str(w) for w in check_folder(tmp_path).warnings] == [
        "7 folders: named like split folders but below the top (kind0/val/, kind1/val/, kind2/val/, ...), so their 7 "
        "image(s) are split by hash with the rest (test images may be trained on); only top-level train/, test/ and "
        "validation/ decide a split: move them up"
    ]
