"""Training data: the store join stays true under augmentation, splits, generator filter, missing rows, ranks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from semspai.pipeline import data
from semspai.pipeline.augment import AugDraws
from semspai.pipeline.clip import load_embedder
from semspai.pipeline.config import AugConfig
from semspai.pipeline.data import (
    DataError,
    ShardStream,
    StoreJoin,
    View,
    collate,
    loader_samples,
    plan_split,
)
from semspai.pipeline.grid import pad_image
from semspai.store.features import FeatureStore
from semspai.store.images import decode_image
from semspai.store.shards import ShardWriter, iter_shard, resolve_shards

HEAVY_AUG = AugConfig(FLIP_PROB=1.0, JPEG_PROB=1.0, BLUR_PROB=1.0, NOISE_PROB=1.0, NOISE_STD=[0.02, 0.05])


TRAIN_VIEW = View(2, HEAVY_AUG)


def _stream(shards: Path, store: Path, split: str = "train", view: View = TRAIN_VIEW, **kw) -> ShardStream:
    join = StoreJoin(FeatureStore.open(str(store)), need_global=True, need_local=True, need_text=True)
    plan = plan_split(resolve_shards(shards), split, [], join, skip_missing=False)
    return ShardStream(plan, join, view, seed=0, **kw)


def _originals(shards: Path) -> dict[str, np.ndarray]:
    return {s.key: decode_image(s.image) for p in resolve_shards(shards) for s in iter_shard(p)}


def test_local_vectors_are_clip_of_the_original_pixels_of_each_patch(tiny_shards, train_store):
    batch = collate(list(_stream(tiny_shards, train_store)))
    assert batch.local_vec is not None and len(batch.local_vec) == len(batch.patches) == int(batch.counts.sum())
    originals = _originals(tiny_shards)
    image_of_patch = np.repeat(batch.keys, batch.counts.numpy())
    crops = []
    for key, (x0, y0, x1, y1) in zip(image_of_patch, batch.boxes.tolist(), strict=True):
        crops.append(pad_image(originals[key])[y0:y1, x0:x1])
    crops = np.stack(crops)  # (N, 224, 224, 3) uint8, unaugmented
    embedder = load_embedder("tiny-random")
    recomputed = embedder.get_image_embedding(embedder.preprocess_patches(crops))  # (N, D)
    # float16 storage of unit vectors: agreement to ~1e-3
    torch.testing.assert_close(batch.local_vec, recomputed, atol=3e-3, rtol=0)
    # the patches themselves were augmented (flip + blur + JPEG + noise), so the test is not vacuous
    seen = batch.patches.numpy()  # (N, 224, 224, 3) uint8, as the loader ships them
    assert np.abs(seen.astype(int) - crops.astype(int)).mean() > 5
    # and the vectors tell cells apart: a vector paired with another image's patch would not match
    assert (batch.local_vec @ recomputed.roll(1, dims=0).T).diagonal().min() < 0.999


def test_global_and_text_vectors_follow_the_key(tiny_shards, train_store):
    store = FeatureStore.open(str(train_store))
    batch = collate(list(_stream(tiny_shards, train_store)))
    for j, key in enumerate(batch.keys):
        i = store.index_of(key)
        assert torch.equal(batch.global_vec[j], torch.from_numpy(store.global_vectors()[i]).float())
        # tiny shards carry captions: the target is the caption vector, not a prompt
        assert torch.equal(batch.text_vec[j], torch.from_numpy(store.caption_vector(i)).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_collate_equals_the_pageable_one(tiny_shards, train_store):
    samples = list(_stream(tiny_shards, train_store))
    plain, pinned = collate(samples), collate(samples, pin=True)
    for name in ("patches", "global_vec", "local_vec"):
        assert getattr(pinned, name).is_pinned() and torch.equal(getattr(pinned, name), getattr(plain, name)), name
    for name in ("counts", "labels", "boxes", "text_vec"):
        assert torch.equal(getattr(pinned, name), getattr(plain, name)), name
    assert pinned.keys == plain.keys


class _NoCaptionStore:
    """Just what StoreJoin reads for text targets: two prompts, three images, no captions."""

    path, embed_dim, keys = "mem", 2, ["a", "b", "c"]

    def global_vectors(self) -> np.ndarray:
        return np.asarray([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float16)

    def prompt_vectors(self) -> np.ndarray:
        return np.asarray([[0, 1], [1, 0]], dtype=np.float16)

    def caption_vector(self, i: int) -> None:
        return None


def test_text_target_without_caption_is_the_best_matching_prompt():
    join = StoreJoin(_NoCaptionStore(), need_global=False, need_local=False, need_text=True)
    np.testing.assert_array_equal(join.text, [[1, 0], [0, 1], [0, 1]])


def test_augmentation_is_a_function_of_seed_epoch_and_key(tiny_shards, train_store):
    def patches(epoch: int, world: int = 1, rank: int = 0) -> dict[str, np.ndarray]:
        s = _stream(tiny_shards, train_store, rank=rank, world=world)
        s.set_epoch(epoch)
        return {x.key: x.patches for x in s}

    a, b, other = patches(1), patches(1), patches(2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], other[k]) for k in a)
    split = patches(1, world=2, rank=1)  # another deal of samples to ranks draws the same per sample
    assert split and all(np.array_equal(a[k], v) for k, v in split.items())


def test_ranks_and_workers_partition_the_split(tiny_shards, train_store):
    plan_keys = set(_stream(tiny_shards, train_store).plan.labels)
    seen = []
    for rank in range(3):
        stream = _stream(tiny_shards, train_store, rank=rank, world=3)
        keys = [s.key for s in loader_samples(stream, workers=2)]  # shipped in chunks of SAMPLES_PER_TRANSFER
        assert len(keys) == len(stream) == stream.rank_sizes()[rank]
        seen += keys
    assert sorted(seen) == sorted(plan_keys) and len(seen) == len(set(seen))


def test_loader_processes_ship_the_samples_made_in_process(tiny_shards, train_store, monkeypatch):
    monkeypatch.setattr(data, "SAMPLES_PER_TRANSFER", 3)  # several chunks, some short, from both processes
    stream = _stream(tiny_shards, train_store)
    stream.set_epoch(3)
    here = {s.key: s for s in loader_samples(stream, workers=0)}
    there = list(loader_samples(stream, workers=2))
    assert len(there) == len(here) > 3
    for s in there:
        ref = here[s.key]
        assert s.patches.dtype == np.uint8 and np.array_equal(s.patches, ref.patches)
        assert np.array_equal(s.boxes, ref.boxes) and np.array_equal(s.local_vec, ref.local_vec)
        assert s.label == ref.label and np.array_equal(s.global_vec, ref.global_vec)


def test_validation_view_uses_every_grid_cell_unaugmented(tiny_shards, train_store):
    originals = _originals(tiny_shards)
    for s in _stream(tiny_shards, train_store, split="val", view=View()):
        rgb = pad_image(originals[s.key])
        expected = np.stack([rgb[y0:y1, x0:x1] for x0, y0, x1, y1 in s.boxes])
        assert np.array_equal(s.patches, expected)


def test_generator_filter_keeps_reals_and_named_fakes(tiny_shards, train_store):
    paths = resolve_shards(tiny_shards)
    meta = {s.key: s.meta for p in paths for s in iter_shard(p)}
    plan = plan_split(paths, "train", ["gan_a"], None, skip_missing=False)
    kept = {meta[k]["generator"] for k in plan.labels}
    assert kept == {"camera", "gan_a"}
    everything = plan_split(paths, "train", [], None, skip_missing=False)
    assert {meta[k]["generator"] for k in everything.labels} == {"camera", "gan_a", "gan_b"}


def test_empty_or_one_class_split_is_an_error_naming_it(tiny_shards, tmp_path):
    train_only = [p for p in resolve_shards(tiny_shards) if p.name.startswith("train")]
    with pytest.raises(DataError, match="split 'val' is empty"):
        plan_split(train_only, "val", [], None, skip_missing=False)
    with pytest.raises(DataError, match="DATA.GENERATORS: no fake image of the given shards comes from 'no-such-gen'"):
        plan_split(train_only, "train", ["gan_a", "no-such-gen"], None, skip_missing=False)
    reals = ShardWriter(tmp_path / "train-000000.tar")
    for s in iter_shard(train_only[0]):
        if s.label == 0:
            reals.write(s.key, bytes(s.image), s.ext, s.meta)
    reals.close()
    with pytest.raises(DataError, match="'train' holds only real"):
        plan_split([tmp_path / "train-000000.tar"], "train", [], None, skip_missing=False)


def test_the_same_sample_in_two_shards_is_an_error_naming_both(tiny_shards, tmp_path):
    """A SPEC naming one set of images twice (sharded twice, e.g. once with --prefix) would count them twice."""
    first = resolve_shards(tiny_shards)[0]
    copy = tmp_path / f"again-{first.name}"
    shutil.copy(first, copy)
    with pytest.raises(DataError, match=rf"{copy}: sample \S+ is also in {first}: .*twice"):
        plan_split([first, copy], "train", [], None, skip_missing=False)
    (tmp_path / "copy").mkdir()  # a copy of a tar under its own name, in another folder
    same_name = Path(shutil.copy(first, tmp_path / "copy" / first.name))
    with pytest.raises(DataError, match=rf"{same_name}: sample \S+ is also in {first}: .*twice"):
        plan_split([first, same_name], "train", [], None, skip_missing=False)
    train = resolve_shards(f"{tiny_shards}/train-*.tar")
    once = plan_split(train, "train", [], None, skip_missing=False)
    twice = plan_split([*train, train[0], tiny_shards / ".." / tiny_shards.name / train[1].name], "train", [], None,
                       skip_missing=False)  # fmt: skip
    assert twice.keys == once.keys  # one tar named twice (or by another path) counts once, under its first name


def test_sample_missing_from_store_names_shard_and_key(tiny_shards, tmp_path):
    from semspai.stages.extract import ExtractConfig, run

    # the store lacks train-000001 only
    run(
        ExtractConfig(
            shards=f"{tiny_shards}/*-000000.tar", store=str(tmp_path / "part.zarr"), clip="tiny-random", workers=0
        )
    )
    join = StoreJoin(FeatureStore.open(str(tmp_path / "part.zarr")), True, False, False)
    paths = resolve_shards(tiny_shards)
    with pytest.raises(DataError, match=r"shard train-000001: sample [0-9a-f]+ is not in feature store .*\(4 train"):
        plan_split(paths, "train", [], join, skip_missing=False)
    plan = plan_split(paths, "train", [], join, skip_missing=True)
    assert plan.n_missing == 4 and len(plan) == 4
    assert [p.name for p in plan.keys] == ["train-000000.tar"]


def _augment(patch: np.ndarray, aug: AugConfig, rng: np.random.Generator) -> np.ndarray:
    return AugDraws.draw(1, aug, rng).apply(torch.from_numpy(patch)[None])[0].numpy()


def test_whether_a_transform_fires_never_moves_the_draws_after_it() -> None:
    """A patch's augmentation draws the same numbers whichever transforms fire, so what later patches become
    does not depend on it (noise pixels come from a generator of their own)."""
    patch = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    after = []
    for probs in (0.0, 1.0):
        aug = AugConfig(FLIP_PROB=probs, JPEG_PROB=probs, BLUR_PROB=probs, NOISE_PROB=probs, NOISE_STD=[0.02, 0.05])
        rng = np.random.default_rng(7)
        out = _augment(patch, aug, rng)
        assert out.dtype == np.uint8 and (probs == 0.0) == np.array_equal(out, patch)
        after.append(rng.random(3).tolist())
    assert after[0] == after[1]
    flipped = _augment(patch, AugConfig(FLIP_PROB=1.0, JPEG_PROB=0.0, BLUR_PROB=0.0, NOISE_PROB=0.0),
                       np.random.default_rng(0))  # fmt: skip
    assert np.array_equal(flipped, patch[:, ::-1])  # left-right, as the cached local vector's patch mirrored
