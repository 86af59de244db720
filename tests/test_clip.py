"""Tests of the semantic encoder: --clip parsing, tiny-random, local weights files, open_clip parity, timm."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file

from semspai.pipeline import clip as clip_module
from semspai.pipeline.clip import (
    BF16_WEIGHTS,
    TINY_RANDOM,
    ClipEmbedder,
    ClipLoadError,
    ClipSpec,
    NoTextTowerError,
    load_embedder,
    parse_clip_arg,
    reachable,
    resolve_precision,
    state_dict_sha256,
)

EFFNET = Path("/work/shared/models/efficientnet_lite0.imagenet.safetensors")  # real ImageNet weights, not shipped
# The sha256 of tiny-random's state dict on torch 2.14 / open_clip 3.3; a change means other bits in every store.
TINY_RANDOM_SHA256 = "4865f351122425644fa285d8c1a716691c34d2a1083080f4584bd22521ab8481"


@pytest.fixture(scope="module")
def tiny() -> ClipEmbedder:
    return load_embedder(TINY_RANDOM)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory, tiny: ClipEmbedder) -> dict[str, Path]:
    """tiny-random's weights saved as safetensors and as a torch.save pickle."""
    d = tmp_path_factory.mktemp("weights")
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    save_file(state, d / "tiny.safetensors")
    torch.save(state, d / "tiny.pt")
    return {"safetensors": d / "tiny.safetensors", "pt": d / "tiny.pt"}


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: smooth gradients plus noise, so resizing has something to do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width * 255, yy / height * 255, 128 + 100 * np.sin((xx + yy) / 17)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ViT-B-32:openai", ("ViT-B-32", "openai")),
        ("ViT-B-32:/x/w.safetensors", ("ViT-B-32", "/x/w.safetensors")),
        ("tiny-random", ("tiny-random", "")),
        ("timm/efficientnet_lite0:/x/w.safetensors", ("timm/efficientnet_lite0", "/x/w.safetensors")),
        ("ViT-B-32:/data/run:3/w.pt", ("ViT-B-32", "/data/run:3/w.pt")),
    ],
)
def test_parse_clip_arg(text: str, expected: tuple[str, str]) -> None:
    assert parse_clip_arg(text) == expected


@pytest.mark.parametrize("text", ["", ":openai", "timm/:/x/w.safetensors"])
def test_parse_clip_arg_rejects_missing_model(text: str) -> None:
    with pytest.raises(ClipLoadError, match="no model name"):
        parse_clip_arg(text)


def test_tiny_random_spec_vectors_and_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        emb = load_embedder(TINY_RANDOM)
    assert "NO MEANING" in caplog.text
    assert "No pretrained weights loaded" not in caplog.text  # open_clip's own line: semspai's says it better
    spec = emb.spec
    assert (spec.kind, spec.model, spec.weights_id, spec.sha256) == (
        "tiny-random",
        "tiny-random",
        "seed:0",
        TINY_RANDOM_SHA256,
    )
    assert spec.meaningless and spec.has_text and not spec.quick_gelu
    assert (spec.image_size, spec.embed_dim, spec.interpolation) == (224, 64, "bicubic")
    assert spec.mean == open_clip.OPENAI_DATASET_MEAN and spec.std == open_clip.OPENAI_DATASET_STD
    assert not emb.model.training and not any(p.requires_grad for p in emb.model.parameters())

    x = torch.stack([emb.preprocess_global(_image(300, 451, seed)) for seed in range(3)])  # (3, 3, 224, 224)
    v = emb.get_image_embedding(x)
    t = emb.get_text_embedding(["a photo of a cat", "a photo of a dog"])
    assert v.shape == (3, 64) and t.shape == (2, 64) and v.dtype == t.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(v[0], v[1])  # different images, different vectors
    assert torch.equal(v, emb.get_image_embedding(x))
    assert emb.get_text_embedding([]).shape == (0, 64)


def test_tiny_random_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_embedder(TINY_RANDOM)
    assert torch.equal(torch.rand(4), expected)


def test_tiny_random_same_bits_in_another_process(tiny: ClipEmbedder) -> None:
    """Another process, another thread count and another RNG state draw the same weights and vectors."""
    image = _image(256, 320, seed=7)
    code = (
        "import sys, numpy as np, torch\n"
        "torch.set_num_threads(1); torch.manual_seed(999); torch.rand(1000)\n"
        "from semspai.pipeline.clip import load_embedder, state_dict_sha256\n"
        "e = load_embedder('tiny-random')\n"
        "img = np.frombuffer(sys.stdin.buffer.read(), np.uint8).reshape(256, 320, 3)\n"
        "v = e.get_image_embedding(e.preprocess_global(img)[None])\n"
        "print(e.spec.sha256, state_dict_sha256(e.model.state_dict()), *v[0].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=image.tobytes(), capture_output=True, check=True)
    spec_sha, state_sha, *vec = out.stdout.decode().split()
    v = tiny.get_image_embedding(tiny.preprocess_global(image)[None])[0]
    assert spec_sha == state_sha == tiny.spec.sha256 == state_dict_sha256(tiny.model.state_dict())
    # weights are equal bit for bit; the forward pass may sum in another order with another thread count
    torch.testing.assert_close(torch.tensor([float(x) for x in vec]), v, rtol=0, atol=1e-6)


def test_global_vector_equals_direct_open_clip_call(tiny: ClipEmbedder) -> None:
    """Our global path = open_clip's own eval preprocess of the decoded PIL image + encode_image, normalised."""
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_RANDOM)
    rgb = _image(333, 517, seed=1)  # not square, not a multiple of anything: resize and crop both matter
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    pil = Image.open(io.BytesIO(buf.getvalue()))
    reference_x = preprocess(pil)  # (3, 224, 224)
    with torch.no_grad():
        reference = F.normalize(tiny.model.encode_image(reference_x[None]), dim=-1)
    ours_x = tiny.preprocess_global(rgb)
    assert torch.equal(ours_x, reference_x)
    ours = tiny.get_image_embedding(ours_x[None])
    assert (ours - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", [224, 256, 160])
def test_patches_preprocess_like_the_global_path(tiny: ClipEmbedder, size: int) -> None:
    """A square 224 patch gets the same input tensor by either path, with or without a resize to S."""
    spec = dataclasses.replace(tiny.spec, image_size=size)
    transform = image_transform_v2(PreprocessCfg(size=size, mean=spec.mean, std=spec.std), is_train=False)
    emb = ClipEmbedder(tiny.model, spec, transform, tiny.device, "fp32")
    patches = np.stack([_image(224, 224, seed) for seed in range(3)])  # (3, 224, 224, 3)
    x = emb.preprocess_patches(patches)
    assert x.shape == (3, 3, size, size) and x.dtype == torch.float32
    assert torch.equal(x, torch.stack([emb.preprocess_global(p) for p in patches]))
    batch = torch.full((5, 3, size, size), float("nan"))  # into a slice of a larger batch: the same bits there
    assert emb.preprocess_patches(patches, out=batch[1:4]).data_ptr() == batch[1].data_ptr()
    assert torch.equal(batch[1:4], x) and batch[0].isnan().all() and batch[4].isnan().all()
    with pytest.raises(ValueError, match="out must be"):
        emb.preprocess_patches(patches, out=torch.empty((3, 3, size, size), dtype=torch.float64))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_weights_file_round_trip(tiny: ClipEmbedder, tiny_files: dict[str, Path], fmt: str) -> None:
    path = tiny_files[fmt]
    emb = load_embedder(f"tiny-random:{path}")
    assert emb.spec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert emb.spec.weights_id == path.name and not emb.spec.meaningless
    assert state_dict_sha256(emb.model.state_dict()) == tiny.spec.sha256
    x = torch.stack([tiny.preprocess_global(_image(240, 300, seed)) for seed in range(2)])
    assert torch.equal(emb.get_image_embedding(x), tiny.get_image_embedding(x))
    assert torch.equal(emb.get_text_embedding(["a cat"]), tiny.get_text_embedding(["a cat"]))
    # the same weights from a file are another identity only through the file's sha256
    differ = {k for k, v in emb.spec.identity().items() if tiny.spec.identity()[k] != v}
    assert differ == {"sha256"}


def _torchscript(path: Path) -> None:
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)


def _truncated_pt(path: Path, good: Path) -> None:
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def _hf_transformers(path: Path) -> None:
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}, path)


def _not_a_state_dict(path: Path) -> None:
    torch.save([torch.zeros(2)], path)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("garbage.safetensors", lambda p, good: p.write_bytes(b"\x00not a safetensors file" * 9), "cannot read"),
        ("garbage.pt", lambda p, good: p.write_bytes(b"PK\x03\x04 truncated" * 9), "cannot read"),
        ("half.pt", _truncated_pt, "cannot read"),
        ("scripted.pt", lambda p, good: _torchscript(p), "TorchScript archive.*safetensors.torch.save_file"),
        ("hf.safetensors", lambda p, good: _hf_transformers(p), "Hugging Face transformers checkpoint"),
        ("list.pt", lambda p, good: _not_a_state_dict(p), "does not hold a state dict"),
        ("weights.onnx", lambda p, good: p.write_bytes(b"x"), "not a state-dict file"),
    ],
)
def test_unreadable_weights_files_are_refused(
    tmp_path: Path, tiny_files: dict[str, Path], name: str, make, message: str
) -> None:
    path = tmp_path / name
    make(path, tiny_files["pt"])
    with pytest.raises(ClipLoadError, match=message) as info:
        load_embedder(f"tiny-random:{path}")
    assert f"tiny-random:{path}" in str(info.value)


def test_missing_weights_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClipLoadError, match="does not exist"):
        load_embedder(f"tiny-random:{tmp_path / 'absent.safetensors'}")


def test_wrong_architecture_names_the_offending_keys(tiny: ClipEmbedder, tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    del state["visual.proj"]
    state["visual.extra.weight"] = torch.zeros(1)
    state["text_projection"] = torch.zeros(64, 32)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ClipLoadError) as info:
        load_embedder(f"tiny-random:{tmp_path / 'bad.safetensors'}")
    msg = str(info.value)
    assert "missing keys: visual.proj" in msg and "unexpected keys: visual.extra.weight" in msg
    assert "text_projection (64, 32) vs (64, 64)" in msg


def test_wrong_architecture_for_timm(tiny_files: dict[str, Path]) -> None:
    with pytest.raises(ClipLoadError, match="do not fit timm's efficientnet_lite0 .*missing keys: blocks.0.0.bn1.bias"):
        load_embedder(f"timm/efficientnet_lite0:{tiny_files['safetensors']}")


def test_hub_tag_offline_says_how_to_pass_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(clip_module, "reachable", lambda url: True)  # the download itself fails
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(ClipLoadError, match=r"could not be downloaded.*--clip ViT-B-32:/path/to/weights.safetensors"):
        load_embedder("ViT-B-32:laion2b_s34b_b79k")
    # OpenAI's weights were trained with QuickGELU: the file must be loaded under the -quickgelu name
    with pytest.raises(ClipLoadError, match=r"--clip ViT-B-32-quickgelu:/path/to/weights.safetensors"):
        load_embedder("ViT-B-32:openai")


def test_hub_tag_path_records_the_tags_quick_gelu(
    tiny: ClipEmbedder, tiny_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag trained with QuickGELU gets a QuickGELU model (a mismatch would load silently), and says so."""

    def tag_cfg(model: str, tag: str) -> dict:
        return {"quick_gelu": True, "hf_hub": "x/y/"} if (model, tag) == (TINY_RANDOM, "fake") else {}

    monkeypatch.setattr(open_clip, "get_pretrained_cfg", tag_cfg)
    monkeypatch.setattr(open_clip.factory, "get_pretrained_cfg", tag_cfg)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: str(tiny_files["safetensors"]))
    monkeypatch.setattr(clip_module, "reachable", lambda url: True)
    emb = load_embedder("tiny-random:fake")
    assert emb.spec.quick_gelu and emb.spec.weights_id == "fake" and emb.spec.sha256 == tiny.spec.sha256
    assert isinstance(emb.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    assert isinstance(tiny.model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert emb.spec.identity() != tiny.spec.identity()


def test_hub_unreachable_takes_cached_weights_at_once(
    tiny: ClipEmbedder, tiny_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without network, a tag's weights come from the hub library's local cache, with no download tried (it
    would retry for about a minute); not cached, the error says the hub could not be reached."""
    import huggingface_hub.constants

    def tag_cfg(model: str, tag: str) -> dict:
        return {"hf_hub": "semspai-test/tiny/"} if (model, tag) == (TINY_RANDOM, "cached") else {}

    monkeypatch.setattr(open_clip, "get_pretrained_cfg", tag_cfg)
    monkeypatch.setattr(open_clip.factory, "get_pretrained_cfg", tag_cfg)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(clip_module, "reachable", lambda url: False)

    def no_network(*args, **kwargs):
        raise AssertionError("a connection was tried")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    repo = tmp_path / "hub" / "models--semspai-test--tiny"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    shutil.copy(tiny_files["safetensors"], repo / "snapshots" / revision / "open_clip_model.safetensors")
    emb = load_embedder("tiny-random:cached")
    assert emb.spec.weights_id == "cached" and emb.spec.sha256 == tiny.spec.sha256
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only for the load
    shutil.rmtree(repo)
    with pytest.raises(ClipLoadError, match=r"huggingface.co could not be reached and they are not in the local cache"):
        load_embedder("tiny-random:cached")
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert reachable(f"http://127.0.0.1:{port}")
    assert not reachable(f"http://127.0.0.1:{port}", timeout=1)  # closed now
    tried = []

    def connect(address, timeout):
        tried.append(address)
        raise OSError("refused")

    monkeypatch.setattr(socket, "create_connection", connect)
    assert not reachable("http://mirror.example") and not reachable("https://hub.example")
    assert tried == [("mirror.example", 80), ("hub.example", 443)]  # each scheme's own port
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert reachable(f"http://127.0.0.1:{port}")  # a proxy may reach what a direct connection cannot


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("ViT-B-32:nosuchtag", "neither a weights file nor a tag of ViT-B-32 .*openai"),
        ("ViT-B-32", "name the weights: ViT-B-32:TAG"),
        ("NoSuchNet:openai", "unknown open_clip model 'NoSuchNet'"),
        ("NoSuchNet", "unknown open_clip model 'NoSuchNet'"),  # the model first, before its missing weights
        ("timm/no_such_net:/x/w.safetensors", "timm has no model 'no_such_net'"),
        ("timm/efficientnet_lite0", "needs a local weights file"),
    ],
)
def test_bad_clip_args(arg: str, message: str) -> None:
    with pytest.raises(ClipLoadError, match=message):
        load_embedder(arg)


def test_spec_json_round_trip(tiny: ClipEmbedder) -> None:
    d = json.loads(json.dumps(tiny.spec.to_dict()))
    assert ClipSpec.from_dict(d) == tiny.spec
    assert json.loads(json.dumps(tiny.spec.identity())) == tiny.spec.identity()
    assert "arg" not in tiny.spec.identity()
    with pytest.raises(ClipLoadError, match="unknown fields \\['extra'\\]"):
        ClipSpec.from_dict({**d, "extra": 1})


def test_precision(tiny: ClipEmbedder) -> None:
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ClipLoadError, match="expected one of auto, fp32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))
    bf16 = ClipEmbedder(tiny.model, tiny.spec, tiny.preprocess_global, tiny.device, "bf16")
    x = torch.stack([tiny.preprocess_global(_image(224, 224, seed)) for seed in range(4)])
    low, high = bf16.get_image_embedding(x), tiny.get_image_embedding(x)
    assert low.dtype == torch.float32 and not torch.equal(low, high)  # autocast did run in bf16
    assert F.cosine_similarity(low, high).min().item() > 0.99


def test_bf16_weights_precision(tiny: ClipEmbedder) -> None:
    pure = ClipEmbedder(copy.deepcopy(tiny.model), tiny.spec, tiny.preprocess_global, tiny.device, BF16_WEIGHTS)
    assert {p.dtype for p in pure.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tiny.model.parameters()} == {torch.float32}  # the fp32 embedder is untouched
    x = torch.stack([tiny.preprocess_global(_image(224, 224, seed)) for seed in range(4)])  # float32 input
    low, high = pure.get_image_embedding(x), tiny.get_image_embedding(x)
    assert low.dtype == torch.float32 and not torch.equal(low, high)
    assert F.cosine_similarity(low, high).min().item() > 0.99
    text = pure.get_text_embedding(["a photo of a cat."])
    assert F.cosine_similarity(text, tiny.get_text_embedding(["a photo of a cat."])).item() > 0.99
    with pytest.raises(ClipLoadError, match="expected one of"):
        ClipEmbedder(tiny.model, tiny.spec, tiny.preprocess_global, tiny.device, "fp16-weights")


def test_timm_encoder_has_no_text_tower() -> None:
    emb = load_embedder("timm/efficientnet_lite0:random")
    spec = emb.spec
    assert (spec.kind, spec.has_text, spec.embed_dim, spec.image_size, spec.meaningless) == (
        "timm",
        False,
        1280,
        224,
        True,
    )
    assert spec.mean == (0.485, 0.456, 0.406) and spec.interpolation == "bicubic"
    x = emb.preprocess_patches(np.stack([_image(224, 224, 0), _image(224, 224, 1)]))
    v = emb.get_image_embedding(x)
    assert v.shape == (2, 1280)
    # its convolutions run channels-last, with the vectors of the model as timm builds it, up to float rounding
    assert emb.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    plain = timm.create_model("efficientnet_lite0", num_classes=0).eval()
    plain.load_state_dict(emb.model.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(v, torch.nn.functional.normalize(plain(x), dim=-1), atol=1e-5, rtol=0)
    with pytest.raises(NoTextTowerError, match="no text tower"):
        emb.get_text_embedding(["a cat"])


def _crop_similarity(v: torch.Tensor) -> tuple[float, float, float]:
    """(2N, D) vectors of crops a_1..a_N, b_1..b_N -> same-photo and other-photo mean cosine, NN accuracy."""
    n = v.shape[0] // 2
    sim = v @ v.T
    sibling = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    same = sim[torch.arange(2 * n), sibling].mean().item()
    other = torch.ones_like(sim, dtype=torch.bool)
    other[torch.arange(2 * n), torch.arange(2 * n)] = False
    other[torch.arange(2 * n), sibling] = False
    nn_acc = (sim.fill_diagonal_(-2).argmax(dim=1) == sibling).float().mean().item()
    return same, sim[other].mean().item(), nn_acc


@pytest.mark.skipif(not EFFNET.is_file(), reason=f"{EFFNET} is absent (real weights are not part of the project)")
def test_efficientnet_vectors_carry_meaning_on_real_photos() -> None:
    import skimage.data

    # distinct photos bundled with scikit-image (skimage.data.cat is chelsea again, so it is left out)
    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    photos = [getattr(skimage.data, name)() for name in names]
    # two overlapping crops per photo: its left and its right 60%
    crops = [np.ascontiguousarray(p[:, : int(0.6 * p.shape[1])]) for p in photos]
    crops += [np.ascontiguousarray(p[:, p.shape[1] - int(0.6 * p.shape[1]) :]) for p in photos]
    real = load_embedder(f"timm/efficientnet_lite0:{EFFNET}")
    x = torch.stack([real.preprocess_global(c) for c in crops])  # (14, 3, 224, 224)
    same, other, nn_acc = _crop_similarity(real.get_image_embedding(x))
    # measured: same 0.78, other 0.23, NN 1.0; random weights give 0.99, 0.99, 0.79
    assert same - other > 0.3 and nn_acc == 1.0
    same_r, other_r, nn_r = _crop_similarity(load_embedder("timm/efficientnet_lite0:random").get_image_embedding(x))
    assert same_r - other_r < 0.3 and nn_r < 1.0  # the check tells meaningful from meaningless weights
