"""Scoring images with a trained checkpoint: the `Detector` behind `semspai predict`, `semspai eval` and the API."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from semspai.pipeline.clip import (
    RANDOM_WEIGHTS,
    TINY_RANDOM,
    ClipEmbedder,
    ClipLoadError,
    ClipSpec,
    load_embedder,
    parse_clip_arg,
    resolve_precision,
)
from semspai.pipeline.config import RunConfig, config_from_dict
from semspai.pipeline.detector import (
    DetectorBatch,
    SemSpaiDetector,
    create_detector,
    distinct_rows,
    load_trainable_state,
    pack_images,
)
from semspai.pipeline.engine import autocast
from semspai.pipeline.grid import DEFAULT_RULE, grid_boxes, mostly_padding
from semspai.pipeline.iterate import ordered_map
from semspai.pipeline.spectral import SpectralEncoderConfig
from semspai.store.checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint
from semspai.store.images import ImageDecodeError, decode_image, pil_to_rgb
from semspai.store.manifest import unique_files
from semspai.store.sources import image_files

log = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray
T = TypeVar("T")
DEFAULT_BATCH_IMAGES = 32  # images scored together at most (32 vs 8: +8% for 224-px images on a 2-core CPU)
DEFAULT_BATCH_PATCHES = 256  # a batch is closed early at this many patches, so big images do not pile up
DECODE_AHEAD = 4  # image files decoded ahead of the model at most (threads, and images held waiting)
PADDING_WARNINGS = 5  # such images named one by one at most; the rest are counted in one line


@dataclass
class PatchMaps:
    """Where the detector looked: one value per grid patch, for heatmaps."""

    boxes: np.ndarray  # (P, 4) int32 x0, y0, x1, y1 in the padded image
    attention: np.ndarray  # (P,) attention-pooling weights, summing to 1
    gates: np.ndarray | None  # (P,) fusion gate strength (fusions with gates only)


@dataclass
class Prediction:
    """One image's result: the fields of the predict CSV, plus the maps when asked for."""

    path: str
    score: float | None = None  # P(fake)
    label: str = ""  # fake | real by the checkpoint's threshold; empty on error
    n_patches: int = 0
    error: str = ""  # empty when fine
    maps: PatchMaps | None = field(default=None, repr=False)

    def row(self) -> dict:
        """The CSV/JSON fields, in the CSV's column order."""
        return {"path": self.path, "score": self.score, "label": self.label, "n_patches": self.n_patches,
                "error": self.error}  # fmt: skip


def to_rgb(image: ImageInput) -> np.ndarray:
    """Any accepted input -> (H, W, 3) uint8 RGB through the project's one decode path (EXIF orientation,
    CMYK, palette, alpha, 16-bit and float grey handled alike for files and PIL images). Arrays: (H, W[, 3|4])
    uint8, or single-channel (H, W[, 1]) uint16 or float, which take the grey path of a 16-bit or float file."""
    if isinstance(image, (str, Path)):
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"unreadable file: {exc.strerror or exc}") from exc
        return decode_image(data)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2 and image.dtype in (
            np.uint16,
            np.float32,
            np.float64,
        ):  # PIL's I;16 and F modes: the file decoder's rules for 16-bit and float samples
            return pil_to_rgb(Image.fromarray(image.astype(np.float32) if image.dtype == np.float64 else image))
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ImageDecodeError(f"array of shape {image.shape} {image.dtype}: expected (H, W[, 3|4]) uint8, or "
                                   "(H, W[, 1]) uint16 or float")  # fmt: skip
        return pil_to_rgb(Image.fromarray(image))
    raise ImageDecodeError(f"cannot score a {type(image).__name__}: pass a path, a PIL image or a uint8 array")


def describe(image: ImageInput, i: int) -> str:
    """The `path` column for an input: its path, a PIL image's file name, or `<array i>`."""
    if isinstance(image, (str, Path)):
        return str(image)
    name = getattr(image, "filename", "")
    kind = "image" if isinstance(image, Image.Image) else "array" if isinstance(image, np.ndarray) else "input"
    return name or f"<{kind} {i}>"


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and image files under directories (recursively, sorted; as `semspai shard` walks a
    folder: `image_files`), each file once (where it first comes, by its own path rather than a symlink's when
    both are found); a missing path is an error."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += image_files(item)
        elif item.exists():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist")
    return unique_files(found, unlinked=True)


def patch_batches(items: Iterable[tuple[T, np.ndarray | None]], max_images: int = DEFAULT_BATCH_IMAGES,
                  max_patches: int = DEFAULT_BATCH_PATCHES, ramp: bool = False,
                  ) -> Iterator[list[tuple[T, np.ndarray | None]]]:  # fmt: skip
    """Group (item, decoded image or None) pairs into batches of at most `max_images` images, closed early once
    they hold `max_patches` grid patches, so a run of 4K images never sits in memory at once.

    `ramp`: the first batch is one image and each next one may be twice the last, up to `max_images`, so the
    first result comes as soon as one image is scored (`predict big/ | head`) and a long run still gets full
    batches. (Where an image lands decides its batch, and so its score's last float bits.)
    """
    batch: list[tuple[T, np.ndarray | None]] = []
    n_patches, limit = 0, 1 if ramp else max_images
    for item, rgb in items:
        batch.append((item, rgb))
        if rgb is not None:
            n_patches += len(grid_boxes(rgb.shape[0], rgb.shape[1], DEFAULT_RULE))
        if len(batch) >= min(limit, max_images) or n_patches >= max_patches:
            yield batch
            batch, n_patches, limit = [], 0, 2 * limit
    if batch:
        yield batch


class Detector:
    """A trained checkpoint ready to score images of any size: the model plus the CLIP encoder it was trained
    with (its vectors are computed on the fly here; training read them from the store)."""

    def __init__(self, model: SemSpaiDetector, config: RunConfig, embedder: ClipEmbedder | None, threshold: float,
                 device: torch.device, precision: str, checkpoint: str = "",
                 train_generators: dict[str, int] | None = None, clip_spec: ClipSpec | None = None) -> None:  # fmt: skip
        self.model = model.to(device).eval()
        self._clip_spec = clip_spec  # the encoder the checkpoint was trained with, when none is loaded
        self.train_generators = train_generators  # generator -> fakes it was trained on; None: not recorded
        self.config = config
        self.embedder = embedder
        self.threshold = threshold
        self.device = device
        self.precision = precision
        self.checkpoint = checkpoint
        self.decode_workers = min(DECODE_AHEAD, os.cpu_count() or 1)  # image files decoded at once, ahead of scoring

    @property
    def semantic_mode(self) -> str:
        return self.model.semantic_mode

    @property
    def clip_spec(self) -> ClipSpec | None:
        return self.embedder.spec if self.embedder is not None else self._clip_spec

    @property
    def chunk_size(self) -> int:
        return self.model.chunk_size

    @chunk_size.setter
    def chunk_size(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"chunk size must be >= 1, got {n}")
        self.model.chunk_size = n

    def clip_vectors(self, images: list[np.ndarray], patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global (B, D) and local (N, D) vectors for decoded images and their packed grid patches.

        Vectors are rounded through float16 as the store keeps them, so on-the-fly and cached scores agree.
        """
        emb = self.embedder
        glob = emb.get_image_embedding(torch.stack([emb.preprocess_global(img) for img in images]))  # (B, D)
        repeats = distinct_rows(patches)  # a small image's five crops are one patch: embed it once
        local = []
        for chunk in torch.split(patches if repeats is None else patches[repeats[0]], self.chunk_size):
            crops = chunk.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # exact: patches are u8/255
            local.append(emb.get_image_embedding(emb.preprocess_patches(crops)))  # (n, D), bounded memory
        local = torch.cat(local) if repeats is None else torch.cat(local)[repeats[1]]
        return glob.half().float(), local.half().float()

    @torch.inference_mode()
    def score(self, images: list[np.ndarray], global_vec: torch.Tensor | None = None,
              local_vec: torch.Tensor | None = None, return_maps: bool = False) -> list[Prediction]:  # fmt: skip
        """Score decoded (H, W, 3) uint8 images; CLIP vectors are computed unless given (e.g. from a store).

        global_vec: (B, D); local_vec: (N, D) in `pack_images` order. Returns predictions without paths.
        """
        patches, counts, boxes = pack_images(images, DEFAULT_RULE)  # (N, 3, 224, 224), (B,)
        mode = self.semantic_mode
        if mode != "none" and global_vec is None:
            if self.embedder is None:
                raise ClipLoadError(f"semantic mode {mode} needs CLIP vectors, but no encoder is loaded")
            global_vec, local_vec = self.clip_vectors(images, patches)
        batch = DetectorBatch(
            patches=patches.to(self.device),
            counts=counts,
            global_vec=None if mode == "none" else global_vec.to(self.device),
            local_vec=local_vec.to(self.device) if mode == "global_local" else None,
        )
        with autocast(self.precision, self.device):
            out = self.model(batch, return_maps=return_maps)
        probs = torch.sigmoid(out.logits.float()).cpu().numpy()  # (B,)
        preds = []
        for i, p in enumerate(probs):
            maps = None
            if return_maps:
                gates = out.gates[i].float().cpu().numpy() if out.gates is not None else None
                maps = PatchMaps(boxes[i], out.attention[i].float().cpu().numpy(), gates)
            label = "fake" if p >= self.threshold else "real"
            preds.append(Prediction(path="", score=float(p), label=label, n_patches=int(counts[i]), maps=maps))
        return preds

    def iter_predict(self, images: Iterable[ImageInput], return_maps: bool = False, ramp: bool = True,
                     ) -> Iterator[tuple[Prediction, np.ndarray | None]]:  # fmt: skip
        """Yield (prediction, decoded image or None on error) in input order; an unreadable input gets an error
        prediction and the rest go on. `ramp`: the first batch is one image, then they double (`patch_batches`)."""

        def decode(item: tuple[int, ImageInput]) -> tuple[tuple[str, str], np.ndarray | None]:
            i, image = item
            try:
                return (describe(image, i), ""), to_rgb(image)
            except ImageDecodeError as exc:
                return (describe(image, i), str(exc)), None

        # files are read and decoded in threads, a few ahead, while the model scores the batch before (a 4K PNG
        # takes tenths of a second to decode); images already in memory are converted inline
        decoded = ordered_map(decode, enumerate(images), self.decode_workers, ahead=self.decode_workers,
                              inline=lambda item: not isinstance(item[1], (str, Path)))  # fmt: skip
        padded = 0  # images mostly padding: the first few are named, the rest counted (a folder of thumbnails)
        for batch in patch_batches(decoded, ramp=ramp):
            good = [rgb for _, rgb in batch if rgb is not None]
            scored = iter(self.score(good, return_maps=return_maps) if good else [])
            for (path, error), rgb in batch:
                pred = Prediction(path=path, error=error) if rgb is None else next(scored)
                if rgb is not None and mostly_padding(*rgb.shape[:2]):
                    padded += 1
                    if padded <= PADDING_WARNINGS:
                        more = "; any further such image is counted at the end" if padded == PADDING_WARNINGS else ""
                        log.warning("%s: %dx%d is mostly padding in its %d-px patches; its score says little%s",
                                    path, rgb.shape[1], rgb.shape[0], DEFAULT_RULE.size, more)  # fmt: skip
                pred.path = path
                yield pred, rgb
        if padded > PADDING_WARNINGS:
            log.warning("%d images in all were mostly padding in their %d-px patches (%d not named above); their "
                        "scores say little", padded, DEFAULT_RULE.size, padded - PADDING_WARNINGS)  # fmt: skip

    def predict(self, images: ImageInput | Iterable[ImageInput], return_maps: bool = False) -> list[Prediction]:
        """Score paths, PIL images or uint8 arrays (one or many): path, score = P(fake), label, n_patches, error."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        return [pred for pred, _ in self.iter_predict(images, return_maps=return_maps, ramp=False)]


def load_detector(checkpoint: str | Path, clip: str | None = None, device: str | torch.device = "cpu",
                  precision: str = "auto", encoder: bool = True,
                  encoder_weights: str | None = None) -> Detector:  # fmt: skip
    """The detector a checkpoint (or a run directory, meaning its best checkpoint) holds, with its CLIP encoder.

    `clip` overrides where the encoder's weights are read from (e.g. the file moved); it must still be the
    encoder the checkpoint was trained with, since the fusion weights only understand that one's vectors.
    `encoder=False` leaves the encoder unloaded, for a caller that gives every CLIP vector (from a store); the
    detector's `clip_spec` is then the one the checkpoint recorded. `encoder_weights` does for a frozen spectral
    encoder what `clip` does for CLIP: where its weights are now, checked against the sha256 the checkpoint
    recorded.
    """
    file = resolve_checkpoint(checkpoint)
    state = load_checkpoint(file)
    for key in ("model", "config", "clip_dim", "threshold"):
        if key not in state:
            raise CheckpointError(f"checkpoint {file} has no {key!r}; it was not written by `semspai train`")
    config = config_from_dict(state["config"], saved=True)
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    model = _build_recorded_detector(state, config, encoder_weights, file)
    try:  # a frozen encoder comes back from its own weights file, not from here
        load_trainable_state(model, state["model"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {file} does not fit its own config ({exc}); was it written by another "
                              "semspai version?") from exc  # fmt: skip
    embedder = spec = None
    if clip and model.semantic_mode == "none":
        log.warning("--clip %s is not used by %s: a spectral-only checkpoint reads no CLIP vector", clip, file)
    if model.semantic_mode != "none":
        if not state.get("clip_spec"):
            raise CheckpointError(f"checkpoint {file} uses CLIP vectors but records no CLIP spec")
        spec = ClipSpec.from_dict(state["clip_spec"])
        embedder = _load_recorded_embedder(spec, clip, file, device, precision) if encoder else None
    gens = state.get("train_generators")  # absent from checkpoints written before it was recorded
    return Detector(model, config, embedder, float(state["threshold"]), device, precision, str(file),
                    None if gens is None else {str(g): int(n) for g, n in gens.items()}, spec)  # fmt: skip


def _build_recorded_detector(state: dict, config: RunConfig, weights: str | None, file: Path) -> SemSpaiDetector:
    """The detector of checkpoint `file`, its spectral encoder built from the model JSON the checkpoint recorded
    (checkpoints written before it was recorded: from MODEL.SPECTRAL.ENCODER) and a frozen encoder's weights from
    `weights` or the path it was trained with, refused unless they are the ones it was trained with."""
    record = state.get("spectral_encoder")
    encoder = SpectralEncoderConfig(**record["config"]) if record is not None else None
    spectral = config.MODEL.SPECTRAL
    if weights and encoder is not None and not encoder.frozen:  # as --clip is without CLIP: eval may name several
        log.warning("--encoder-weights %s is not used by %s: it trained its spectral encoder (%s) and holds its "
                    "weights", weights, file, encoder.timm_model)  # fmt: skip
    elif weights:
        spectral.ENCODER_WEIGHTS = weights
    if record is None:  # written before checkpoints recorded their encoder: as then
        return create_detector(config.MODEL, int(state["clip_dim"]))
    want, path = record.get("weights_sha256", ""), spectral.ENCODER_WEIGHTS
    if encoder.frozen and not (path and Path(path).is_file()):
        raise CheckpointError(
            f"checkpoint {file} needs the weights of its frozen spectral encoder {encoder.timm_model} "
            f"(sha256 {want[:12]}…), which are not at {path or '(no path)'}: pass --encoder-weights "
            "/path/to/them (the same file at another path)"
        )
    model = create_detector(config.MODEL, int(state["clip_dim"]), encoder=encoder)
    have = model.spectral.encoder.weights_sha256  # hashed as the weights were read
    if have != want:
        given = f"--encoder-weights {path}" if weights else f"the frozen spectral encoder's weights at {path}"
        raise CheckpointError(
            f"{given} (sha256 {have[:12]}…) are not the weights checkpoint {file} was trained with (sha256 "
            f"{want[:12]}…), and its spectral head only understands their features: pass --encoder-weights with those"
        )
    return model


def _load_recorded_embedder(spec: ClipSpec, override: str | None, file: Path, device: torch.device,
                            precision: str) -> ClipEmbedder:  # fmt: skip
    arg = override or spec.arg
    model = parse_clip_arg(spec.arg)[0]  # as --clip names it (timm/NAME for a timm encoder)
    if spec.meaningless:  # weights drawn from a seed: no file to point at
        hint = f"Pass --clip {model}" + ("" if spec.model == TINY_RANDOM else f":{RANDOM_WEIGHTS}")
    else:
        hint = f"Pass --clip {model}:/path/to/{spec.weights_id} (the same weights at another path)"
    try:
        embedder = load_embedder(arg, device, precision)
    except ClipLoadError as exc:
        raise ClipLoadError(
            f"checkpoint {file} needs its CLIP encoder {spec.model} ({spec.weights_id}, sha256 {spec.sha256[:12]}…), "
            f"which cannot be loaded from {arg!r}: {exc}. {hint}"
        ) from exc
    have, want = embedder.spec.identity(), spec.identity()
    if have != want:
        diffs = ", ".join(f"{k}: {have[k]!r} vs trained with {want[k]!r}" for k in want if have[k] != want[k])
        raise ClipLoadError(f"--clip {arg} is not the CLIP encoder checkpoint {file} was trained with ({diffs})")
    return embedder
