"""`semspai predict` and the Python API: formats and modes, bad files, chunking, run dirs, CLI = API."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import semspai
from semspai.pipeline import inference
from semspai.pipeline.clip import ClipLoadError
from semspai.pipeline.config import ConfigError
from semspai.pipeline.detector import pack_images
from semspai.pipeline.inference import (
    DECODE_AHEAD,
    PADDING_WARNINGS,
    Detector,
    find_images,
    load_detector,
    patch_batches,
)
from semspai.stages import report
from semspai.stages.cli import cli
from semspai.stages.predict import CSV_HEADER, PredictConfig, PredictResult, progress_path, run
from semspai.store.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from semspai.store.locks import lock_beside, run_lock
from semspai.store.manifest import StaleOutputError
from tests.conftest import random_photo
from tests.detector_fixtures import make_checkpoint

W, H = 300, 240  # under the 4-patch grid: the five-crop rule, so each image is 5 patches


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "gate.pt", mode="global_local", fusion="gate")


@pytest.fixture(scope="module")
def detector(checkpoint: Path):
    return load_detector(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return random_photo(W, H, seed=3)


def save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def test_load_detector_is_exported_lazily(checkpoint):
    det = semspai.load_detector(checkpoint)
    assert det.semantic_mode == "global_local" and det.threshold == 0.5 and det.clip_spec.model == "tiny-random"


@pytest.mark.parametrize(
    "name,fmt,make",
    [
        ("rgb.png", "PNG", lambda a: Image.fromarray(a)),
        ("rgb.jpg", "JPEG", lambda a: Image.fromarray(a)),
        ("rgb.webp", "WEBP", lambda a: Image.fromarray(a)),
        ("rgb.tif", "TIFF", lambda a: Image.fromarray(a)),
        ("grey.png", "PNG", lambda a: Image.fromarray(a).convert("L")),
        ("palette.png", "PNG", lambda a: Image.fromarray(a).convert("P")),
        ("rgba.png", "PNG", lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)]))),
        ("cmyk.jpg", "JPEG", lambda a: Image.fromarray(a).convert("CMYK")),
        ("cmyk.tif", "TIFF", lambda a: Image.fromarray(a).convert("CMYK")),
        ("grey16.png", "PNG", lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257)),
    ],
)
def test_every_format_and_mode_is_scored(detector, rgb, tmp_path, name, fmt, make):
    img = make(rgb)
    path = save(img, tmp_path / name, fmt)
    (pred,) = detector.predict(path)
    assert pred.error == "" and pred.path == str(path)
    assert 0.0 < pred.score < 1.0 and pred.label in ("fake", "real") and pred.n_patches == 5
    # the same pixels given as a PIL image score the same (one decode path for files and objects)
    (from_pil,) = detector.predict(Image.open(path))
    assert from_pil.score == pytest.approx(pred.score, abs=1e-6)


def test_file_array_and_pil_give_the_same_score(detector, rgb, tmp_path):
    path = save(Image.fromarray(rgb), tmp_path / "a.png", "PNG")
    a, b, c = detector.predict([path, rgb, Image.fromarray(rgb)])
    assert a.score == b.score == c.score
    assert (b.path, c.path) == ("<array 1>", "<image 2>")


def test_16_bit_and_float_grey_arrays_take_the_files_grey_path(detector, tmp_path):
    grey16 = (random_photo(120, 90, seed=3)[:, :, 0].astype(np.uint16) * 257 + 3).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(grey16).save(path)  # mode I;16
    floats = grey16.astype(np.float64) / 65535.0
    preds = detector.predict([path, grey16, grey16[:, :, None], floats])
    assert not any(p.error for p in preds) and len({p.score for p in preds[:3]}) == 1
    assert preds[3].score == pytest.approx(preds[0].score, abs=0.02)  # 0..1 floats: x255, rounded (not the top byte)
    (bad,) = detector.predict(np.zeros((8, 8, 3), np.uint16))
    assert "expected (H, W[, 3|4]) uint8, or (H, W[, 1]) uint16 or float" in bad.error
    (odd,) = detector.predict([42])
    assert odd.path == "<input 0>" and "cannot score a int" in odd.error


def test_exif_rotation_is_applied(detector, rgb, tmp_path):
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    path = save(img, tmp_path / "rotated.jpg", "JPEG", exif=exif, quality=95)
    upright = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))  # what a viewer shows
    (from_file,), (from_array,) = detector.predict(path), detector.predict(upright)
    assert from_file.score == pytest.approx(from_array.score, abs=1e-6)


def test_bad_files_get_error_rows_and_the_rest_continue(detector, rgb, tmp_path):
    good = save(Image.fromarray(rgb), tmp_path / "good.png", "PNG")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[:400])
    preds = detector.predict([empty, good, text, truncated, tmp_path / "missing.png"])
    assert [bool(p.error) for p in preds] == [True, False, True, True, True]
    assert "empty" in preds[0].error and "unreadable file" in preds[4].error
    assert all(p.score is None and p.label == "" and p.n_patches == 0 for p in preds if p.error)
    assert preds[1].score == detector.predict(good)[0].score  # an error in its batch changes nothing


def test_chunked_equals_unchunked(detector):
    img = random_photo(1000, 700, seed=5)  # 4 x 3 = 12 patches
    scores = {}
    for chunk in (1, 5, 64):
        detector.chunk_size = chunk
        (pred,) = detector.predict(img)
        scores[chunk] = pred.score
    detector.chunk_size = 4
    assert pred.n_patches == 12
    assert max(scores.values()) - min(scores.values()) <= 1e-5


def test_repeated_patches_are_embedded_and_encoded_once_with_the_same_result(detector, monkeypatch, request):
    from semspai.pipeline import detector as detector_module

    images = [random_photo(w, h, seed=s) for s, (w, h) in enumerate(((224, 224), (300, 224), (150, 90), (480, 460)))]
    emb, model = detector.embedder, detector.model
    crops: list[int] = []
    patches: list[int] = []
    real_embed = emb.get_image_embedding
    monkeypatch.setattr(emb, "get_image_embedding", lambda x: crops.append(len(x)) or real_embed(x))
    hook = model.spectral.encoder.register_forward_hook(lambda mod, args, out: patches.append(args[0].shape[0]))
    request.addfinalizer(hook.remove)  # the detector is the module's
    once = detector.score(images, return_maps=True)
    # globals 4; local crops: one of 224 x 224's five, three of 300 x 224's, one of the padded 150 x 90's, four
    assert sum(crops) == 4 + 1 + 3 + 1 + 4 and sum(patches) == 3 * (1 + 3 + 1 + 4)
    packed, _, _ = pack_images(images)
    glob, local = detector.clip_vectors(images, packed)
    for module in (inference, detector_module):
        monkeypatch.setattr(module, "distinct_rows", lambda x: None)
    crops.clear()
    patches.clear()
    every = detector.score(images, return_maps=True)
    assert sum(crops) == 4 + 5 + 5 + 5 + 4 and sum(patches) == 3 * 19
    glob_all, local_all = detector.clip_vectors(images, packed)
    assert torch.equal(glob, glob_all) and torch.allclose(local, local_all, rtol=0, atol=1e-3)  # float16 rounding
    for a, b in zip(once, every, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        np.testing.assert_allclose(a.maps.attention, b.maps.attention, rtol=0, atol=1e-5)


def test_batches_are_bounded_by_images_and_patches_and_a_ramp_starts_at_one_image():
    small, large = np.zeros((100, 100, 3), np.uint8), np.zeros((1000, 1000, 3), np.uint8)  # 5 and 16 patches
    items = [(i, small if i % 7 else None) for i in range(40)]  # an unreadable image is a row of the batch too
    batches = list(patch_batches(items, max_images=8, max_patches=1000, ramp=True))
    assert [len(b) for b in batches] == [1, 2, 4, 8, 8, 8, 8, 1] and [i for b in batches for i, _ in b] == list(
        range(40)
    )
    assert [len(b) for b in patch_batches(items, max_images=8, max_patches=1000)] == [8] * 5  # no ramp
    smalls, larges = [(i, small) for i in range(40)], [(i, large) for i in range(6)]
    assert [len(b) for b in patch_batches(smalls, max_patches=48, ramp=True)] == [1, 2, 4, 8, 10, 10, 5]
    assert [len(b) for b in patch_batches(larges, max_patches=48, ramp=True)] == [1, 2, 3]
    assert [len(b) for b in patch_batches(larges, max_patches=48)] == [3, 3]


@pytest.mark.parametrize("ramp", [True, False])
def test_iter_predict_yields_its_first_result_after_one_image(detector, rgb, ramp):
    pulled: list[int] = []

    def images():
        for i in range(40):
            pulled.append(i)
            yield np.roll(rgb, i, axis=0)

    first = next(detector.iter_predict(images(), ramp=ramp))
    assert first[0].path == "<array 0>"
    assert len(pulled) <= 1 + DECODE_AHEAD if ramp else len(pulled) >= 32


@pytest.mark.slow
def test_4k_image_chunked_equals_unchunked(detector):
    img = random_photo(3840, 2160, seed=9)
    detector.chunk_size = 8
    (chunked,) = detector.predict(img)
    detector.chunk_size = 10_000
    (whole,) = detector.predict(img)
    detector.chunk_size = 4
    assert chunked.n_patches == 17 * 9
    assert abs(chunked.score - whole.score) <= 1e-5


def test_run_dir_resolves_to_best(checkpoint, tmp_path, rgb):
    ckdir = tmp_path / "run" / "checkpoints"
    save_checkpoint(ckdir / "best.pt", load_checkpoint(checkpoint))
    other = make_checkpoint(tmp_path / "other.pt", seed=7)
    save_checkpoint(ckdir / "last.pt", load_checkpoint(other))
    by_run = load_detector(tmp_path / "run").predict(rgb)[0].score
    assert by_run == load_detector(checkpoint).predict(rgb)[0].score
    assert by_run != load_detector(other).predict(rgb)[0].score
    with pytest.raises(CheckpointError, match="no checkpoints/best.pt"):
        load_detector(tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "semspai-stage.json").write_text('{"stage": "shard"}')
    with pytest.raises(CheckpointError, match=r"shards is the output of `semspai shard`, not a training run"):
        load_detector(tmp_path / "shards")
    (tmp_path / "f.zarr").mkdir()
    (tmp_path / "f.zarr" / "zarr.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"f.zarr is a Zarr store \(a feature store\?\), not a training run"):
        load_detector(tmp_path / "f.zarr")


def test_missing_clip_weights_name_the_fix_and_clip_overrides(checkpoint, tmp_path, rgb):
    state = load_checkpoint(checkpoint)
    state["clip_spec"] = state["clip_spec"] | {"arg": "tiny-random:/gone/tiny.safetensors"}
    moved = tmp_path / "moved.pt"
    save_checkpoint(moved, state)
    with pytest.raises(ClipLoadError, match=r"\. Pass --clip tiny-random$"):  # seeded weights: no file to name
        load_detector(moved)
    file_spec = state["clip_spec"] | {"meaningless": False, "weights_id": "tiny.safetensors"}
    save_checkpoint(tmp_path / "file.pt", state | {"clip_spec": file_spec})
    with pytest.raises(ClipLoadError, match=r"Pass --clip tiny-random:/path/to/tiny.safetensors \(the same weights"):
        load_detector(tmp_path / "file.pt")
    timm_spec = file_spec | {"arg": "timm/efficientnet_lite0:/gone/w.safetensors", "model": "efficientnet_lite0",
                             "kind": "timm", "weights_id": "w.safetensors"}  # fmt: skip
    save_checkpoint(tmp_path / "timm.pt", state | {"clip_spec": timm_spec})
    with pytest.raises(ClipLoadError, match=r"Pass --clip timm/efficientnet_lite0:/path/to/w.safetensors \(the same"):
        load_detector(tmp_path / "timm.pt")
    det = load_detector(moved, clip="tiny-random")  # same weights found elsewhere: accepted
    assert det.predict(rgb)[0].score == load_detector(checkpoint).predict(rgb)[0].score
    state["clip_spec"] = state["clip_spec"] | {"arg": "tiny-random", "sha256": "0" * 64}
    save_checkpoint(moved, state)
    with pytest.raises(ClipLoadError, match="not the CLIP encoder"):
        load_detector(moved)


def test_directories_are_walked_recursively(tmp_path, rgb, caplog):
    save(Image.fromarray(rgb), tmp_path / "a" / "b" / "deep.webp", "WEBP")
    save(Image.fromarray(rgb), tmp_path / "a" / "top.JPG", "JPEG")
    (tmp_path / "a" / "notes.txt").write_text("skip me")
    save(Image.fromarray(rgb), tmp_path / "a" / "b" / "anim.gif", "GIF")  # not an image extension of ours
    save(Image.fromarray(rgb), tmp_path / "a" / "b" / "._deep.webp", "WEBP")  # hidden (a macOS resource fork)
    save(Image.fromarray(rgb), tmp_path / "a" / ".cache" / "c.png", "PNG")
    (tmp_path / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a broken link: skipped, and said
    with caplog.at_level(logging.WARNING, logger="semspai.store.sources"):
        assert [p.name for p in find_images([tmp_path / "a"])] == ["deep.webp", "top.JPG"]
    said = [r.getMessage() for r in caplog.records]
    assert any("gone.png: a broken symlink" in m for m in said)
    # the files passed over are counted by extension (hidden ones are not data: not counted)
    assert any("2 file(s) left out as not images by their extension (.gif 1, .txt 1); image extensions are .jpg"
               in m for m in said)  # fmt: skip
    # a file named twice, or named and inside a named folder, is scored once (where it first comes)
    again = find_images([tmp_path / "a" / "top.JPG", tmp_path / "a", tmp_path / "a" / "b" / ".." / "top.JPG"])
    assert [p.name for p in again] == ["top.JPG", "deep.webp"]
    # a file linked under another name is scored once, under its own path (the link sorts first)
    (tmp_path / "a" / "alias.webp").symlink_to(tmp_path / "a" / "b" / "deep.webp")
    assert [str(p.relative_to(tmp_path)) for p in find_images([tmp_path / "a"])] == ["a/b/deep.webp", "a/top.JPG"]
    with pytest.raises(FileNotFoundError, match="nope"):
        find_images([tmp_path / "nope"])


def _folder(tmp_path: Path, rgb: np.ndarray) -> Path:
    folder = tmp_path / "imgs"
    for i, fmt in enumerate(("PNG", "JPEG", "TIFF")):
        save(Image.fromarray(np.roll(rgb, 17 * i, axis=1)), folder / f"{i}.{fmt.lower()}", fmt)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


def test_cli_csv_matches_python_api(checkpoint, detector, tmp_path, rgb):
    folder = _folder(tmp_path, rgb)
    out = tmp_path / "scores.csv"
    res = CliRunner().invoke(cli, ["predict", str(folder), "--checkpoint", str(checkpoint), "--out", str(out),
                                   "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0]) == CSV_HEADER
    assert out.read_text().splitlines()[0] == "path,score,label,n_patches,error"
    api = {p.path: p for p in detector.predict(find_images([folder]))}
    assert len(rows) == 4
    for row in rows:
        p = api[row["path"]]
        if p.error:
            assert row["score"] == "" and row["error"] == p.error
        else:
            assert float(row["score"]) == pytest.approx(p.score, abs=1e-6)
            assert (row["label"], int(row["n_patches"]), row["error"]) == (p.label, p.n_patches, "")
    assert "1 file(s) could not be read" in res.output
    res = CliRunner().invoke(cli, ["predict", str(folder / "0.png"), "--checkpoint", str(checkpoint), "--out", "-",
                                   "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0 and "path,score,label,n_patches,error" in res.output  # `-`: stdout, not a file "-"
    assert not Path("-").exists()


def test_json_output_and_heatmaps(checkpoint, tmp_path, rgb):
    folder = _folder(tmp_path, rgb)
    result = run(PredictConfig(inputs=[str(folder)], checkpoint=str(checkpoint), out=str(tmp_path / "o.json"),
                               heatmaps=str(tmp_path / "maps"), device="cpu"))  # fmt: skip
    rows = json.loads((tmp_path / "o.json").read_text())
    assert [set(r) for r in rows] == [set(CSV_HEADER)] * 4 and result.n_failed == 1
    assert len(result.heatmaps) == 3 and all(p.exists() and p.stat().st_size > 10_000 for p in result.heatmaps)


def test_a_file_that_is_no_checkpoint_is_a_short_one_line_error(tmp_path, rgb):
    (tmp_path / "config.yaml").write_text("MODEL:\n  DROPOUT: 0.1\n")
    Image.fromarray(rgb).save(tmp_path / "a.png")
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "config.yaml")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith(f"Error: {tmp_path / 'config.yaml'} is not a checkpoint (not a file torch.save")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + b"\0" * 60)  # a zip's start, cut short
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "cut.pt")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith(f"Error: checkpoint {tmp_path / 'cut.pt'} cannot be read (")
    assert len(res.output) < 400


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.pop(sorted(m)[0]), r"1 of the model's key\(s\) missing, e.g. "),
        (lambda m: m.update(extra=torch.zeros(1)), r"1 key\(s\) the model lacks, e.g. extra"),
        (lambda m: m.update({k: torch.zeros(3) for k in [sorted(m)[-1]]}), r"\S+ is \(3,\), the model's \("),
    ],
)
def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused(checkpoint, tmp_path, edit, message):
    state = load_checkpoint(checkpoint)
    edit(state["model"])
    save_checkpoint(tmp_path / "odd.pt", {k: v for k, v in state.items() if k != "schema_version"})
    with pytest.raises(CheckpointError, match=rf"odd.pt does not fit its own config \({message}"):
        load_detector(tmp_path / "odd.pt")


def test_cli_fails_only_when_every_file_fails(checkpoint, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    res = CliRunner().invoke(cli, ["predict", str(bad), "--checkpoint", str(checkpoint), "--device", "cpu"])
    assert res.exit_code == 1 and "no image could be scored" in res.output
    assert "path,score,label,n_patches,error" in res.output  # the error rows are still written


def test_precision_resolves_to_fp32_on_cpu(detector):
    assert detector.precision == "fp32" and detector.device == torch.device("cpu")


def test_an_image_mostly_padding_is_scored_with_a_warning(detector, rgb, caplog):
    """A thumbnail is scored (reflection-padded to the patch), and the log says its score means little."""
    with caplog.at_level(logging.WARNING, logger="semspai.pipeline.inference"):
        preds = detector.predict([rgb[:1, :1], rgb[:100, :224], rgb[:112, :224], rgb])
    assert all(p.score is not None and p.n_patches == 5 for p in preds)
    warned = [r.getMessage() for r in caplog.records if "mostly padding" in r.getMessage()]
    assert warned == [  # 1x1, and 100 of 224 rows; half the rows is not "mostly", nor is a full-size image
        "<array 0>: 1x1 is mostly padding in its 224-px patches; its score says little",
        "<array 1>: 224x100 is mostly padding in its 224-px patches; its score says little",
    ]


def test_many_images_mostly_padding_are_named_up_to_a_few_then_counted(detector, rgb, caplog):
    with caplog.at_level(logging.WARNING, logger="semspai.pipeline.inference"):
        preds = detector.predict([rgb[: 20 + i, :30] for i in range(PADDING_WARNINGS + 3)] + [rgb])
    assert len(preds) == PADDING_WARNINGS + 4 and all(p.score is not None for p in preds)
    warned = [r.getMessage() for r in caplog.records if "mostly padding" in r.getMessage()]
    assert warned[:PADDING_WARNINGS] == [
        f"<array {i}>: 30x{20 + i} is mostly padding in its 224-px patches; its score says little"
        + ("; any further such image is counted at the end" if i == PADDING_WARNINGS - 1 else "")
        for i in range(PADDING_WARNINGS)
    ]
    assert warned[PADDING_WARNINGS:] == [
        f"{PADDING_WARNINGS + 3} images in all were mostly padding in their 224-px patches (3 not named above); "
        "their scores say little"
    ]


def test_out_replaces_an_earlier_result_and_nothing_else(checkpoint, tmp_path, rgb):
    image = save(Image.fromarray(rgb), tmp_path / "a.png", "PNG")
    before = image.read_bytes()

    def predict(out: Path, *extra: str):
        return CliRunner().invoke(cli, ["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(out),
                                        "--device", "cpu", *extra])  # fmt: skip

    for out in (tmp_path / "s.csv", tmp_path / "s.json"):
        assert predict(out, "--threshold", "0").exit_code == 0 and "fake" in out.read_text()
        assert predict(out, "--threshold", "1").exit_code == 0  # its own earlier result: replaced
        assert "fake" not in out.read_text() and "real" in out.read_text()
    res = predict(image)  # the input itself, by a slip
    assert res.exit_code == 1 and f"Error: {image} exists and is not an earlier predict result" in res.output
    assert image.read_bytes() == before
    res = predict(tmp_path / "t.csv", "--threshold", "nan")  # nan passes a range check: every comparison is false
    assert res.exit_code == 2 and "nan is not a number within [0, 1]" in res.output
    fifo = tmp_path / "pipe.csv"  # as /dev/stdout is when piped: a check that read it would wait for ever
    os.mkfifo(fifo)

    def unblock() -> None:  # should predict open it to read, it gets an end of file, not a hung test
        with contextlib.suppress(OSError):  # ENXIO: nobody reads it, as it should be
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(10, unblock)
    timer.start()
    res = predict(fifo)
    timer.cancel()
    assert res.exit_code == 1 and f"Error: {fifo} is not a regular file (a device or a pipe?)" in res.output
    assert "without --out, the rows go to stdout as CSV" in res.output and fifo.is_fifo()
    (tmp_path / "notes.csv").write_text("my,own,table\n")
    assert predict(tmp_path / "notes.csv").exit_code == 1
    assert (tmp_path / "notes.csv").read_text() == "my,own,table\n"
    (tmp_path / "s.csv.partial").write_text("mine\n")  # a file of the user's named as a temporary file might be
    (tmp_path / "s.csv.notes.partial").write_text("mine\n")
    for left in ("s.csv.0a1b2c3d.partial", "s.csv.progress.9f8e7d6c.partial"):  # what a kill mid-write leaves
        (tmp_path / left).write_text("half a file")
    assert predict(tmp_path / "s.csv").exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("*.partial")) == ["s.csv.notes.partial", "s.csv.partial"]
    assert (tmp_path / "s.csv.partial").read_text() == "mine\n"


def test_threshold_sets_the_labels_and_defaults_to_the_checkpoints(checkpoint, tmp_path, rgb):
    image = save(Image.fromarray(rgb), tmp_path / "a.png", "PNG")
    base = run(PredictConfig(inputs=[str(image)], checkpoint=str(checkpoint), device="cpu")).predictions[0]
    assert base.label == ("fake" if base.score >= 0.5 else "real")  # this checkpoint's threshold is 0.5
    for t, label in ((base.score, "fake"), (min(1.0, base.score + 1e-6), "real")):
        (p,) = run(
            PredictConfig(inputs=[str(image)], checkpoint=str(checkpoint), device="cpu", threshold=t)
        ).predictions
        assert p.score == base.score and p.label == label
    res = CliRunner().invoke(cli, ["predict", str(image), "--checkpoint", str(checkpoint), "--threshold", "1.5"])
    assert res.exit_code == 2 and "--threshold" in res.output


class Stopped(Exception):
    pass


def _stop_after(
    monkeypatch, n: int, seen: list[str], at_stop: list[str] | None = None, look: Path | None = None
) -> None:
    """Make the detector score `n` images, then stop as a kill would (no cleanup of its own); `seen` gets the
    paths it was given to score, `at_stop` what file `look` held the moment it stopped."""
    real = Detector.iter_predict

    def iter_predict(self, images, return_maps=False):
        for k, (pred, rgb) in enumerate(real(self, (seen.append(str(p)) or p for p in images), return_maps)):
            if k == n:
                if look is not None:
                    at_stop.append(look.read_text())
                raise Stopped
            yield pred, rgb

    monkeypatch.setattr(Detector, "iter_predict", iter_predict)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_stopped_predict_resumes_to_the_same_result(checkpoint, tmp_path, rgb, monkeypatch, suffix):
    folder = _folder(tmp_path, rgb)
    for i in range(3, 6):
        save(Image.fromarray(np.roll(rgb, 29 * i, axis=0)), folder / f"{i}.png", "PNG")
    paths = [str(p) for p in find_images([folder])]  # 6 images and a broken file

    def predict(out: Path, **kw) -> PredictResult:
        return run(PredictConfig(inputs=[str(folder)], checkpoint=str(checkpoint), out=str(out), device="cpu", **kw))

    whole = predict(tmp_path / f"whole{suffix}").out
    out, seen, at_stop = tmp_path / f"scores{suffix}", [], []
    progress = progress_path(out)
    _stop_after(monkeypatch, 4, seen, at_stop, progress)
    with pytest.raises(Stopped):
        predict(out)
    assert at_stop[0] == progress.read_text()  # each row on disk once scored: a SIGKILL would keep them all
    assert not out.exists() and [json.loads(r)["path"] for r in progress.read_text().splitlines()[1:]] == paths[:4]
    with progress.open("rb+") as fh:  # the kill cut the last row short
        fh.truncate(progress.stat().st_size - 9)
    with pytest.raises(StaleOutputError, match=f"{progress} holds 3 image.s. that a predict into {out} scored before"):
        predict(out)  # not thrown away unasked
    kept, dumps, calls = progress.read_bytes(), json.dumps, []

    def dumps_then_stop(obj, *args, **kw):  # stopped while a resume rewrites the rows kept so far
        calls.append(1)
        if len(calls) == 3:
            raise Stopped
        return dumps(obj, *args, **kw)

    monkeypatch.setattr(json, "dumps", dumps_then_stop)
    with pytest.raises(Stopped):
        predict(out, resume=True)
    assert progress.read_bytes() == kept
    monkeypatch.undo()
    seen.clear()
    _stop_after(monkeypatch, 99, seen)
    assert predict(out, resume=True).out == out
    assert seen == paths[3:]  # the cut row again, and the rest; not the three kept
    assert not progress.exists()
    # the same rows; scores within float rounding, as images of a resumed run are batched otherwise
    got, want = (_rows(f.read_text(), suffix) for f in (out, whole))
    assert [{**r, "score": None} for r in got] == [{**r, "score": None} for r in want] and len(got) == 7
    assert all((a["score"] is None) == (b["score"] is None) for a, b in zip(got, want, strict=True))
    assert all(abs(float(a["score"]) - float(b["score"])) < 1e-5 for a, b in zip(got, want, strict=True) if a["score"])


def test_resume_knows_a_file_however_it_is_named_and_scores_changed_files_again(checkpoint, tmp_path, rgb,
                                                                                  monkeypatch, caplog):  # fmt: skip
    folder = tmp_path / "imgs"
    for i, name in enumerate(("a.png", "b.jpeg", "c.png", "d.png")):
        save(Image.fromarray(np.roll(rgb, 23 * i, axis=1)), folder / name, "PNG" if name.endswith("png") else "JPEG")
    (folder / "b-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # sorted: a, b-broken, b.jpeg, c, d
    out = tmp_path / "s.csv"
    monkeypatch.chdir(tmp_path)
    _stop_after(monkeypatch, 3, [])
    with pytest.raises(Stopped):  # run as `predict imgs` from tmp_path
        run(PredictConfig(inputs=["imgs"], checkpoint=str(checkpoint), out=str(out), device="cpu"))
    monkeypatch.undo()
    kept = [json.loads(r) for r in progress_path(out).read_text().splitlines()[1:]]
    assert [r["path"] for r in kept] == ["imgs/a.png", "imgs/b-broken.png", "imgs/b.jpeg"] and kept[1]["error"]
    save(Image.fromarray(rgb), folder / "b-broken.png", "PNG")  # repaired after its error row
    save(Image.fromarray(rgb[::-1]), folder / "b.jpeg", "JPEG")  # replaced by another picture
    seen = []
    _stop_after(monkeypatch, 99, seen)
    with caplog.at_level(logging.INFO, logger="semspai.stages.predict"):  # resumed with the folder's full path
        res = run(PredictConfig(inputs=[str(folder)], checkpoint=str(checkpoint), out=str(out), device="cpu",
                                resume=True))  # fmt: skip
    assert seen == [str(folder / n) for n in ("b-broken.png", "b.jpeg", "c.png", "d.png")]  # a.png kept
    assert any("scored again: 1 error row(s), 1 changed since scored" in r.getMessage() for r in caplog.records)
    assert [p.path for p in res.predictions] == [str(folder / n) for n in sorted(os.listdir(folder))]
    assert res.n_failed == 0 and res.predictions[0].score == kept[0]["score"]
    fresh = run(PredictConfig(inputs=[str(folder)], checkpoint=str(checkpoint), device="cpu")).predictions
    assert [abs(a.score - b.score) < 1e-5 for a, b in zip(res.predictions, fresh, strict=True)] == [True] * 5


def test_a_heatmap_is_drawn_before_its_row_is_kept_and_an_empty_progress_file_starts_over(checkpoint, tmp_path,
                                                                                          rgb, monkeypatch):  # fmt: skip
    folder = _folder(tmp_path, rgb)
    out, maps = tmp_path / "s.csv", tmp_path / "maps"
    real, drawn = report.plot_heatmap, []

    def plot_then_stop(*args, **kw):  # killed while drawing the second image's heatmap
        if drawn:
            raise Stopped
        drawn.append(real(*args, **kw))
        return drawn[-1]

    monkeypatch.setattr(report, "plot_heatmap", plot_then_stop)
    cfg = PredictConfig(inputs=[str(folder)], checkpoint=str(checkpoint), out=str(out), heatmaps=str(maps),
                        device="cpu")  # fmt: skip
    with pytest.raises(Stopped):
        run(cfg)
    monkeypatch.undo()
    assert len(progress_path(out).read_text().splitlines()) == 2 and len(list(maps.iterdir())) == 1
    _stop_after(monkeypatch, 0, [])
    with pytest.raises(Stopped):
        run(dataclasses.replace(cfg, out=str(tmp_path / "t.csv")))
    monkeypatch.undo()
    assert len(progress_path(tmp_path / "t.csv").read_text().splitlines()) == 1  # the header alone: no rows
    assert run(dataclasses.replace(cfg, out=str(tmp_path / "t.csv"))).n_failed == 1  # starts over unasked


def test_heatmaps_are_named_by_file_not_by_place_so_a_file_added_before_a_resume_moves_none(checkpoint, tmp_path,
                                                                                              rgb, monkeypatch):  # fmt: skip
    folder = tmp_path / "imgs"
    odd = os.fsdecode(b"\xffodd.png")  # a name that is not UTF-8: matplotlib took no such title
    for i, name in enumerate(("b.png", "c.png", odd)):
        save(Image.fromarray(np.roll(rgb, 17 * i, axis=1)), folder / name, "PNG")
    out, maps = tmp_path / "s.csv", tmp_path / "maps"
    cfg = PredictConfig(inputs=[str(folder)], checkpoint=str(checkpoint), out=str(out), heatmaps=str(maps),
                        device="cpu")  # fmt: skip
    _stop_after(monkeypatch, 2, [])
    with pytest.raises(Stopped):
        run(cfg)
    monkeypatch.undo()
    first = sorted(p.name for p in maps.iterdir())
    assert len(first) == 2
    save(Image.fromarray(rgb[::-1]), folder / "a.png", "PNG")  # sorts before every image scored
    seen = []
    _stop_after(monkeypatch, 99, seen)
    res = run(dataclasses.replace(cfg, resume=True))
    assert sorted(Path(p).name for p in seen) == sorted(["a.png", odd])  # the two scored are kept, maps and all
    assert res.n_failed == 0 and len(res.predictions) == 4
    names = sorted(p.name for p in maps.iterdir())
    assert len(names) == 4 and set(first) < set(names)  # one map an image, the earlier ones as they were


def test_resume_scores_again_error_rows_and_images_without_their_heatmap(checkpoint, tmp_path, rgb, monkeypatch,
                                                                         caplog):  # fmt: skip
    folder = _folder(tmp_path, rgb)  # 0.png 1.jpeg 2.tiff broken.png
    out, maps = tmp_path / "s.csv", tmp_path / "maps"
    cfg = PredictConfig(inputs=[str(folder)], checkpoint=str(checkpoint), out=str(out), device="cpu")
    (folder / "broken.png").rename(folder / "00-broken.png")  # sorted second: its error row is kept before the stop
    _stop_after(monkeypatch, 3, [])
    with pytest.raises(Stopped):  # no --heatmaps: rows for 0.png, 00-broken.png (an error), 1.jpeg
        run(cfg)
    monkeypatch.undo()
    seen = []
    _stop_after(monkeypatch, 99, seen)
    with caplog.at_level(
        logging.INFO, logger="semspai.stages.predict"
    ):  # resumed with heatmaps, the bad file as it was
        res = run(dataclasses.replace(cfg, heatmaps=str(maps), resume=True))
    assert seen == [str(p) for p in find_images([folder])]  # every one: the error row and the two without a map
    assert any(f"scored again: 2 without a heatmap in {maps}, 1 error row(s)" in r.getMessage() for r in caplog.records)
    assert len(list(maps.iterdir())) == 3 and res.n_failed == 1
    # a progress file that holds no row yet is started over even with --resume and another checkpoint
    _stop_after(monkeypatch, 0, [])
    with pytest.raises(Stopped):
        run(cfg)
    monkeypatch.undo()
    other = make_checkpoint(tmp_path / "other.pt", mode="none", seed=3)
    assert run(dataclasses.replace(cfg, checkpoint=str(other), resume=True)).n_failed == 1


def test_a_file_name_that_is_no_utf8_is_written_back_as_its_bytes(checkpoint, tmp_path, rgb):
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name, as Linux keeps it: bytes that are no UTF-8
    image = save(Image.fromarray(rgb), tmp_path / name, "PNG")
    for out in (tmp_path / "s.csv", tmp_path / "s.json"):
        res = run(PredictConfig(inputs=[str(tmp_path)], checkpoint=str(checkpoint), out=str(out), device="cpu"))
        assert res.n_failed == 0 and not progress_path(out).exists()
    assert os.fsencode(str(image)) + b"," in (tmp_path / "s.csv").read_bytes()  # the path as it is on disk
    assert json.loads((tmp_path / "s.json").read_text())[0]["path"] == str(image)  # JSON escapes it
    res = CliRunner().invoke(cli, ["predict", str(image), "--checkpoint", str(checkpoint), "--device", "cpu"])
    assert res.exit_code == 0 and os.fsencode(str(image)) + b"," in res.stdout_bytes


def _rows(text: str, suffix: str) -> list[dict]:
    rows = json.loads(text) if suffix == ".json" else list(csv.DictReader(io.StringIO(text)))
    return [r | {"score": None if r["score"] in (None, "") else r["score"]} for r in rows]


def test_resume_refuses_another_checkpoint_or_threshold_and_a_foreign_progress_file(checkpoint, tmp_path, rgb,
                                                                                     monkeypatch):  # fmt: skip
    folder = _folder(tmp_path, rgb)
    out = tmp_path / "s.csv"

    def predict(ck: Path = checkpoint, **kw) -> PredictResult:
        return run(PredictConfig(inputs=[str(folder)], checkpoint=str(ck), out=str(out), device="cpu", **kw))

    _stop_after(monkeypatch, 1, [])
    with pytest.raises(Stopped):
        predict()
    monkeypatch.undo()
    other = make_checkpoint(tmp_path / "other.pt", mode="global_local", fusion="gate", seed=1)
    before = progress_path(out).read_bytes()
    with pytest.raises(StaleOutputError, match="was scored with another checkpoint"):
        predict(other, resume=True)
    with pytest.raises(StaleOutputError, match=r"labelled at threshold 0.5, not 0.7; pass --threshold 0.5"):
        predict(resume=True, threshold=0.7)
    assert progress_path(out).read_bytes() == before
    assert predict(resume=True, threshold=0.5).n_failed == 1
    header = before.split(b"\n")[0].decode()
    row = {"path": "a.png", "score": 0.1, "label": "real", "n_patches": 5, "error": "", "realpath": "/a.png"}
    for bad in (json.dumps(row), '{"path": "a.png", "score": 0.1}', "[1, 2]", "{oops"):  # said, not guessed
        progress_path(out).write_text(f"{header}\n{bad}\n")
        with pytest.raises(StaleOutputError, match="s.csv.progress: line 2 is (damaged|not a row a predict of this "
                           "semspai keeps)"):  # fmt: skip
            predict(resume=True)
    progress_path(out).write_text("my notes\n")
    with pytest.raises(FileExistsError, match="is not the progress of a `semspai predict`; it is left as it is"):
        predict(resume=True)
    assert progress_path(out).read_text() == "my notes\n"
    with pytest.raises(ConfigError, match="--resume continues a predict into --out FILE"):
        run(PredictConfig(inputs=[str(folder)], checkpoint=str(checkpoint), device="cpu", resume=True))


def test_stdout_gets_each_row_as_it_is_scored(checkpoint, tmp_path, rgb, monkeypatch):
    folder = _folder(tmp_path, rgb)
    whole = CliRunner().invoke(cli, ["predict", str(folder), "--checkpoint", str(checkpoint), "--device", "cpu"])
    assert whole.exit_code == 0, whole.output
    _stop_after(monkeypatch, 2, [])
    res = CliRunner().invoke(cli, ["predict", str(folder), "--checkpoint", str(checkpoint), "--device", "cpu"])
    assert isinstance(res.exception, Stopped)
    lines = whole.stdout.splitlines()
    assert res.stdout.splitlines() == lines[:3] and lines[0] == ",".join(CSV_HEADER) and len(lines) == 5


def test_threads_bound_the_model_and_the_decoding_and_are_set_back(checkpoint, tmp_path, rgb, monkeypatch):
    image = save(Image.fromarray(rgb), tmp_path / "a.png", "PNG")
    seen = []
    real = Detector.score
    monkeypatch.setattr(Detector, "score", lambda self, *a, **k: seen.append(
        (torch.get_num_threads(), self.decode_workers)) or real(self, *a, **k))  # fmt: skip
    before = torch.get_num_threads()
    for out in ([], ["--out", str(tmp_path / "s.csv")]):
        seen.clear()
        res = CliRunner().invoke(cli, ["predict", str(image), "--checkpoint", str(checkpoint), "--device", "cpu",
                                       "--threads", "1", *out])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert seen == [(1, 1)] and torch.get_num_threads() == before
    assert "--threads" in CliRunner().invoke(cli, ["predict", "--help"]).output


def test_one_predict_at_a_time_per_out(checkpoint, tmp_path, rgb):
    image = save(Image.fromarray(rgb), tmp_path / "a.png", "PNG")
    out = tmp_path / "s.csv"
    cfg = PredictConfig(inputs=[str(image)], checkpoint=str(checkpoint), out=str(out), device="cpu")
    with run_lock(lock_beside(out), lambda holder: AssertionError(holder)):
        with pytest.raises(FileExistsError, match=f"{out} is being written by another `semspai predict` \\(pid"):
            run(cfg)
    assert not out.exists() and run(cfg).out == out


def test_files_are_decoded_in_threads_ahead_of_the_model_and_arrays_inline(detector, rgb, tmp_path, monkeypatch):
    paths = [save(Image.fromarray(np.roll(rgb, 11 * i, axis=0)), tmp_path / f"{i}.png", "PNG") for i in range(6)]
    want = [p.score for p in detector.predict(paths)]
    threads = []
    real = inference.to_rgb
    monkeypatch.setattr(
        inference, "to_rgb", lambda image: threads.append((type(image), threading.current_thread().name)) or real(image)
    )
    monkeypatch.setattr(detector, "decode_workers", 2)
    preds = detector.predict([*paths, rgb])
    assert [p.path for p in preds] == [*map(str, paths), "<array 6>"]  # input order kept
    assert [p.score for p in preds[:6]] == pytest.approx(want, abs=1e-5)  # batched with the array: rounding
    # each file on a decode thread, the array in the caller's (in whatever order the threads got to them)
    on = {kind: [name for k, name in threads if k is kind] for kind in (type(paths[0]), np.ndarray)}
    assert len(on[type(paths[0])]) == 6 and all(name.startswith("decode") for name in on[type(paths[0])]), threads
    assert on[np.ndarray] == [threading.current_thread().name], threads


def test_clip_given_for_a_spectral_only_checkpoint_is_said_to_be_unused(tmp_path, caplog):
    none = make_checkpoint(tmp_path / "none.pt", mode="none", seed=1)
    with caplog.at_level(logging.WARNING, logger="semspai.pipeline.inference"):
        det = load_detector(none, clip="ViT-B-32:/nowhere.safetensors")
    assert det.semantic_mode == "none"
    assert "--clip ViT-B-32:/nowhere.safetensors is not used by" in caplog.text and "spectral-only" in caplog.text
