"""The semantic encoder: an open_clip CLIP or a timm image model, built from a `--clip MODEL[:WEIGHTS]` text."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
import threading
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub.constants
import numpy as np
import open_clip
import timm
import timm.data
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import load_file as load_safetensors

from semspai.pipeline.config import BF16_WEIGHTS, PRECISIONS
from semspai.store.shards import file_sha256

logger = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"  # the project's own tiny open_clip model (configs/clip/tiny-random.json)
RANDOM_WEIGHTS = "random"  # `MODEL:random`: weights drawn from RANDOM_SEED, for tests and benchmarks
RANDOM_SEED = 0
TIMM_PREFIX = "timm/"
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_HF_TRANSFORMERS_PREFIXES = ("vision_model.", "text_model.")
_KEYS_SHOWN = 5  # errors name this many offending keys, not hundreds
HUB_PROBE_S = 5.0  # how long a weights download waits to learn that the network is unreachable
_HUB_LOADS = threading.Lock()
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class ClipLoadError(ValueError):
    """The semantic encoder cannot be built or used as asked; the message names the --clip text and what to do."""


class NoTextTowerError(ClipLoadError):
    """Text vectors were asked of an image-only encoder (a timm model)."""


@dataclass(frozen=True)
class ClipSpec:
    """What a feature store or checkpoint records about its semantic encoder."""

    arg: str  # the --clip text as given; not part of the identity (one file may sit at two paths)
    kind: str  # "open_clip" | "timm" | "tiny-random"
    model: str  # open_clip model name, or timm model name without the "timm/" prefix
    weights_id: str  # hub tag, weights file basename, or "seed:N" for random weights
    sha256: str  # file bytes for a file (checkable with sha256sum); state_dict_sha256 for hub and random weights
    quick_gelu: bool  # a file saved from the other GELU variant loads silently but gives worse vectors
    image_size: int
    embed_dim: int
    has_text: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    meaningless: bool  # random weights: the vectors carry no meaning

    def __post_init__(self) -> None:
        # JSON gives lists and open_clip/timm give tuples of mixed types: one canonical form for equality
        for name in ("mean", "std"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))

    def identity(self) -> dict:
        """The fields that must be equal for two stores/checkpoints to be compatible (JSON-safe)."""
        d = self.to_dict()
        keys = ("kind", "model", "sha256", "quick_gelu", "image_size", "embed_dim", "mean", "std", "interpolation")
        return {k: d[k] for k in keys}

    def to_dict(self) -> dict:
        # lists, not tuples, so that a dict read back from JSON compares equal
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> ClipSpec:
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ClipLoadError(f"not a CLIP spec: missing fields {missing}, unknown fields {unknown}")
        return cls(**d)


def parse_clip_arg(text: str) -> tuple[str, str]:
    """Split `MODEL[:WEIGHTS]` on the first ':' (model names never hold one; paths may): -> (model, weights)."""
    model, _, weights = text.strip().partition(":")
    if model in ("", TIMM_PREFIX):
        raise ClipLoadError(f"--clip {text!r}: no model name; expected MODEL[:WEIGHTS], e.g. ViT-B-32:openai")
    return model, weights


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes in key order: equal weights give equal hashes."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # a uint8 view hashes any dtype (numpy has no bfloat16) without a copy
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else ""
    return ", ".join(keys[:_KEYS_SHOWN]) + more


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            # torch.save archives hold data.pkl + data/; TorchScript ones also hold constants.pkl and code/
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:  # not a zip at all, or a broken one: the state-dict reader reports it
        return False


def read_state_dict(path: Path, arg: str) -> dict[str, torch.Tensor]:
    """Read a weights file as a state dict on the CPU, refusing what is not one (with what to do instead)."""
    convert = (
        "load it with open_clip/timm (or torch.jit.load), then save model.state_dict() with "
        "safetensors.torch.save_file(sd, 'weights.safetensors') and pass that file"
    )
    if not path.is_file():
        raise ClipLoadError(f"--clip {arg}: weights file {path} does not exist")
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise ClipLoadError(f"--clip {arg}: {path.name} is not a state-dict file ({', '.join(STATE_DICT_SUFFIXES)})")
    if _is_torchscript(path):
        raise ClipLoadError(f"--clip {arg}: {path.name} is a TorchScript archive, not a state dict; {convert}")
    try:
        if path.suffix == ".safetensors":
            obj = load_safetensors(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip readers each raise their own types
        raise ClipLoadError(f"--clip {arg}: cannot read {path.name} as a state dict ({exc}); {convert}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # open_clip training checkpoints
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipLoadError(f"--clip {arg}: {path.name} does not hold a state dict (name -> tensor); {convert}")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    if any(k.startswith(_HF_TRANSFORMERS_PREFIXES) for k in obj):
        raise ClipLoadError(
            f"--clip {arg}: {path.name} is a Hugging Face transformers checkpoint (keys vision_model.*/text_model.*), "
            "not an open_clip state dict; use the model's open_clip weights (open_clip_model.safetensors in its hub "
            "repo) or save open_clip.create_model(NAME, pretrained=TAG).state_dict() on a machine with network"
        )
    return obj


def _mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str:
    """Say how a state dict differs from a model's: missing, unexpected and wrongly shaped keys ('' if none)."""
    missing, unexpected = set(expected) - set(got), set(got) - set(expected)
    shaped = {k for k in set(expected) & set(got) if expected[k].shape != got[k].shape}
    parts = [
        f"{what} keys: {_names(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys
    ]
    if shaped:
        k = sorted(shaped)[0]
        parts.append(f"{len(shaped)} wrongly shaped, e.g. {k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}")
    return "; ".join(parts)


def _load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], arg: str, model_name: str) -> None:
    problem = _mismatch(model.state_dict(), state_dict)
    if problem:
        raise ClipLoadError(
            f"--clip {arg}: the weights do not fit {model_name} ({problem}); name the model they were saved from"
        )
    model.load_state_dict(state_dict, strict=True)


def is_weights_path(weights: str) -> bool:
    # hub tags are bare words (laion2b_s34b_b79k); paths hold a separator or a weights suffix
    return "/" in weights or "\\" in weights or weights.endswith(STATE_DICT_SUFFIXES) or Path(weights).is_file()


@functools.cache
def _register_project_configs() -> None:
    """Make configs/clip/*.json (tiny-random) known to open_clip by file stem, once per process."""
    open_clip.add_model_config(Path(str(files("semspai.configs") / "clip")))


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    # fork_rng keeps the caller's RNG stream untouched; CPU draws give the same bits in every process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 autocast on CUDA, fp32 elsewhere; decided once here and passed down."""
    if precision not in PRECISIONS:
        raise ClipLoadError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


class ClipEmbedder:
    """A frozen semantic encoder: image (and, for CLIP, text) vectors, L2-normalised float32."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ClipSpec,
        global_transform: Callable[[Image.Image], torch.Tensor],
        device: torch.device,
        precision: str,
    ) -> None:
        self.precision = precision if precision == BF16_WEIGHTS else resolve_precision(precision, device)
        self.dtype = torch.bfloat16 if self.precision == BF16_WEIGHTS else torch.float32  # weights and inputs
        self.model = model.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        # a timm CNN's convolutions run channels-last (oneDNN's depthwise kernels want it; so do a GPU's tensor
        # cores): EfficientNet-Lite0 alone on 2 CPU cores 33 -> 67 crops/s at batch 256; the vectors move by
        # float rounding only (tested against the model called as timm builds it)
        self._memory_format = torch.channels_last if spec.kind == "timm" else torch.contiguous_format
        self.model = self.model.to(memory_format=self._memory_format)
        self.spec = spec
        self.device = device
        self._global_transform = global_transform
        self._mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def preprocess_global(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, S, S) float32 via the encoder's own eval transform (open_clip's or timm's)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
        return self._global_transform(Image.fromarray(rgb))

    def preprocess_patches(self, patches: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """(P, 224, 224, 3) uint8 -> (P, 3, S, S) float32: resized only when S != 224, then normalised.

        Into `out` when given (a contiguous float32 CPU tensor of that shape, e.g. a slice of a larger batch),
        and in place: one float copy of the patches, whatever their number (a 4K image has 150)."""
        if patches.ndim != 4 or patches.shape[3] != 3 or patches.dtype != np.uint8:
            raise ValueError(f"expected (P, H, W, 3) uint8 patches, got {patches.shape} {patches.dtype}")
        s = self.spec.image_size
        if len(patches) and patches.shape[1:3] != (s, s):
            # PIL, as open_clip's own resize uses it (torch's bicubic differs: a=-0.75 vs PIL's -0.5)
            resample = Image.Resampling[self.spec.interpolation.upper()]
            patches = np.stack([np.asarray(Image.fromarray(p).resize((s, s), resample)) for p in patches])
        x = torch.empty((len(patches), 3, s, s)) if out is None else out
        if x.shape != (len(patches), 3, s, s) or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 ({len(patches)}, 3, {s}, {s}) tensor")
        x.copy_(torch.from_numpy(patches).permute(0, 3, 1, 2))  # 0..255 as float; the same ops as out of place
        return x.div_(255.0).sub_(self._mean).div_(self._std)

    def get_image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, D) L2-normalised float32 vectors on self.device."""
        s = self.spec.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"expected a (B, 3, {s}, {s}) batch for {self.spec.arg}, got {tuple(x.shape)}")
        with torch.inference_mode(), self._autocast():
            x = x.to(self.device, self.dtype, non_blocking=True, memory_format=self._memory_format)
            feats = self.model(x) if self.spec.kind == "timm" else self.model.encode_image(x)  # (B, D)
        return F.normalize(feats.float(), dim=-1)

    @functools.cached_property
    def _tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        return open_clip.get_tokenizer(self.spec.model)

    def get_text_embedding(self, texts: list[str]) -> torch.Tensor:
        """T texts -> (T, D) L2-normalised float32 vectors; only CLIP-like encoders have a text tower."""
        if not self.spec.has_text:
            raise NoTextTowerError(
                f"--clip {self.spec.arg}: this encoder has no text tower, so caption and prompt vectors do not "
                "exist; use an open_clip model (e.g. ViT-B-32:WEIGHTS or tiny-random) for text features"
            )
        if not texts:
            return torch.empty(0, self.spec.embed_dim, device=self.device)
        tokens = self._tokenizer(list(texts)).to(self.device)  # (T, context_length)
        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_text(tokens)  # (T, D)
        return F.normalize(feats.float(), dim=-1)


def _open_clip_config(arg: str, name: str) -> dict:
    _register_project_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ClipLoadError(
            f"--clip {arg}: unknown open_clip model {name!r}; use one of open_clip.list_models() (e.g. ViT-B-32), "
            f"{TINY_RANDOM}, or timm/MODEL:/path/weights.safetensors"
        )
    return cfg


def _build_open_clip(
    arg: str, name: str, weights: str
) -> tuple[torch.nn.Module, dict, Callable[[Image.Image], torch.Tensor]]:
    cfg = _open_clip_config(arg, name)
    quick_gelu = bool(cfg.get("quick_gelu", False))
    if weights == RANDOM_WEIGHTS:
        model = _seeded(lambda: open_clip.create_model(name, pretrained=None))
        weights_id, sha = f"seed:{RANDOM_SEED}", state_dict_sha256(model.state_dict())
    elif is_weights_path(weights):
        path = Path(weights)
        state_dict = read_state_dict(path, arg)
        model = open_clip.create_model(name, pretrained=None)  # its random init is overwritten below
        _load_strict(model, state_dict, arg, name)
        weights_id, sha = path.name, file_sha256(path)
        logger.info(
            "%s: quick_gelu=%s from the model config; weights saved from the other variant load without error but "
            "give worse vectors (OpenAI weights need a -quickgelu model name)",
            arg,
            quick_gelu,
        )
    else:
        tag_cfg = open_clip.get_pretrained_cfg(name, weights)
        if not tag_cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise ClipLoadError(f"--clip {arg}: {weights!r} is neither a weights file nor a tag of {name} ({tags})")
        # the tag says which activation its weights were trained with; a mismatch would load silently but wrong
        quick_gelu = quick_gelu or bool(tag_cfg.get("quick_gelu", False))
        # a file saved from these weights must be loaded under a model name with the same activation
        file_name = f"{name}-quickgelu" if quick_gelu and not cfg.get("quick_gelu") else name
        try:
            with _cache_only_when_offline(tag_cfg) as offline:
                model = open_clip.create_model(name, pretrained=weights, force_quick_gelu=quick_gelu)
        except RuntimeError as exc:
            why = f"{offline} could not be reached and they are not in the local cache" if offline else exc
            raise ClipLoadError(
                f"--clip {arg}: the weights could not be downloaded ({why}); without network, save "
                f"open_clip.create_model('{file_name}', pretrained='{weights}').state_dict() with safetensors on a "
                f"machine that has it and pass --clip {file_name}:/path/to/weights.safetensors"
            ) from exc
        weights_id, sha = weights, state_dict_sha256(model.state_dict())
    pp = model.visual.preprocess_cfg
    size = pp["size"]
    info = {
        "kind": TINY_RANDOM if name == TINY_RANDOM else "open_clip",
        "weights_id": weights_id,
        "sha256": sha,
        "quick_gelu": quick_gelu,
        "image_size": size if isinstance(size, int) else int(size[0]),
        "embed_dim": int(cfg["embed_dim"]),
        "has_text": True,
        "mean": pp["mean"],
        "std": pp["std"],
        "interpolation": pp["interpolation"],
    }
    return model, info, image_transform_v2(PreprocessCfg(**pp), is_train=False)


class _OpenClipNoise(logging.Filter):
    """open_clip's own root-logger lines that semspai says better: "No pretrained weights loaded" (also when
    semspai then loads a weights file itself) and "Failed to download weights" (before the ClipLoadError)."""

    PREFIXES = ("No pretrained weights loaded", "Failed to download weights")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (f"{os.sep}open_clip{os.sep}" in record.pathname and record.getMessage().startswith(self.PREFIXES))


@contextlib.contextmanager
def _quiet_open_clip():
    noise = _OpenClipNoise()
    root = logging.getLogger()
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)


def reachable(url: str, timeout: float = HUB_PROBE_S) -> bool:
    """Whether a TCP connection to `url`'s host opens (through a proxy, when one is set, it is assumed to)."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    parts = urlparse(url)
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _cache_only_when_offline(tag_cfg: dict):
    """Around an open_clip download from the Hugging Face hub: when the hub cannot be reached, the hub library
    is put in offline mode (weights come from its local cache, or fail at once): it would otherwise retry for
    about a minute. Yields the unreachable host, or "" when the download goes ahead as usual. One load at a time
    per process: the offline switch is the hub library's global, which another thread's load would see."""
    with _HUB_LOADS:
        if (
            not tag_cfg.get("hf_hub")
            or huggingface_hub.constants.HF_HUB_OFFLINE
            or reachable(huggingface_hub.constants.ENDPOINT)
        ):
            yield ""
            return
        host = urlparse(huggingface_hub.constants.ENDPOINT).hostname
        logger.info("%s cannot be reached: CLIP weights are taken from the local cache only", host)
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            yield host
        finally:
            huggingface_hub.constants.HF_HUB_OFFLINE = False


def _build_timm(
    arg: str, name: str, weights: str
) -> tuple[torch.nn.Module, dict, Callable[[Image.Image], torch.Tensor]]:
    if not timm.is_model(name):
        raise ClipLoadError(f"--clip {arg}: timm has no model {name!r} (see timm.list_models())")
    if weights == RANDOM_WEIGHTS:
        model = _seeded(lambda: timm.create_model(name, pretrained=False, num_classes=0))
        weights_id, sha = f"seed:{RANDOM_SEED}", state_dict_sha256(model.state_dict())
    elif weights and is_weights_path(weights):
        path = Path(weights)
        state_dict = read_state_dict(path, arg)
        default_cfg = timm.models.get_pretrained_cfg(name)
        classifier = default_cfg.classifier if default_cfg is not None else None
        for head in (classifier,) if isinstance(classifier, str) else classifier or ():
            state_dict.pop(f"{head}.weight", None)
            state_dict.pop(f"{head}.bias", None)
        # timm applies the model's own key filter; with num_classes=0 it would also turn strict loading off
        # (missing keys only logged), unless the overlay says the weights have no classifier either
        overlay = {"state_dict": state_dict, "num_classes": 0}
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0)
        except RuntimeError as exc:
            problem = _mismatch(timm.create_model(name, num_classes=0).state_dict(), state_dict) or str(exc)
            raise ClipLoadError(f"--clip {arg}: the weights do not fit timm's {name} ({problem})") from exc
        model.pretrained_cfg.pop("state_dict", None)  # it would keep a second copy of the weights alive
        weights_id, sha = path.name, file_sha256(path)
    else:
        raise ClipLoadError(
            f"--clip {arg}: a timm encoder needs a local weights file: timm/{name}:/path/to/weights.safetensors"
        )
    data_cfg = timm.data.resolve_data_config(model=model)
    size = int(data_cfg["input_size"][-1])
    with torch.inference_mode():
        embed_dim = model.eval()(torch.zeros(1, 3, size, size)).shape[-1]  # pooled width, whatever the head
    info = {
        "kind": "timm",
        "weights_id": weights_id,
        "sha256": sha,
        "quick_gelu": False,
        "image_size": size,
        "embed_dim": int(embed_dim),
        "has_text": False,
        "mean": data_cfg["mean"],
        "std": data_cfg["std"],
        "interpolation": data_cfg["interpolation"],
    }
    return model, info, timm.data.create_transform(**data_cfg, is_training=False)


def load_embedder(arg: str, device: str | torch.device = "cpu", precision: str = "auto") -> ClipEmbedder:
    """Build the encoder that `--clip ARG` names: hub tag, local state-dict file, tiny-random or timm/MODEL:FILE."""
    name, weights = parse_clip_arg(arg)
    device = torch.device(device)
    if name.startswith(TIMM_PREFIX):
        name = name[len(TIMM_PREFIX) :]
        model, info, transform = _build_timm(arg, name, weights)
    else:
        if not weights and name != TINY_RANDOM:
            _open_clip_config(arg, name)  # an unknown model is named as such before its missing weights
            raise ClipLoadError(
                f"--clip {arg}: name the weights: {name}:TAG (hub, needs network), {name}:/path/weights.safetensors, "
                f"or {name}:{RANDOM_WEIGHTS} (meaningless vectors, for benchmarks)"
            )
        with _quiet_open_clip():
            model, info, transform = _build_open_clip(arg, name, weights or RANDOM_WEIGHTS)
    meaningless = info["weights_id"].startswith("seed:")
    spec = ClipSpec(arg=arg, model=name, meaningless=meaningless, **info)
    if meaningless:
        logger.warning(
            "!!! --clip %s has RANDOM WEIGHTS (seed %d): its vectors carry NO MEANING; use it for tests, the demo "
            "and benchmarks only, never for results !!!",
            arg,
            RANDOM_SEED,
        )
    embedder = ClipEmbedder(model, spec, transform, device, precision)
    logger.info(
        "semantic encoder %s: %s, %d-d, %d px, %s on %s",
        arg,
        spec.kind,
        spec.embed_dim,
        spec.image_size,
        embedder.precision,
        device,
    )
    return embedder
