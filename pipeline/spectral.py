"""Spectral branch: FFT low/high-pass views of each patch, a patch encoder, and SRS features (as in SPAI)."""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from semspai.store.shards import file_sha256

log = logging.getLogger(__name__)

PATCH_SIZE = 224  # the patch grid's cell (pipeline.grid.PatchRule.size); every encoder sees exactly this
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderConfigError(ValueError):
    """A model JSON is missing, malformed or asks for something the detector cannot honour."""


@dataclass
class SpectralEncoderConfig:
    """One model JSON of configs/models/ (registry = file stem); every encoder is a timm architecture."""

    timm_model: str = "vit_tiny_patch16_224"  # timm architecture name (weights never come from the hub)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # architecture overrides, e.g. {"depth": 10}
    feature_indices: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9])  # blocks/stages feeding SRS
    frozen: bool = False  # True: pretrained weights from MODEL.SPECTRAL.ENCODER_WEIGHTS, never trained (SPAI)
    srs_dim: int = 64  # each layer's tokens are projected to this width before the cosine similarities
    context_dim: int = 128  # width of the spectral context vector taken from the original view
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # pixel normalisation, inside the model
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


def list_encoders() -> list[str]:
    """Names of the model JSONs shipped in configs/models/."""
    root = resources.files("semspai.configs") / "models"
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_encoder_config(name: str) -> SpectralEncoderConfig:
    """A registry name (configs/models/<name>.json) or a path to a model JSON."""
    if name.endswith(".json"):
        path = Path(name)
    else:
        path = Path(str(resources.files("semspai.configs") / "models" / f"{name}.json"))
    if not path.is_file():
        raise EncoderConfigError(
            f"MODEL.SPECTRAL.ENCODER: no model JSON {name!r} (known: {', '.join(list_encoders())}; "
            "or give a path ending in .json)"
        )
    data = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(SpectralEncoderConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise EncoderConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return SpectralEncoderConfig(**data)


def low_pass_mask(size: int, radius: int) -> torch.Tensor:
    """(size, size // 2 + 1) float mask for `rfft2` output: 1 within `radius` of the zero frequency."""
    fy = torch.fft.fftfreq(size) * size  # integer frequencies 0, 1, ..., -1 (unshifted layout)
    fx = torch.fft.rfftfreq(size) * size  # 0 .. size // 2: the real FFT keeps half the symmetric spectrum
    return (fy[:, None] ** 2 + fx[None, :] ** 2 <= radius**2).float()


class FrequencyFilter(nn.Module):
    """Splits patches into low- and high-pass views with a circular FFT mask, always in float32."""

    def __init__(self, radius: int, size: int = PATCH_SIZE, device: torch.device | None = None) -> None:
        super().__init__()
        # not persistent: derived from config, so checkpoints stay valid if the radius is changed deliberately
        self.register_buffer("mask", low_pass_mask(size, radius).to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torch.fft rejects bf16 and fp16 loses the spectrum's dynamic range: leave autocast for the filter
        device = x.device.type
        with (
            torch.autocast(device_type=device, enabled=False)
            if torch.amp.is_autocast_available(device)
            else nullcontext()
        ):
            x = x.float()  # (N, 3, S, S)
            low = torch.fft.irfft2(torch.fft.rfft2(x) * self.mask, s=x.shape[-2:])
            return low, x - low  # high = x - low: the complementary mask, by linearity of the FFT


class PatchEncoder(nn.Module):
    """A timm backbone returning token features (N, L_k, C_k) at the configured depths."""

    def __init__(
        self,
        cfg: SpectralEncoderConfig,
        weights: str = "",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cfg.frozen and not weights:
            raise EncoderConfigError(
                f"encoder {cfg.timm_model} is frozen-pretrained: set MODEL.SPECTRAL.ENCODER_WEIGHTS to its local "
                "weights file (.safetensors or a torch state dict)"
            )
        if weights and not cfg.frozen:
            raise EncoderConfigError(
                f"MODEL.SPECTRAL.ENCODER_WEIGHTS={weights!r} given for an encoder trained from scratch "
                f"({cfg.timm_model}); leave it empty or pick a frozen model JSON"
            )
        self.backbone = timm.create_model(
            cfg.timm_model, pretrained=False, num_classes=0, device=device, dtype=dtype, **cfg.timm_kwargs
        )
        norms = [n for n, m in self.backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms and not cfg.frozen:
            # batch statistics would make a sample's score depend on its batch and on the chunk size; a frozen
            # encoder stays in eval mode (`train` below), where BatchNorm uses its pretrained running statistics
            raise EncoderConfigError(
                f"encoder {cfg.timm_model} uses BatchNorm ({norms[0]}), whose batch statistics would make a score "
                'depend on its batch: pick one without it, or a frozen pretrained one ("frozen": true)'
            )
        self.indices = list(cfg.feature_indices)
        self.frozen = cfg.frozen
        self.weights_sha256 = ""  # of the frozen encoder's weights file: checkpoints record it
        if weights:
            self._load(weights)
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        # drop blocks after the last feature layer, the final norm and the head: unused parameters would get no
        # gradient (DistributedDataParallel rejects that) and cost compute
        self.backbone.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        with torch.no_grad():
            probe = self.backbone.forward_intermediates(
                torch.zeros(1, 3, PATCH_SIZE, PATCH_SIZE, device=device, dtype=dtype),
                indices=self.indices,
                intermediates_only=True,
            )
        self.dims = [t.shape[1] for t in probe]

    def _load(self, path: str) -> None:
        if not Path(path).is_file():
            raise EncoderConfigError(f"MODEL.SPECTRAL.ENCODER_WEIGHTS: {path} does not exist")
        self.weights_sha256 = file_sha256(path)
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if missing:
            raise EncoderConfigError(f"{path}: weights lack {len(missing)} tensors of the encoder, e.g. {missing[0]}")
        if unexpected:
            log.info(
                "%s: ignored %d tensors the encoder has no use for (e.g. %s)", path, len(unexpected), unexpected[0]
            )

    def train(self, mode: bool = True) -> PatchEncoder:
        # a frozen pretrained encoder stays in eval mode whatever the detector does (no dropout drift)
        super().train(mode and not self.frozen)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return [m.flatten(2).transpose(1, 2) for m in maps]  # each (N, C_k, h, w) -> (N, L_k, C_k)


def srs_statistics(feats: list[torch.Tensor]) -> torch.Tensor:
    """Spectral reconstruction similarity: per layer, mean and std over tokens of the token-wise cosine
    similarity of (x, low), (x, high), (low, high). `feats[k]` is (3, N, L, C); returns (N, 6 * K), per layer
    in the order mean, std of (x, low), then of (x, high), then of (low, high)."""
    stats = []
    for f in feats:
        f = f.float()
        sim = F.cosine_similarity(f[[0, 0, 1]], f[[1, 2, 2]], dim=-1)  # (3 pairs, N, L), one kernel for all
        stats.append(torch.stack([sim.mean(dim=2), sim.std(dim=2, unbiased=False)], dim=1).flatten(0, 1))  # (6, N)
    return torch.cat(stats).T


class FrequencyRestorationEstimator(nn.Module):
    """Encodes patches (N, 3, 224, 224) in [0, 1] to patch vectors (N, hidden_dim) from SRS + spectral context."""

    def __init__(
        self,
        cfg: SpectralEncoderConfig,
        hidden_dim: int,
        mask_radius: int,
        dropout: float,
        weights: str = "",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.register_buffer("mean", torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, device=device).view(1, 3, 1, 1), persistent=False)
        self.filter = FrequencyFilter(mask_radius, device=device)
        self.encoder = PatchEncoder(cfg, weights, **dd)
        # one projection per layer, shared by the three views so their cosine compares like with like
        self.layer_proj = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(c, **dd), nn.Linear(c, cfg.srs_dim, **dd)) for c in self.encoder.dims
        )
        self.context = nn.Sequential(
            nn.LayerNorm(self.encoder.dims[-1], **dd), nn.Linear(self.encoder.dims[-1], cfg.context_dim, **dd)
        )
        n_stats = 6 * len(self.encoder.dims)
        self.stats_norm = nn.LayerNorm(n_stats, **dd)  # SRS statistics cluster near 1: rescale before the MLP
        self.proj = nn.Sequential(
            nn.Linear(n_stats + cfg.context_dim, hidden_dim, **dd),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim, **dd),
            nn.LayerNorm(hidden_dim, **dd),
        )

    def views(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised original, low-pass and high-pass views, each (N, 3, 224, 224)."""
        x = (patches.float() - self.mean) / self.std  # normalise first: the high-pass view then has zero mean
        low, high = self.filter(x)
        return x, low, high

    def forward(self, patches: torch.Tensor, joint: bool = False) -> torch.Tensor:
        """`joint`: the three views go through the encoder as one batch of 3N (a third of the kernel launches;
        training, where autograd keeps every view's activations anyway). Otherwise three calls of N patches,
        so the caller's chunk size bounds the encoder batch (eval, predict)."""
        dtype = self.proj[0].weight.dtype
        views = [v.to(dtype) for v in self.views(patches)]
        n = len(patches)
        if joint:
            maps = self.encoder(torch.cat(views))  # K x (3N, L_k, C_k), views in blocks of N
            feats = [proj(m).unflatten(0, (3, n)) for proj, m in zip(self.layer_proj, maps, strict=True)]
            last = maps[-1][:n]
        else:
            per_view = [self.encoder(v) for v in views]  # 3 x K x (N, L_k, C_k)
            feats = [torch.stack([proj(view[k]) for view in per_view]) for k, proj in enumerate(self.layer_proj)]
            last = per_view[0][-1]
        srs = self.stats_norm(srs_statistics(feats).to(dtype))  # (N, 6K)
        ctx = self.context(last.mean(dim=1))  # (N, context_dim), from the original view's last layer
        return self.proj(torch.cat([srs, ctx], dim=1))  # (N, hidden_dim)
