"""The detector model: shapes over the model registry, any resolution, chunking, fusion modes, gradients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from semspai.pipeline.config import ModelConfig
from semspai.pipeline.detector import (
    DetectorBatch,
    SemSpaiDetector,
    create_detector,
    distinct_rows,
    pack_images,
    trainable_parameters,
    trainable_state_dict,
)
from semspai.pipeline.grid import crop_patches
from semspai.pipeline.losses import DetectionLoss
from semspai.pipeline.spectral import (
    EncoderConfigError,
    FrequencyFilter,
    list_encoders,
    load_encoder_config,
    srs_statistics,
)

CLIP_DIM = 16
MICRO = "spectral-vit-micro"


def model_cfg(
    mode: str = "none", fusion: str = "film", encoder: str = MICRO, chunk: int = 64, weights: str = ""
) -> ModelConfig:
    cfg = ModelConfig(USE_SEMANTIC_CONTEXT=mode != "none", DROPOUT=0.0, HIDDEN_DIM=64)
    cfg.SEMANTIC.MODE, cfg.SEMANTIC.FUSION, cfg.SEMANTIC.PROJ_DIM = mode, fusion, 32
    cfg.SPECTRAL.ENCODER, cfg.SPECTRAL.CHUNK_SIZE, cfg.SPECTRAL.ENCODER_WEIGHTS = encoder, chunk, weights
    return cfg


def build(cfg: ModelConfig, seed: int = 0, clip_dim: int = CLIP_DIM) -> SemSpaiDetector:
    torch.manual_seed(seed)
    return create_detector(cfg, clip_dim)


def unit(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def random_batch(counts: list[int], seed: int = 0) -> DetectorBatch:
    gen = torch.Generator().manual_seed(seed)
    n = sum(counts)
    return DetectorBatch(
        patches=torch.rand(n, 3, 224, 224, generator=gen),
        counts=torch.tensor(counts),
        global_vec=unit((len(counts), CLIP_DIM), gen).half(),  # as stored: float16
        local_vec=unit((n, CLIP_DIM), gen).half(),
    )


def write_frozen_weights(encoder: str, out: Path) -> str:
    """The random-init weights of a frozen encoder's architecture, as a local file (no download)."""
    enc = load_encoder_config(encoder)
    torch.manual_seed(123)
    backbone = timm.create_model(enc.timm_model, pretrained=False, num_classes=0, **enc.timm_kwargs)
    path = out / f"{Path(encoder).stem}.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return str(path)


@pytest.mark.parametrize(
    "encoder",
    [pytest.param(e, marks=pytest.mark.slow) if load_encoder_config(e).frozen else e for e in list_encoders()],
)
def test_registry_shapes_no_nan_deterministic(encoder: str, tmp_path: Path) -> None:
    weights = write_frozen_weights(encoder, tmp_path) if load_encoder_config(encoder).frozen else ""
    cfg = model_cfg("global_local", "gate", encoder=encoder, weights=weights)
    batch = random_batch([1, 2])
    outs = []
    for _ in range(2):
        model = build(cfg).eval()
        with torch.no_grad():
            outs.append(model(batch, return_maps=True))
    out = outs[0]
    assert out.logits.shape == (2,) and out.embedding.shape == (2, 64)
    assert [a.shape for a in out.attention] == [(1,), (2,)] and [g.shape for g in out.gates] == [(1,), (2,)]
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.embedding).all()
    torch.testing.assert_close(outs[1].logits, out.logits, rtol=0, atol=0)


def test_any_resolution_in_one_batch_seeded() -> None:
    rng = np.random.default_rng(0)
    sizes = [(80, 100), (224, 224), (375, 500), (1080, 1920)]  # (H, W) of 100x80, 224x224, 500x375, 1920x1080
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    patches, counts, boxes = pack_images(images)
    assert counts.tolist() == [5, 5, 5, 4 * 8] and patches.shape == (47, 3, 224, 224)
    assert [len(b) for b in boxes] == counts.tolist()
    gen = torch.Generator().manual_seed(1)
    batch = DetectorBatch(patches, counts, unit((4, CLIP_DIM), gen), unit((47, CLIP_DIM), gen))
    cfg = model_cfg("global_local", "film", chunk=16)
    with torch.no_grad():
        a, b = (build(cfg).eval()(batch, return_maps=True) for _ in range(2))
    assert a.logits.shape == (4,) and torch.isfinite(a.logits).all() and torch.isfinite(a.embedding).all()
    assert [len(w) for w in a.attention] == [5, 5, 5, 32]
    torch.testing.assert_close(torch.stack([w.sum() for w in a.attention]), torch.ones(4))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_pack_images_matches_grid() -> None:
    image = np.random.default_rng(2).integers(0, 256, (500, 700, 3), dtype=np.uint8)
    patches, counts, boxes = pack_images([image])
    crops, grid = crop_patches(image)
    np.testing.assert_array_equal(boxes[0], grid)
    assert patches.dtype == torch.float32 and counts.tolist() == [len(grid)]
    torch.testing.assert_close(patches, torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255)


def test_pooling_invariant_to_patch_order() -> None:
    batch = random_batch([3, 6])
    perm = torch.tensor([2, 0, 1, 8, 3, 6, 4, 7, 5])  # shuffles within each image
    shuffled = DetectorBatch(batch.patches[perm], batch.counts, batch.global_vec, batch.local_vec[perm])
    model = build(model_cfg("global_local", "cross_attn")).eval()
    with torch.no_grad():
        a, b = model(batch, return_maps=True), model(shuffled, return_maps=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(a.attention)[perm], torch.cat(b.attention), rtol=0, atol=1e-6)


def test_sample_output_independent_of_batch() -> None:
    batch = random_batch([2, 3, 1])
    model = build(model_cfg("global_local", "gate")).eval()
    alone = DetectorBatch(batch.patches[2:5], batch.counts[1:2], batch.global_vec[1:2], batch.local_vec[2:5])
    with torch.no_grad():
        together, single = model(batch), model(alone)
    torch.testing.assert_close(together.logits[1:2], single.logits, rtol=0, atol=1e-5)


def test_chunked_equals_unchunked_and_bounds_encoder_batch() -> None:
    batch = random_batch([7, 5])
    model = build(model_cfg("global", "concat", chunk=1000)).eval()
    seen: list[int] = []
    model.spectral.encoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        whole = model(batch).logits
        assert max(seen) == 12
        seen.clear()
        model.chunk_size = 3
        chunked = model(batch).logits
    assert max(seen) == 3 and len(seen) == 3 * 4  # three views per chunk, four chunks
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    # training a trainable encoder: one pass over all patches (autograd would keep every chunk anyway)
    seen.clear()
    model.train()(batch).logits.sum().backward()
    assert seen == [12, 12, 12]


def test_distinct_rows_finds_repeats_at_any_position_and_survives_fingerprint_collisions(monkeypatch) -> None:
    from semspai.pipeline import detector

    gen = torch.Generator().manual_seed(3)
    for n in range(2, 40):  # BLAS sums a row in an order that depends on its position: a float sum would miss some
        row = torch.randint(0, 256, (1, 3, 224, 224), generator=gen).float() / 255
        first, inverse = distinct_rows(row.expand(n, -1, -1, -1).contiguous())
        assert first.tolist() == [0] and inverse.tolist() == [0] * n
    rows = torch.randint(0, 256, (6, 3, 8, 8), generator=gen).float() / 255
    x = rows[[0, 1, 0, 2, 1, 3, 4, 3, 5]]
    first, inverse = distinct_rows(x)
    assert first.tolist() == [0, 1, 3, 5, 6, 8] and inverse.tolist() == [0, 1, 0, 2, 1, 3, 4, 3, 5]
    assert torch.equal(x[first][inverse], x)
    # every row one fingerprint: the full comparison with the group's first row keeps distinct rows apart (the
    # repeats of other rows are missed, which costs time, never a wrong vector)
    monkeypatch.setattr(detector, "fingerprints", lambda r: torch.zeros(len(r), dtype=torch.float64))
    first, inverse = distinct_rows(x)
    assert first.tolist() == [0, 1, 3, 4, 5, 6, 7, 8] and torch.equal(x[first][inverse], x)
    monkeypatch.undo()
    assert distinct_rows(rows) is None and distinct_rows(rows[:1]) is None


def test_eval_encodes_each_distinct_patch_once_and_gives_the_same_logits(monkeypatch) -> None:
    from semspai.pipeline import detector

    rng = np.random.default_rng(4)
    sizes = [(224, 224), (224, 300), (120, 90), (300, 300)]  # five equal crops, three distinct, one, five
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    patches, counts, _ = pack_images(images)
    gen = torch.Generator().manual_seed(1)
    batch = DetectorBatch(patches, counts, unit((4, CLIP_DIM), gen), unit((len(patches), CLIP_DIM), gen))
    model = build(model_cfg("global_local", "gate", chunk=4)).eval()
    seen: list[int] = []
    model.spectral.encoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        once = model(batch, return_maps=True)
        assert sum(seen) == 3 * (1 + 3 + 1 + 5) and max(seen) <= 4  # three views; chunks still bound the batch
        seen.clear()
        monkeypatch.setattr(detector, "distinct_rows", lambda x: None)
        every = model(batch, return_maps=True)
        assert sum(seen) == 3 * 20
    torch.testing.assert_close(once.logits, every.logits, rtol=0, atol=1e-5)
    for a, b in zip(once.attention + once.gates, every.attention + every.gates, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    monkeypatch.undo()
    seen.clear()
    with torch.no_grad():
        model.train()(batch)  # dropout draws apart what is equal: training encodes every patch
    assert sum(seen) == 3 * 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_distinct_rows_and_eval_encoding_once_on_cuda() -> None:
    gen = torch.Generator().manual_seed(6)
    rows = torch.randint(0, 256, (5, 3, 224, 224), generator=gen).float() / 255
    x = rows[[0, 1, 0, 2, 1, 3, 4, 3, 0]]
    cpu, cuda = distinct_rows(x), distinct_rows(x.cuda())
    assert cpu[0].tolist() == cuda[0].tolist() == [0, 1, 3, 5, 6] and cpu[1].tolist() == cuda[1].tolist()
    model = build(model_cfg("global_local", "gate", chunk=4)).eval().cuda()
    gen = torch.Generator().manual_seed(1)
    batch = DetectorBatch(
        x.cuda(), torch.tensor([5, 4]), unit((2, CLIP_DIM), gen).cuda(), unit((9, CLIP_DIM), gen).cuda()
    )
    # no TF32 convolutions (cuDNN's default), whose rounding would dwarf what is compared here
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        once = model(batch).logits
        every = model._encode_chunks(batch.patches)  # every patch, as before the repeats were found
        feats, gates, cond = model.fusion(every, batch.counts, batch.global_vec, batch.local_vec)
        direct = model.head(model.pool(feats, batch.counts, cond)[0]).squeeze(-1).float()
    torch.testing.assert_close(once, direct, rtol=0, atol=1e-5)


def test_views_as_one_encoder_batch_equal_three_calls() -> None:
    model = build(model_cfg("none")).eval()
    seen: list[int] = []
    model.spectral.encoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    patches = random_batch([3, 2]).patches
    with torch.no_grad():
        apart, joint = model.spectral(patches), model.spectral(patches, joint=True)
    assert seen == [5, 5, 5, 15]
    torch.testing.assert_close(joint, apart, rtol=0, atol=1e-5)


def test_srs_statistics_per_layer_and_pair_order() -> None:
    gen = torch.Generator().manual_seed(5)
    feats = [torch.randn(3, 4, 9, 8, generator=gen) for _ in range(2)]  # K=2 layers, (views, N, L, C)
    expected = []
    for f in feats:
        for a, b in ((0, 1), (0, 2), (1, 2)):
            sim = F.cosine_similarity(f[a], f[b], dim=-1)  # (N, L)
            expected += [sim.mean(dim=1), sim.std(dim=1, unbiased=False)]
    torch.testing.assert_close(srs_statistics(feats), torch.stack(expected, dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fusion", ["film", "concat", "gate", "cross_attn"])
def test_training_step_never_reads_device_values_on_the_host(fusion: str) -> None:
    """Forward and backward on the meta device, which holds no values: any read of a size or value computed
    on the device (.item(), a boolean mask, unique, repeat_interleave without a size) raises there. On a GPU,
    each such read would stall the host until the device caught up, every step."""
    meta = torch.device("meta")
    model = create_detector(model_cfg("global_local", fusion), CLIP_DIM, device=meta).train()
    loss = DetectionLoss(64, CLIP_DIM, semantic_weight=0.5, temperature=0.07).to(meta)
    batch = DetectorBatch(
        torch.empty(7, 3, 224, 224, device=meta),
        torch.tensor([3, 4]),  # on the host, as the trainer keeps it
        torch.empty(2, CLIP_DIM, device=meta),
        torch.empty(7, CLIP_DIM, device=meta),
    )
    out = model(batch)
    text = F.normalize(torch.randn(2, CLIP_DIM), dim=-1)  # host-side targets, as the trainer keeps them
    loss(out.logits, out.embedding, torch.empty(2, device=meta), text).total.backward()
    assert out.logits.shape == (2,) and model.head.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_never_synchronises() -> None:
    """The meta-device test above on a real GPU, with what only runs there (bf16 autocast, the fused
    optimiser, gradient clipping): CUDA's sync debug mode raises at any host-device synchronisation."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model = create_detector(model_cfg("global_local", "cross_attn"), CLIP_DIM, device=cuda).train()
    loss = DetectionLoss(64, CLIP_DIM, semantic_weight=0.5, temperature=0.07).to(cuda)
    params = list(model.parameters()) + list(loss.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    host = random_batch([3, 4])
    batch = DetectorBatch(host.patches.to(cuda), host.counts, host.global_vec.to(cuda), host.local_vec.to(cuda))
    labels, text = torch.tensor([0.0, 1.0], device=cuda), F.normalize(torch.randn(2, CLIP_DIM), dim=-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # the second step: the optimiser's state exists
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(batch)
                total = loss(out.logits, out.embedding, labels, text).total
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(total).item()


def test_fft_filter_float32_under_bf16_autocast() -> None:
    filt = FrequencyFilter(radius=16)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, high = filt(x.bfloat16())
        out = build(model_cfg("global", "film"))(random_batch([2, 1]))
    assert low.dtype == high.dtype == torch.float32 and torch.isfinite(out.logits).all()
    # reference: centred spectrum, circle of radius 16 around the DC bin (SPAI's construction)
    spec = np.fft.fftshift(np.fft.fft2(x.bfloat16().float().numpy()), axes=(-2, -1))
    yy, xx = np.mgrid[:224, :224] - 112
    ref = np.fft.ifft2(np.fft.ifftshift(spec * ((yy**2 + xx**2) <= 16**2), axes=(-2, -1))).real
    np.testing.assert_allclose(low.numpy(), ref, atol=1e-4)
    torch.testing.assert_close(low + high, x.bfloat16().float())


def test_only_detector_parameters_get_gradients() -> None:
    model = build(model_cfg("global_local", "gate"))
    batch = random_batch([2, 3])
    assert not batch.global_vec.requires_grad and not batch.local_vec.requires_grad
    F.binary_cross_entropy_with_logits(model(batch).logits, torch.tensor([0.0, 1.0])).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n in names} == {"spectral", "fusion", "pool", "head"}
    assert all(p.grad is not None for p in trainable_parameters(model))
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("spectral.encoder"))
    assert batch.global_vec.grad is None and not batch.global_vec.requires_grad and batch.local_vec.grad is None
    assert not any(type(m).__module__.startswith("open_clip") for m in model.modules())


def test_mode_none_ignores_semantic_vectors() -> None:
    model = build(model_cfg("none")).eval()
    batch = random_batch([2, 2])
    bare = DetectorBatch(batch.patches, batch.counts)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, model(bare).logits, rtol=0, atol=0)
    assert model.semantic_mode == "none" and model.fusion is None
    assert create_detector(model_cfg("none"), clip_dim=0).semantic_mode == "none"


def test_frozen_pretrained_timm_vit(tmp_path: Path) -> None:
    spec = {
        "timm_model": "vit_tiny_patch16_224",
        "timm_kwargs": {"patch_size": 32, "embed_dim": 48, "depth": 3, "num_heads": 3},
        "feature_indices": [0, 1, 2],
        "frozen": True,
        "srs_dim": 16,
        "context_dim": 16,
    }
    encoder = tmp_path / "tiny-frozen.json"
    encoder.write_text(json.dumps(spec))
    with pytest.raises(EncoderConfigError, match="ENCODER_WEIGHTS"):
        build(model_cfg(encoder=str(encoder)))
    weights = write_frozen_weights(str(encoder), tmp_path)
    model = build(model_cfg("global", "film", encoder=str(encoder), weights=weights)).train()
    backbone = model.spectral.encoder.backbone
    stored = load_file(weights)
    assert all(torch.equal(stored[k], v) for k, v in backbone.state_dict().items())
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    params = {id(p) for p in trainable_parameters(model)}
    assert params and not params & {id(p) for p in backbone.parameters()}
    model(random_batch([2])).logits.sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert not any(k.startswith("spectral.encoder.backbone") for k in trainable_state_dict(model))


def test_a_frozen_encoder_may_use_batchnorm_with_its_pretrained_statistics(tmp_path: Path) -> None:
    spec = {
        "timm_model": "efficientnet_lite0",
        "feature_indices": [0, 1],
        "frozen": True,
        "srs_dim": 8,
        "context_dim": 8,
    }
    encoder = tmp_path / "frozen-bn.json"
    encoder.write_text(json.dumps(spec))
    weights = write_frozen_weights(str(encoder), tmp_path)
    model = build(model_cfg("none", encoder=str(encoder), weights=weights)).train()
    backbone = model.spectral.encoder.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert any(k.endswith("running_mean") for k in before)
    patches = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    alone = model.spectral.encoder(patches[:1])  # in a training step: not batch statistics, the pretrained ones
    together = model.spectral.encoder(patches)
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a, b[:1], rtol=1e-5, atol=1e-6)
    model(random_batch([2, 1])).logits.sum().backward()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # statistics unchanged
    spec["frozen"] = False  # trained from scratch, its batch statistics would make a score depend on its batch
    encoder.write_text(json.dumps(spec))
    with pytest.raises(EncoderConfigError, match=r"uses BatchNorm .* or a frozen pretrained one"):
        build(model_cfg(encoder=str(encoder)))


def test_trainable_state_dict_round_trip(tmp_path: Path) -> None:
    cfg = model_cfg("global_local", "film")
    a, b = build(cfg, seed=0).eval(), build(cfg, seed=5).eval()
    b.load_state_dict(trainable_state_dict(a))
    batch = random_batch([2, 1])
    with torch.no_grad():
        torch.testing.assert_close(a(batch).logits, b(batch).logits, rtol=0, atol=0)


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(EncoderConfigError, match="no model JSON 'nope'"):
        build(model_cfg(encoder="nope"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"timm_model": "vit_tiny_patch16_224", "depht": 3}))
    with pytest.raises(EncoderConfigError, match="unknown key 'depht'"):
        build(model_cfg(encoder=str(bad)))
    bn = tmp_path / "bn.json"
    bn.write_text(json.dumps({"timm_model": "resnet10t", "feature_indices": [0, 1]}))
    with pytest.raises(EncoderConfigError, match="BatchNorm"):
        build(model_cfg(encoder=str(bn)))
    with pytest.raises(ValueError, match="clip_dim"):
        create_detector(model_cfg("global"), clip_dim=0)
    with pytest.raises(ValueError, match="local_vec"):
        batch = random_batch([1])
        build(model_cfg("global_local"))(DetectorBatch(batch.patches, batch.counts, batch.global_vec))


# --- synthetic tasks that only the right semantic mode can solve -------------------------------------------


POOL = torch.rand(6, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # pixels shared by all images
TASK_DIM = 64  # wide enough that random vectors barely project on the label direction, as with real CLIP widths


def synthetic_task(kind: str, n_images: int, seed: int) -> tuple[torch.Tensor, DetectorBatch, torch.Tensor]:
    """Pixels carry no label. `global`: the label shifts the global vector. `local`: in fake images one patch's
    local vector is shifted, and all patches of an image have the same pixels. Returns pool indices (n, P),
    a batch without pixels, labels (n,)."""
    direction = unit((TASK_DIM,), torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    per_image = 2 if kind == "global" else 3
    labels = (torch.randperm(n_images, generator=gen) % 2).float()  # balanced: chance is exactly 0.5
    pick = torch.randint(0, len(POOL), (n_images, per_image), generator=gen)
    global_vec = torch.randn(n_images, TASK_DIM, generator=gen)
    local_vec = torch.randn(n_images, per_image, TASK_DIM, generator=gen)
    if kind == "global":
        global_vec += 0.5 * TASK_DIM**0.5 * (2 * labels[:, None] - 1) * direction  # cosine ~ +-0.45
    else:
        pick[:] = pick[:, :1]  # the marked patch is indistinguishable from its neighbours by its pixels
        marked = torch.randint(0, per_image, (n_images,), generator=gen)
        local_vec[torch.arange(n_images), marked] += TASK_DIM**0.5 * labels[:, None] * direction  # cosine ~0.7
    batch = DetectorBatch(
        patches=torch.empty(0),
        counts=torch.full((n_images,), per_image),
        global_vec=F.normalize(global_vec, dim=-1).half(),
        local_vec=F.normalize(local_vec, dim=-1).half(),  # (n, P, D) until `select` packs it
    )
    return pick, batch, labels


def select(pick: torch.Tensor, batch: DetectorBatch, idx: torch.Tensor) -> DetectorBatch:
    """The images `idx`, with their pixels gathered from the pool (only this batch is materialised)."""
    return DetectorBatch(POOL[pick[idx].flatten()], batch.counts[idx], batch.global_vec[idx],
                         batch.local_vec[idx].flatten(0, 1))  # fmt: skip


def held_out_accuracy(mode: str, kind: str, steps: int, lr: float = 1e-2) -> float:
    model = build(model_cfg(mode, "film"), clip_dim=TASK_DIM)
    # the pixels carry no label, so the spectral encoder's training adds nothing here but a third of the time
    model.spectral.encoder.requires_grad_(False)
    train_pick, train, train_y = synthetic_task(kind, 512, seed=1)
    test_pick, test, test_y = synthetic_task(kind, 96, seed=2)
    opt = torch.optim.Adam(trainable_parameters(model), lr=lr)
    order = torch.Generator().manual_seed(3)
    for _ in range(steps):
        idx = torch.randperm(len(train_y), generator=order)[:16]  # fresh images at nearly every step
        loss = F.binary_cross_entropy_with_logits(model(select(train_pick, train, idx)).logits, train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(select(test_pick, test, idx)).logits for idx in torch.arange(96).split(32)])
    return ((logits > 0).float() == test_y).float().mean().item()


@pytest.fixture
def one_thread():
    # a training step here is hundreds of tiny ops: on 2 busy cores, thread hand-offs cost more than they save
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_global_vector_task_needs_global_mode(one_thread: None) -> None:
    assert held_out_accuracy("global", "global", steps=24) >= 0.9
    assert held_out_accuracy("none", "global", steps=24) <= 0.65


def test_local_vector_task_needs_global_local_mode(one_thread: None) -> None:
    assert held_out_accuracy("global_local", "local", steps=40) >= 0.9
    assert held_out_accuracy("global", "local", steps=40) <= 0.65
