"""Label derivation from folders and both CSV kinds, split ratios and the group-hash split."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from semspai.store.sources import (
    SourceError,
    hash_split,
    label_from_parts,
    parse_split_ratios,
    read_manifest_csv,
    sample_key,
    scan_folder,
)


@pytest.mark.parametrize(
    "parts,expected",
    [
        (("real", "camera", "a.jpg"), (0, "camera")),
        (("fake", "gan_a", "a.png"), (1, "gan_a")),
        (("data", "fake", "sd3", "sub", "a.png"), (1, "sd3")),  # the folder right under the label
        (("progan", "0_real", "a.png"), (0, "progan")),  # ForenSynths: the generator is above the label
        (("progan", "1_fake", "a.png"), (1, "progan")),
        (("test", "stylegan", "1_FAKE", "a.png"), (1, "stylegan")),  # case-insensitive
        (("Real", "cam", "a.png"), (0, "cam")),
        (("fake", "a.png"), (1, "unknown")),
        (("images", "cats", "a.png"), (None, "cats")),
        (("a.png",), (None, "unknown")),
        (("unreal", "fakes", "a.png"), (None, "fakes")),  # only whole folder names count
        (("real", "fake.png"), (0, "unknown")),  # the file name is never a label
    ],
)
def test_label_from_parts(parts, expected):
    assert label_from_parts(parts) == expected


def touch(root: Path, rel: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_scan_folder_our_layout_and_forensynths(tmp_path):
    root = tmp_path / "set"
    for rel in (
        "real/camera/b.JPG",
        "fake/gan/a.png",
        "progan/0_real/r.png",
        "progan/1_fake/f.webp",
        "misc/x.tif",
        "fake/gan/notes.txt",
        "fake/gan/y.bmp",
        "fake/gan/z.jpeg",
        "real/camera/w.tiff",
    ):
        touch(root, rel)
    records = scan_folder(root)
    got = {r.origin: (r.label, r.generator) for r in records}
    assert got == {
        "set/real/camera/b.JPG": (0, "camera"),
        "set/real/camera/w.tiff": (0, "camera"),
        "set/fake/gan/a.png": (1, "gan"),
        "set/fake/gan/y.bmp": (1, "gan"),
        "set/fake/gan/z.jpeg": (1, "gan"),
        "set/progan/0_real/r.png": (0, "progan"),
        "set/progan/1_fake/f.webp": (1, "progan"),
        "set/misc/x.tif": (None, "misc"),
    }
    assert all(r.path.is_absolute() or r.path.exists() for r in records)
    assert all(r.split == "" and r.group == "" and r.caption == "" for r in records)


def test_scan_folder_rooted_at_a_label_folder(tmp_path):
    touch(tmp_path / "fake", "gan/a.png")
    (rec,) = scan_folder(tmp_path / "fake")
    assert (rec.label, rec.generator, rec.origin) == (1, "gan", "fake/gan/a.png")


def test_scan_folder_follows_linked_folders_once_and_skips_hidden_and_broken(tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    touch(elsewhere, "g2/b.png")
    root = tmp_path / "set"
    touch(root, "fake/g1/a.png")
    touch(root, "fake/g1/._a.png")  # a macOS resource fork
    touch(root, ".cache/fake/g1/c.png")
    (root / "fake" / "g2").symlink_to(elsewhere / "g2")  # a generator's images linked in from another disk
    (root / "fake" / "loop").symlink_to(root / "fake")  # a link back up: the walk still ends
    (root / "fake" / "g1" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with caplog.at_level(logging.WARNING, logger="semspai.store.sources"):
        got = [(r.origin, r.label, r.generator) for r in scan_folder(root)]
    assert got == [("set/fake/g1/a.png", 1, "g1"), ("set/fake/g2/b.png", 1, "g2")]
    assert any("gone.png: a broken symlink" in r.getMessage() for r in caplog.records)


def test_a_folder_reached_by_a_link_and_by_its_own_path_is_taken_by_its_own(tmp_path, caplog):
    root = tmp_path / "set"
    touch(root, "real/coco/a.png")
    touch(root, "fake/sdxl/b.png")
    (root / "fake" / "sdxl" / "reference").symlink_to(root / "real" / "coco")  # walked first in name order
    touch(root, "biggan/0_real/c.png")
    (root / "all_reals").symlink_to(root / "biggan" / "0_real")  # sorts first; names no label
    with caplog.at_level(logging.WARNING, logger="semspai.store.sources"):
        got = [(r.origin, r.label, r.generator) for r in scan_folder(root)]
    assert got == [("set/biggan/0_real/c.png", 0, "biggan"), ("set/fake/sdxl/b.png", 1, "sdxl"),
                   ("set/real/coco/a.png", 0, "coco")]  # fmt: skip
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"{root / 'fake' / 'sdxl' / 'reference'}: a link to {root / 'real' / 'coco'}, walked as " in said
    assert f"{root / 'all_reals'}: a link to" in said


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_our_manifest_all_columns(tmp_path):
    csv = write_csv(
        tmp_path / "lists" / "m.csv",
        "path,label,generator,caption,split,group\n"
        "img/a.png,real,cam,a dog,train,g1\n"
        'img/b.png,FAKE,sd3,"a cat, sitting",valid,g1\n'
        "img/c.png,0,,,,\n"
        "/abs/d.png,1,gan,,TEST,\n",
    )
    a, b, c, d = read_manifest_csv(csv)
    base = tmp_path / "lists"
    assert (a.path, a.label, a.generator, a.caption, a.split, a.group) == (
        base / "img/a.png",
        0,
        "cam",
        "a dog",
        "train",
        "g1",
    )
    assert (b.path, b.label, b.generator, b.caption, b.split, b.group) == (
        base / "img/b.png",
        1,
        "sd3",
        "a cat, sitting",
        "val",
        "g1",
    )
    assert (c.label, c.generator, c.split, c.group) == (0, "img", "", "")  # generator falls back to the folder
    assert (d.path, d.label, d.split) == (Path("/abs/d.png"), 1, "test")
    assert a.origin == "m/img/a.png"


def test_manifest_generator_from_path_layout(tmp_path):
    csv = write_csv(tmp_path / "m.csv", "path,label\nfake/sdxl/a.png,fake\nx/0_real/b.png,real\n")
    assert [(r.label, r.generator) for r in read_manifest_csv(csv)] == [(1, "sdxl"), (0, "x")]


def test_manifest_minimal_columns_header_case_and_bom(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_bytes("\ufeffPath,Label\na.png,real\n".encode())
    (r,) = read_manifest_csv(csv)
    assert (r.path, r.label, r.split, r.caption) == (tmp_path / "a.png", 0, "", "")


def test_manifest_empty_label_is_unlabeled(tmp_path):
    (r,) = read_manifest_csv(write_csv(tmp_path / "m.csv", "path,label\na.png,\n"))
    assert r.label is None


def test_spai_csv(tmp_path):
    csv = write_csv(
        tmp_path / "spai" / "data.csv", "image,class,split\nreal/a.png,0,train\nfake/midj/b.png,1,val\nc.png,1,test\n"
    )
    a, b, c = read_manifest_csv(csv)
    base = tmp_path / "spai"
    assert (a.path, a.label, a.split) == (base / "real/a.png", 0, "train")
    assert (b.path, b.label, b.generator, b.split) == (base / "fake/midj/b.png", 1, "midj", "val")
    assert (c.label, c.generator, c.split) == (1, "unknown", "test")


@pytest.mark.parametrize(
    "body,line,what",
    [
        ("a.png,real,train\nb.png,maybe,train\n", 3, "label 'maybe'"),
        ("a.png,2,train\n", 2, "label '2'"),
        ("a.png,real,training\n", 2, "split 'training'"),
        ("a.png,real,train\n\nb.png,real,dev\n", 4, "split 'dev'"),  # a blank line still counts as a line
        (",real,train\n", 2, "empty path"),
    ],
)
def test_bad_values_name_file_and_line(tmp_path, body, line, what):
    csv = write_csv(tmp_path / "m.csv", "path,label,split\n" + body)
    with pytest.raises(SourceError) as info:
        read_manifest_csv(csv)
    assert f"{csv}:{line}" in str(info.value)
    assert what in str(info.value)


def test_bad_values_in_spai_csv(tmp_path):
    csv = write_csv(tmp_path / "s.csv", "image,class,split\na.png,fake,train\nb.png,x,train\n")
    with pytest.raises(SourceError, match=rf"{csv}:3: label 'x'"):
        read_manifest_csv(csv)


def test_multiline_caption_keeps_line_numbers_right(tmp_path):
    csv = write_csv(tmp_path / "m.csv", 'path,label,caption\na.png,real,"two\nlines"\nb.png,bad,\n')
    with pytest.raises(SourceError, match=rf"{csv}:4: label 'bad'"):
        read_manifest_csv(csv)


def test_unknown_columns_are_named(tmp_path):
    csv = write_csv(tmp_path / "m.csv", "file,target\na.png,1\n")
    with pytest.raises(SourceError, match="found file,target") as info:
        read_manifest_csv(csv)
    assert "path,label" in str(info.value) and "image,class,split" in str(info.value)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("0.8,0.1,0.1", (0.8, 0.1, 0.1)),
        ("8,1,1", (0.8, 0.1, 0.1)),
        ("1,0,0", (1.0, 0.0, 0.0)),
    ],
)
def test_parse_split_ratios(text, expected):
    assert parse_split_ratios(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["0.8,0.2", "a,b,c", "1,-1,1", "0,0,0", "", "nan,1,1", "inf,1,1"])
def test_bad_split_ratios_name_the_option(text):
    with pytest.raises(SourceError, match="--split"):
        parse_split_ratios(text)


def test_hash_split_is_stable_proportional_and_extreme_ratios():
    ratios = (0.8, 0.1, 0.1)
    groups = [f"src/{i}.png" for i in range(4000)]
    splits = [hash_split(g, ratios) for g in groups]
    assert splits == [hash_split(g, ratios) for g in groups]  # a pure function of the group
    counts = Counter(splits)
    assert set(counts) == {"train", "val", "test"}
    assert abs(counts["train"] / 4000 - 0.8) < 0.03 and abs(counts["val"] / 4000 - 0.1) < 0.02
    assert {hash_split(g, (1.0, 0.0, 0.0)) for g in groups[:200]} == {"train"}
    assert {hash_split(g, (0.0, 0.0, 1.0)) for g in groups[:200]} == {"test"}


def test_sample_key_is_dot_free_stable_and_distinct():
    keys = {sample_key(f"set/real/cam/{i}.v2.png") for i in range(1000)}
    assert len(keys) == 1000
    assert all("." not in k and "/" not in k for k in keys)
    assert sample_key("a/b.png") == sample_key("a/b.png") != sample_key("a/b.jpg")
