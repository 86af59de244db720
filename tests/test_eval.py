"""`semspai eval`: metrics.json schema, per-generator pairing, perturbations, store vs on-the-fly, report files."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from semspai.pipeline import inference
from semspai.pipeline.config import ConfigError
from semspai.pipeline.data import STORE_CACHE_DIR, DataError
from semspai.pipeline.inference import load_detector
from semspai.pipeline.perturb import Perturbation, PerturbError, parse_perturbations
from semspai.pipeline.photometric import add_noise as add_noise_batch
from semspai.stages.cli import cli
from semspai.stages.evaluate import CheckpointEval, EvalConfig, pick_examples, run, write_predictions
from semspai.stages.extract import ExtractConfig
from semspai.stages.extract import run as extract
from semspai.store.checkpoints import load_checkpoint, save_checkpoint
from semspai.store.features import FeatureStoreError
from semspai.store.images import decode_image
from semspai.store.locks import lock_beside, run_lock
from semspai.store.manifest import StageManifest, StaleOutputError, write_manifest
from semspai.store.shards import iter_shard, resolve_shards
from tests.conftest import random_photo, write_image
from tests.detector_fixtures import make_checkpoint

M_KEYS = {"auc", "ap", "acc_at_0_5", "acc_at_threshold", "tpr_at_1_fpr", "tpr_at_5_fpr", "n_real", "n_fake",
          "threshold", "auc_ci"}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ck")
    return {"global_local": make_checkpoint(root / "gl.pt", "global_local", "gate"),
            "none": make_checkpoint(root / "none.pt", "none")}  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(tiny_shards: Path, checkpoints, tmp_path_factory: pytest.TempPathFactory):
    """One eval with two checkpoints and two perturbations, shared by the report tests."""
    cfg = EvalConfig(checkpoints=[str(checkpoints["global_local"]), str(checkpoints["none"])], shards=str(tiny_shards),
                     out=str(tmp_path_factory.mktemp("eval")), perturb=["jpeg:60", "noise:0.05"], device="cpu",
                     bootstrap=200)  # fmt: skip
    return run(cfg)


def eval_test_split(checkpoint: Path, root: Path, images: list[tuple[str, tuple[int, int]]]):
    """Shard `images` ((suffix, (width, height)), alternately real and fake, all in the test split) under `root`
    and eval them with `checkpoint` by the command; (its output, eval.json, report.md)."""
    from semspai.stages.shard import ShardConfig
    from semspai.stages.shard import run as shard

    rows = ["path,label,generator,split"]
    for i, (suffix, size) in enumerate(images):
        label = ("real", "fake")[i % 2]
        path = write_image(root / "data" / f"{i}.{suffix}", *size, seed=i)
        rows.append(f"{path.name},{label},{'' if label == 'real' else 'gan'},test")
    (root / "data" / "m.csv").write_text("\n".join(rows) + "\n")
    shard(ShardConfig(sources=[], manifests=[str(root / "data" / "m.csv")], out=str(root / "shards")))
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoint), "--shards", str(root / "shards"),
                                   "--out", str(root / "ev"), "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return res.output, json.loads((root / "ev" / "eval.json").read_text()), (root / "ev" / "report.md").read_text()


def test_images_mostly_padding_are_counted_in_the_summary_report_and_eval_json(checkpoints, tmp_path):
    # thumbnails among photos: 60 x 50 is 94% padding, 300 x 260 none
    output, info, md = eval_test_split(checkpoints["none"], tmp_path, [("png", (60, 50) if i < 3 else (300, 260))
                                                                       for i in range(8)])  # fmt: skip
    note = "3 of 8 images are mostly padding in their 224-px patches (smaller than a patch, reflection-padded)"
    assert f"note: {note}" in output and note in md and info["n_mostly_padding"] == 3


def test_file_formats_are_scored_apart_and_one_class_per_format_is_noted(checkpoints, tmp_path):
    size = (240, 230)
    output, info, md = eval_test_split(checkpoints["none"], tmp_path / "apart", [("jpg", size), ("png", size)] * 4)
    note = "no file format holds both classes (real: jpeg; fake: png): the AUC may measure the format's compression"
    assert f"note: {note}" in output and note in md
    per_format = info["checkpoints"][0]["per_format"]
    assert {f: (m["n_real"], m["n_fake"], m["auc"]) for f, m in per_format.items()} == {
        "jpeg": (4, 0, None), "png": (0, 4, None)}  # fmt: skip
    assert "## Per file format" in md
    output, info, md = eval_test_split(checkpoints["none"], tmp_path / "mixed",
                                       [("jpg", size), ("png", size), ("png", size), ("jpeg", size)] * 2)  # fmt: skip
    per_format = info["checkpoints"][0]["per_format"]
    assert {f: (m["n_real"], m["n_fake"]) for f, m in per_format.items()} == {"jpeg": (2, 2), "png": (2, 2)}
    assert all(m["auc"] is not None for m in per_format.values())
    assert "no file format holds both classes" not in output + md and "## Per file format" in md


class Stopped(Exception):
    """Stands for a kill: raised from inside the scoring loop."""


def test_a_stopped_eval_resumes_from_its_kept_rows_to_the_same_result(tiny_shards, checkpoints, tmp_path, monkeypatch):
    from semspai.stages import evaluate

    real_batches, real_row = inference.patch_batches, evaluate.sample_row
    monkeypatch.setattr(inference, "patch_batches", lambda items: real_batches(items, max_images=1))
    rows_made: list[str] = []

    def counting_row(sample, rgb, pred):
        if len(rows_made) == stop_at:
            raise Stopped
        rows_made.append(sample.key)
        return real_row(sample, rgb, pred)

    monkeypatch.setattr(evaluate, "sample_row", counting_row)

    def cfg(out: str, **over) -> EvalConfig:
        base = dict(checkpoints=[str(checkpoints["global_local"]), str(checkpoints["none"])], shards=str(tiny_shards),
                    out=str(tmp_path / out), perturb=["jpeg:60"], device="cpu", bootstrap=50, n_heatmaps=1)  # fmt: skip
        return EvalConfig(**base | over)

    stop_at = -1
    whole = run(cfg("whole"))
    n = len(whole.runs[0].keys)
    assert n == 4 and len(rows_made) == 2 * n and not (tmp_path / "whole" / evaluate.PROGRESS_DIR).exists()
    rows_made.clear()
    stop_at = n + 1  # the first checkpoint scored, one image of the second
    with pytest.raises(Stopped):
        run(cfg("out"))
    kept = tmp_path / "out" / evaluate.PROGRESS_DIR
    assert [len(p.read_text().splitlines()) - 1 for p in sorted(kept.iterdir())] == [n, 1]
    assert not (tmp_path / "out" / "metrics.json").exists()
    with (kept / "checkpoint-1.jsonl").open("a") as fh:
        fh.write('{"key": "cut sh')  # a kill in the middle of a line: dropped on reading
    stop_at = -1
    with pytest.raises(StaleOutputError, match=f"holds {n + 1} image score.s. of an eval .* pass --resume"):
        run(cfg("out"))
    with pytest.raises(StaleOutputError, match="scored with another --perturb"):
        run(cfg("out", perturb=["jpeg:70"], resume=True))
    with pytest.raises(StaleOutputError, match="scored with another checkpoint"):
        run(cfg("out", checkpoints=[str(checkpoints["none"]), str(checkpoints["global_local"])], resume=True))
    rows_made.clear()
    resumed = run(cfg("out", resume=True))
    assert len(rows_made) == n - 1  # only what the stop left: the second checkpoint's last three images
    assert not kept.exists()
    for a, b in zip(whole.runs, resumed.runs, strict=True):
        assert a.keys == b.keys and a.paths == b.paths and a.generators == b.generators
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.scores, b.scores)
        assert all(np.array_equal(a.perturbed[k], b.perturbed[k]) for k in a.perturbed)
        assert a.metrics == b.metrics and a.clip_score == b.clip_score and a.n_mostly_padding == b.n_mostly_padding
    assert whole.runs[0].clip_score is not None  # the report's checkpoint has its CLIP score, from kept rows too
    for key, maps in whole.runs[0].maps.items():
        got = resumed.runs[0].maps[key]
        assert np.array_equal(maps.boxes, got.boxes) and np.array_equal(maps.attention, got.attention)
        assert np.array_equal(maps.gates, got.gates)
    assert (tmp_path / "out" / "metrics.json").read_text() == (tmp_path / "whole" / "metrics.json").read_text()


def test_resume_without_a_stopped_eval_scores_everything_and_two_evals_into_one_out_are_refused(
    tiny_shards, checkpoints, tmp_path, caplog
):
    out = tmp_path / "ev"
    with caplog.at_level("INFO", logger="semspai.stages.evaluate"):
        res = run(EvalConfig(checkpoints=[str(checkpoints["none"])], shards=str(tiny_shards), out=str(out),
                             device="cpu", bootstrap=20, n_heatmaps=0, resume=True))  # fmt: skip
    assert len(res.runs[0].keys) == 4 and "no stopped eval to resume" in caplog.text
    (out / "metrics.json.0a1b2c3d.partial").write_text("half a file")  # what a kill mid-write leaves
    (out / "notes.partial").write_text("mine")
    with run_lock(lock_beside(out), FileExistsError):
        res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoints["none"]), "--shards", str(tiny_shards),
                                       "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert res.exit_code != 0 and "is being written by another `semspai eval`" in res.output
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoints["none"]), "--shards", str(tiny_shards),
                                   "--out", str(out), "--device", "cpu", "--resume"])  # fmt: skip
    assert res.exit_code == 0 and "none: AUC" in res.output, res.output
    assert [p.name for p in out.glob("*.partial")] == ["notes.partial"]


def test_metrics_json_has_designs_schema(evaluated):
    m = json.loads((evaluated.out / "metrics.json").read_text())
    assert set(m) == {"overall", "per_generator", "perturbations"}
    assert set(m["overall"]) == M_KEYS
    # tiny_shards' test split: every 4th file -> gan_a/003, gan_b/003, real/003, real/007
    assert (m["overall"]["n_real"], m["overall"]["n_fake"]) == (2, 2)
    assert set(m["per_generator"]) == {"gan_a", "gan_b"}
    for gm in m["per_generator"].values():  # each generator's fakes against ALL reals
        assert set(gm) == M_KEYS and (gm["n_real"], gm["n_fake"]) == (2, 1)
    assert set(m["perturbations"]) == {"jpeg:60", "noise:0.05"}
    for pm in m["perturbations"].values():
        assert set(pm) == {"overall", "per_generator"} and set(pm["overall"]) == M_KEYS
    assert m["overall"]["threshold"] == 0.5
    assert evaluated.headline["n_real"] == 2 and 0.0 <= evaluated.headline["auc"] <= 1.0


def test_eval_scores_equal_predict_scores(evaluated, checkpoints, tiny_shards):
    """Without a store, eval scores through the same code path as predict."""
    rows = {r["key"]: r for r in csv.DictReader((evaluated.out / "predictions.csv").open())}
    images = {s.key: decode_image(s.image) for p in resolve_shards(tiny_shards) for s in iter_shard(p) if s.key in rows}
    keys = sorted(images)
    preds = load_detector(checkpoints["global_local"]).predict([images[k] for k in keys])
    for key, pred in zip(keys, preds, strict=True):
        assert float(rows[key]["score"]) == pytest.approx(pred.score, abs=1e-6)
    # the ablation's second checkpoint has its own columns, each image's scores by that checkpoint
    second = evaluated.runs[1].label
    assert f"score@{second}" in rows[keys[0]] and f"noise:0.05@{second}" in rows[keys[0]]
    preds = load_detector(checkpoints["none"]).predict([images[k] for k in keys])
    for key, pred in zip(keys, preds, strict=True):
        assert float(rows[key][f"score@{second}"]) == pytest.approx(pred.score, abs=1e-6)
    # perturbed scores differ from clean ones: the perturbation reached the model
    assert any(abs(float(r["noise:0.05"]) - float(r["score"])) > 1e-6 for r in rows.values())


def test_predictions_leave_cells_empty_where_a_checkpoint_did_not_score(evaluated, tmp_path):
    """An ablation whose checkpoints kept other generators scores other images: the file still gets written."""
    first, second = evaluated.runs[:2]
    keep = list(range(1, len(second.keys)))
    fewer = dataclasses.replace(
        second,
        keys=[second.keys[i] for i in keep],
        scores=second.scores[keep],
        perturbed={k: v[keep] for k, v in second.perturbed.items()},
    )
    write_predictions([first, fewer], tmp_path / "p.csv")
    rows = {r["key"]: r for r in csv.DictReader((tmp_path / "p.csv").open())}
    assert list(rows) == first.keys
    assert rows[second.keys[0]][f"score@{second.label}"] == "" and rows[second.keys[0]]["score"] != ""
    assert all(rows[k][f"score@{second.label}"] != "" for k in fewer.keys)


def test_report_files_exist_and_html_references_only_existing_files(evaluated):
    out = evaluated.out
    page = evaluated.report_html.read_text()
    refs = re.findall(r'src="([^"]+)"', page)
    assert refs and all((out / r).is_file() for r in refs)
    for name in ("roc.png", "pr.png", "scores.png", "robustness.png", "roc_ablation.png"):
        assert f"plots/{name}" in refs
    assert sum(r.startswith("heatmaps/") for r in refs) >= 6  # confident fakes and reals at least
    md = evaluated.report_md.read_text()
    for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / ref).is_file()
    for section in ("Per generator", "Robustness", "CLIP score", "Ablation", "Where the detector looked"):
        assert f"## {section}" in md
    assert "computed on the fly" in md
    assert not re.search(r"https?://", page)  # self-contained: nothing fetched from elsewhere


def test_resolved_config_and_ablation_written(evaluated):
    cfg = yaml.safe_load((evaluated.out / "config.yaml").read_text())
    assert cfg["MODEL"]["SEMANTIC"]["MODE"] == "global_local"
    info = json.loads((evaluated.out / "eval.json").read_text())
    assert [c["mode"] for c in info["checkpoints"]] == ["global_local", "none"]
    assert info["clip_score"]["real"]["n"] == 2  # tiny_shards gives every image a caption


def test_store_gives_the_same_scores_as_on_the_fly(tiny_shards, checkpoints, evaluated, tmp_path, monkeypatch, caplog):
    store = str(tmp_path / "features.zarr")
    extract(ExtractConfig(shards=str(tiny_shards), store=store, clip="tiny-random", workers=0, device="cpu"))
    loads = []
    real_load = inference.load_embedder
    monkeypatch.setattr(inference, "load_embedder", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    res = run(EvalConfig(checkpoints=[str(checkpoints["global_local"])], shards=str(tiny_shards), store=store,
                         out=str(tmp_path / "out"), device="cpu", bootstrap=50, n_heatmaps=1))  # fmt: skip
    cached = {r.keys[i]: r.scores[i] for r in res.runs[:1] for i in range(len(r.keys))}
    fly = evaluated.runs[0]
    for key, score in zip(fly.keys, fly.scores, strict=True):
        assert cached[key] == pytest.approx(score, abs=1e-4)
    assert "read from the feature store" in res.report_md.read_text()
    assert loads == []  # every vector came from the store: no encoder was loaded (eval works without its weights)
    with caplog.at_level("WARNING", logger="semspai.stages.evaluate"):
        run(EvalConfig(checkpoints=[str(checkpoints["global_local"])], shards=str(tiny_shards), store=store,
                       out=str(tmp_path / "clip"), device="cpu", bootstrap=20, n_heatmaps=0, clip="tiny-random"))  # fmt: skip
    assert loads == [] and "--clip tiny-random is not used: every CLIP vector comes from the store" in caplog.text
    # a store over DATA.STORE_MEMORY_GB is memory-mapped from a copy: same scores, copy gone afterwards
    mapped = run(EvalConfig(checkpoints=[str(checkpoints["global_local"])], shards=str(tiny_shards), store=store,
                            out=str(tmp_path / "mapped"), device="cpu", bootstrap=50, n_heatmaps=1,
                            overrides=["DATA.STORE_MEMORY_GB=0"]))  # fmt: skip
    assert np.array_equal(mapped.runs[0].scores, res.runs[0].scores)
    assert not (tmp_path / "mapped" / STORE_CACHE_DIR).exists()
    perturbed = run(EvalConfig(checkpoints=[str(checkpoints["global_local"])], shards=str(tiny_shards), store=store,
                               out=str(tmp_path / "perturbed"), device="cpu", bootstrap=50, n_heatmaps=0,
                               perturb=["blur:1.0"]))  # fmt: skip
    assert len(loads) == 1  # perturbed pixels need the encoder
    assert np.array_equal(perturbed.runs[0].scores, res.runs[0].scores)


def test_store_of_another_clip_is_refused(tiny_shards, checkpoints, tmp_path):
    store = str(tmp_path / "other.zarr")
    extract(ExtractConfig(shards=str(tiny_shards), store=store, clip="timm/resnet10t:random", workers=0, device="cpu"))
    with pytest.raises(
        FeatureStoreError,
        match=r"another setup .*; the checkpoint needs a store extracted with its "
        r"own encoder \(tiny-random\) and this semspai's patch rule, or no --store \(CLIP then runs on the fly\)$",
    ):
        run(EvalConfig(checkpoints=[str(checkpoints["global_local"])], shards=str(tiny_shards), store=store,
                       out=str(tmp_path / "out"), device="cpu"))  # fmt: skip


def test_samples_missing_from_the_store_get_advice_eval_can_take(tiny_shards, checkpoints, tmp_path):
    store = str(tmp_path / "part.zarr")  # the train split's first tar only
    extract(ExtractConfig(shards=f"{tiny_shards}/train-000000.tar", store=store, clip="tiny-random", workers=0,
                          device="cpu"))  # fmt: skip
    with pytest.raises(DataError, match=r"not in feature store .* or leave out --store \(CLIP then runs on the fly\)$"):
        run(EvalConfig(checkpoints=[str(checkpoints["global_local"])], shards=str(tiny_shards), store=store,
                       split="train", out=str(tmp_path / "out"), device="cpu"))  # fmt: skip


def test_empty_split_is_an_error_naming_it(tiny_shards, checkpoints, tmp_path):
    with pytest.raises(DataError, match="split 'val' is empty"):
        run(EvalConfig(checkpoints=[str(checkpoints["none"])], shards=str(tiny_shards / "test-*.tar"), split="val",
                       out=str(tmp_path), device="cpu"))  # fmt: skip
    assert not (tmp_path / "metrics.json").exists()


def test_only_data_and_chunk_overrides_are_accepted(tiny_shards, checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="eval takes only"):
        run(EvalConfig(checkpoints=[str(checkpoints["none"])], shards=str(tiny_shards), out=str(tmp_path),
                       overrides=["MODEL.HIDDEN_DIM=64"], device="cpu"))  # fmt: skip
    res = run(EvalConfig(checkpoints=[str(checkpoints["none"])], shards=str(tiny_shards), out=str(tmp_path),
                         overrides=["DATA.GENERATORS=gan_a", "MODEL.SPECTRAL.CHUNK_SIZE=2"], device="cpu",
                         bootstrap=50, n_heatmaps=1))  # fmt: skip
    assert set(res.metrics["per_generator"]) == {"gan_a"} and res.metrics["overall"]["n_fake"] == 1
    assert res.runs[0].config.MODEL.SPECTRAL.CHUNK_SIZE == 2


def test_eval_scores_every_generator_and_marks_the_unseen(tiny_shards, tmp_path):
    """A checkpoint trained on gan_a only (DATA.GENERATORS=[gan_a]) is scored on gan_b too, unless --set says
    otherwise; the report, eval.json and the summary line say gan_b was never seen in training."""
    ck = make_checkpoint(tmp_path / "a.pt", "none", train_generators={"gan_a": 3})
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(ck), "--shards", str(tiny_shards), "--out", str(out),
                                   "--device", "cpu", "--heatmaps", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "(2 real, 2 fake; unseen in training: gan_b)" in res.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_generator"]) == {"gan_a", "gan_b"} and set(m) == {"overall", "per_generator", "perturbations"}
    assert json.loads((out / "eval.json").read_text())["checkpoints"][0]["train_generators"] == {"gan_a": 3}
    assert yaml.safe_load((out / "config.yaml").read_text())["DATA"]["GENERATORS"] == []  # what eval scored
    md = (out / "report.md").read_text()
    assert "Trained on fakes of gan_a 3" in md
    assert re.search(r"\| gan_a \| trained on \|", md) and re.search(r"\| gan_b \| unseen \|", md)
    kept = run(EvalConfig(checkpoints=[str(ck)], shards=str(tiny_shards), out=str(tmp_path / "kept"), device="cpu",
                          overrides=["DATA.GENERATORS=gan_b"], bootstrap=20, n_heatmaps=1))  # fmt: skip
    assert set(kept.metrics["per_generator"]) == {"gan_b"}
    with pytest.raises(
        DataError, match="DATA.GENERATORS: no fake image of the tars of .* that may hold split test comes from 'gan_c'"
    ):
        run(EvalConfig(checkpoints=[str(ck)], shards=str(tiny_shards), out=str(tmp_path / "typo"), device="cpu",
                       overrides=["DATA.GENERATORS=gan_b,gan_c"]))  # fmt: skip
    assert not (tmp_path / "typo").exists()  # a failed eval leaves no empty --out behind
    old = run(EvalConfig(checkpoints=[str(make_checkpoint(tmp_path / "old.pt", "none"))], shards=str(tiny_shards),
                         out=str(tmp_path / "old"), device="cpu", bootstrap=20, n_heatmaps=1))  # fmt: skip
    assert old.runs[0].train_generators is None
    assert "does not record which generators" in old.report_md.read_text()


@pytest.mark.parametrize("text", ["jpeg:50", "resize:0.5", "blur:1.0", "noise:0.02"])
def test_each_perturbation_really_changes_the_input(text):
    rgb = random_photo(240, 200, seed=1)
    (p,) = parse_perturbations([text])
    out = p.apply(rgb, "k1")
    assert out.dtype == np.uint8 and out.ndim == 3
    if p.kind == "resize":
        assert out.shape == (100, 120, 3)
    else:
        assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() > 0.3
    np.testing.assert_array_equal(out, p.apply(rgb, "k1"))  # deterministic


def test_noise_is_seeded_by_key_and_parsing_checks_ranges():
    rgb = random_photo(64, 64, seed=2)
    p = Perturbation("noise", 0.05)
    assert not np.array_equal(p.apply(rgb, "a"), p.apply(rgb, "b"))
    assert [q.name for q in parse_perturbations(["jpeg:50,75", "jpeg:75", "blur:1.0"])] == ["jpeg:50", "jpeg:75",
                                                                                             "blur:1"]  # fmt: skip
    for bad in ("jpeg:0", "jpeg:70.5", "resize:-1", "blur", "sharpen:2", "noise:x", "noise:inf", "blur:nan"):
        with pytest.raises(PerturbError, match="--perturb"):
            parse_perturbations([bad])
    assert [q.name for q in parse_perturbations(["resize:0.5,2,4"])] == ["resize:0.5", "resize:2", "resize:4"]
    with pytest.raises(PerturbError, match=r"'100' is out of range \(resize: scale factor in \(0, 4\]"):
        parse_perturbations(["resize:100"])  # would take the image to 10,000 times its pixels


def add_noise(rgb: np.ndarray, std: float, seed: int) -> np.ndarray:
    return add_noise_batch(torch.from_numpy(rgb)[None], [std], [seed])[0].numpy()


def test_noise_has_the_asked_spread_and_no_bias():
    grey = np.full((256, 256, 3), 128, np.uint8)  # mid-grey: the clip to 0..255 never bites at this std
    diff = add_noise(grey, 0.03, 0).astype(np.float64) - 128
    assert abs(diff.std() - 0.03 * 255) < 0.05 * 0.03 * 255 and abs(diff.mean()) < 0.1
    np.testing.assert_array_equal(diff, np.rint(diff))  # quantised to whole 8-bit steps
    assert add_noise(grey, 0.0, 0).tolist() == grey.tolist()
    wide = add_noise(grey, 0.1, 1).astype(np.float64) - 128  # 25.5 levels: shape visible
    assert abs((np.abs(wide) <= 25).mean() - 0.6827) < 0.01  # Gaussian: 68.27% within one standard deviation
    assert abs((np.abs(wide) <= 51).mean() - 0.9545) < 0.01 and np.abs(wide).max() <= round(4.33 * 25.5)
    # eval accepts any std: with the same draws, scaling the noise up only saturates further (no wrap-around)
    big, huge = (add_noise(grey, std, 2) for std in (10.0, 100.0))
    assert (huge[big == 255] == 255).all() and (huge[big == 0] == 0).all() and 0.45 < (huge == 255).mean() < 0.55
    assert set(np.unique(add_noise(grey, float("inf"), 3))) == {0, 255}
    # each image of a batch draws from its own seed: alone or beside another, the same noise
    pair = add_noise_batch(torch.from_numpy(np.stack([grey, grey])), [0.05, 0.05], [4, 5]).numpy()
    assert np.array_equal(pair[1], add_noise(grey, 0.05, 5)) and not np.array_equal(pair[0], pair[1])


def test_pick_examples_by_hand():
    run_ = CheckpointEval(label="x", checkpoint="", mode="none", fusion="", config=None, threshold=0.5, clip=None,
                          keys=list("abcdef"), paths=[""] * 6, labels=np.array([0, 0, 0, 1, 1, 1]),
                          generators=[""] * 6, scores=np.array([0.1, 0.7, 0.3, 0.9, 0.2, 0.6]), perturbed={},
                          metrics={})  # fmt: skip
    picks = pick_examples(run_, 2)
    # wrong at 0.5: real b (0.7, 0.2 past the threshold) and fake e (0.2, 0.3 past it) -> e first
    assert picks == {"most confident fakes": [3, 5], "most confident reals": [0, 2], "worst errors": [4, 1]}


def test_cli_eval(tiny_shards, checkpoints, tmp_path):
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoints["none"]), "--shards", str(tiny_shards),
                                   "--out", str(tmp_path / "o"), "--perturb", "blur:1.5", "--device", "cpu",
                                   "--heatmaps", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "none: AUC" in res.output and "report.html" in res.output
    # 2 reals and 2 fakes: the interval is marked, and the mark explained
    assert re.search(r"none: AUC \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]†, AP", res.output)
    assert "†: fewer than 10 reals or fakes" in res.output
    assert (tmp_path / "o" / "metrics.json").exists()
    bad = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoints["none"]), "--shards", str(tiny_shards),
                                   "--out", str(tmp_path / "p"), "--perturb", "sharpen:2"])  # fmt: skip
    assert bad.exit_code == 1 and "Error: --perturb 'sharpen:2'" in bad.output


def test_without_heatmaps_the_report_still_tells_whether_any_image_is_misclassified(tiny_shards, checkpoints, tmp_path):
    res = run(EvalConfig(checkpoints=[str(checkpoints["none"])], shards=str(tiny_shards), out=str(tmp_path),
                         device="cpu", bootstrap=20, n_heatmaps=0))  # fmt: skip
    r = res.runs[0]
    wrong = int(np.sum((r.scores >= r.threshold).astype(int) != r.labels))
    assert wrong > 0  # this checkpoint errs on the tiny test split: the claim below would be false
    md = res.report_md.read_text()
    assert "No image is on the wrong side" not in md
    assert "No heatmaps were drawn (`--heatmaps 0`)." in md and "**most confident fakes**" not in md
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoints["none"]), "--shards", str(tiny_shards),
                                   "--out", str(tmp_path / "x"), "--heatmaps", "-1"])  # fmt: skip
    assert res.exit_code == 2 and "--heatmaps" in res.output


def test_val_and_train_splits_are_flagged_as_optimistic(tiny_shards, checkpoints, tmp_path, caplog):
    """Training chose the threshold and best epoch on val: an eval of val (or train) says its figures flatter."""
    for split, words in (("val", "chose the decision threshold"), ("train", "every figure is optimistic")):
        caplog.clear()
        res = run(EvalConfig(checkpoints=[str(checkpoints["none"])], shards=str(tiny_shards), split=split,
                             out=str(tmp_path / split), device="cpu", bootstrap=20, n_heatmaps=0))  # fmt: skip
        assert "**Note:** " in res.report_md.read_text() and words in res.report_md.read_text()
        assert any(f"split {split}: " in r.getMessage() and words in r.getMessage() for r in caplog.records)
    caplog.clear()
    md = run(EvalConfig(checkpoints=[str(checkpoints["none"])], shards=str(tiny_shards), out=str(tmp_path / "test"),
                        device="cpu", bootstrap=20, n_heatmaps=0)).report_md.read_text()  # fmt: skip
    # the test split gets no split note (a note on the scores themselves may still stand: see the test below)
    assert "chose the decision threshold" not in md and "every figure is optimistic" not in md
    assert not any("split test" in r.getMessage() for r in caplog.records)


def test_a_failed_eval_leaves_an_earlier_eval_in_its_out_whole(evaluated, tiny_shards, checkpoints, tmp_path):
    out = tmp_path / "ev"
    shutil.copytree(evaluated.out, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path("metrics.json") in before and any(p.parts[0] == "plots" for p in before)
    with pytest.raises(DataError, match="bigan"):  # a slip found only once the split is planned
        run(EvalConfig(checkpoints=[str(checkpoints["none"])], shards=str(tiny_shards), out=str(out),
                       overrides=["DATA.GENERATORS=bigan"], device="cpu"))  # fmt: skip
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_another_stages_output_is_never_an_eval_out(tiny_shards, train_store, checkpoints, tmp_path):
    """An eval into a run dir replaced its config.yaml, and `train --resume` then refused the run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_manifest(run_dir, StageManifest(stage="train", schema_version=1, config_digest="x", inputs={},
                                          semspai_version="0", config={}))  # fmt: skip
    (run_dir / "config.yaml").write_text("mine\n")
    for out, what in ((run_dir, r"the output of `semspai train`.*\(e.g. .*run/eval\)"), (train_store, "a feature store"),
                      (tiny_shards, r"the output of `semspai shard`")):  # fmt: skip
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(FileExistsError, match=rf"--out .* is {what}"):
            run(EvalConfig(checkpoints=[str(checkpoints["none"])], shards=str(tiny_shards), out=str(out), device="cpu"))
        assert sorted(p.name for p in out.iterdir()) == before
    assert (run_dir / "config.yaml").read_text() == "mine\n"


def test_figures_that_say_nothing_beyond_the_class_shares_are_marked(evaluated, tiny_shards, checkpoints, tmp_path):
    """A threshold that calls every image one class (training picks 1.0 on a val split it did not separate),
    or one score for every image: the numbers are right, and the report and the summary say what they mean."""
    r = dataclasses.replace(evaluated.runs[0])
    r.threshold = float(np.median(r.scores))
    assert r.degenerate() == "" and 0 < (r.scores >= r.threshold).sum() < r.scores.size
    same = dataclasses.replace(r, scores=np.full(r.scores.size, 0.6))
    assert same.degenerate().startswith("every image got the same score (0.600): the checkpoint separates nothing")
    assert "every image is called fake" in dataclasses.replace(r, threshold=0.0).degenerate()
    state = load_checkpoint(checkpoints["none"])
    save_checkpoint(tmp_path / "all-real.pt", state | {"threshold": 1.0})
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "all-real.pt"), "--shards", str(tiny_shards),
                                   "--out", str(tmp_path / "o"), "--device", "cpu", "--heatmaps", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    note = (
        "at its threshold 1.000 every image is called real: accuracy at the threshold is the share of reals "
        "(training takes 1 when no threshold separated its val split)"
    )
    assert f"  note: {note}" in res.output
    assert f"**Note:** none: {note}" in (tmp_path / "o" / "report.md").read_text()
