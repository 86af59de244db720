"""Run configuration: YAML files and `--set KEY=VALUE` overrides loaded into typed dataclasses.

Unknown keys and wrong types are errors that name the key, so a typo never trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

SEMANTIC_MODES = ("none", "global", "global_local")
FUSION_KINDS = ("concat", "film", "gate", "cross_attn")
AUG_PLACES = ("auto", "loader", "device")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, fp32 on the CPU
# extract-clip only: the encoder's weights cast to bf16 and run without autocast (DESIGN.md's encoder anchor;
# no per-call weight casts, bf16 layer norms). Vectors differ from autocast's within bf16 rounding.
BF16_WEIGHTS = "bf16-weights"
EMBEDDER_PRECISIONS = (*PRECISIONS, BF16_WEIGHTS)


# numeric keys and their inclusive bounds (None: unbounded); a list's every item is checked
RANGES: dict[str, tuple[float | None, float | None]] = {
    "MODEL.DROPOUT": (0, 1),
    "MODEL.HIDDEN_DIM": (1, None),
    "MODEL.SCA_HEADS": (1, None),
    "MODEL.SEMANTIC.PROJ_DIM": (1, None),
    "MODEL.SPECTRAL.MASK_RADIUS": (0, None),
    "MODEL.SPECTRAL.CHUNK_SIZE": (1, None),
    "DATA.MAX_PATCHES": (1, None),
    "DATA.NUM_WORKERS": (0, None),
    "DATA.SHUFFLE_BUFFER": (0, None),  # 0 or 1: the stored order
    "DATA.STORE_MEMORY_GB": (0, None),
    "AUG.FLIP_PROB": (0, 1),
    "AUG.JPEG_PROB": (0, 1),
    "AUG.JPEG_QUALITY": (1, 100),
    "AUG.BLUR_PROB": (0, 1),
    "AUG.BLUR_SIGMA": (0, None),
    "AUG.NOISE_PROB": (0, 1),
    "AUG.NOISE_STD": (0, None),
    "TRAIN.EPOCHS": (1, None),
    "TRAIN.BATCH_SIZE": (1, None),
    "TRAIN.BASE_LR": (0, None),
    "TRAIN.MIN_LR": (0, None),
    "TRAIN.WEIGHT_DECAY": (0, None),
    "TRAIN.WARMUP_EPOCHS": (0, None),
    "TRAIN.CLIP_GRAD": (0, None),
    "TRAIN.SEED": (0, 2**63 - 1),  # numpy's and torch's seeds are non-negative
    "TRAIN.EARLY_STOP": (0, None),
    "LOSS.SEMANTIC_WEIGHT": (0, None),
    "LOSS.TEMPERATURE": (0, None),
}


# settings of how a run is computed that leave its results as they are (tests hold them to it): a run that
# differs in these alone is the same run (up to date, resumable; e.g. a smaller memory budget to resume with).
# Not MODEL.SPECTRAL.CHUNK_SIZE: a frozen encoder trains in chunks, and on a GPU dropout's draws follow them
NOT_IDENTITY = ("DATA.STORE_MEMORY_GB",)
# keys added after runs were made: at these values (the behaviour before they existed) they are left out of a run's
# identity, so a run made before stays up to date and resumable
ADDED_LATER = {"TRAIN.EARLY_STOP": 0}
BOOTSTRAP_ROUNDS = 1000  # eval's AUC intervals: enough for a stable 95% interval on test sets of a few hundred
PROMPT_TEMPLATE = "a photo of a {}."  # each class name of a store's prompt bank becomes one prompt (CLIP's zero-shot)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class SemanticConfig:
    MODE: str = "global_local"  # none | global (Approach 1) | global_local (Approach 2)
    FUSION: str = "film"  # how CLIP vectors enter patch features: concat | film | gate | cross_attn
    CONDITION_QUERY: bool = True  # the global vector also conditions the attention-pooling query
    PROJ_DIM: int = 128  # CLIP vectors are projected to this width before fusion


@dataclass
class ClipConfig:
    NAME: str = ""  # open_clip model name; empty = take the store's (train) or the checkpoint's (predict)
    WEIGHTS: str = ""  # hub tag or local weights file; same rule as NAME


@dataclass
class SpectralConfig:
    ENCODER: str = "spectral-vit-tiny"  # a model JSON in configs/models/ (registry = file stem)
    ENCODER_WEIGHTS: str = ""  # for frozen pretrained encoders (SPAI's setup): a local weights file
    MASK_RADIUS: int = 16  # FFT low/high-pass split on a 224 patch, as in SPAI
    # patches encoded at once in eval and predict; bounds memory for any resolution (training a trainable
    # encoder takes a batch's patches at once: autograd keeps all their activations either way)
    CHUNK_SIZE: int = 64


@dataclass
class ModelConfig:
    USE_SEMANTIC_CONTEXT: bool = True  # False means SEMANTIC.MODE must be none
    DROPOUT: float = 0.1
    HIDDEN_DIM: int = 256  # width of patch vectors after SRS projection and of the head
    SCA_HEADS: int = 4  # heads of the spectral context attention (and cross_attn fusion); divides HIDDEN_DIM
    SEMANTIC: SemanticConfig = field(default_factory=SemanticConfig)
    CLIP: ClipConfig = field(default_factory=ClipConfig)
    SPECTRAL: SpectralConfig = field(default_factory=SpectralConfig)


@dataclass
class DataConfig:
    # no effect: the prompt bank is fixed into the feature store at extraction (`extract-clip --prompts`). Kept so
    # configs of earlier versions load; a value other than the default is refused (`check_ranges`)
    PROMPTS_PATH: str = ""
    PROMPT_TEMPLATE: str = PROMPT_TEMPLATE
    GENERATORS: list[str] = field(default_factory=list)  # keep only these generators (reals always kept); empty = all
    MAX_PATCHES: int = 16  # patches per image in a training view (a random subset of grid cells)
    NUM_WORKERS: int = 0  # DataLoader workers for training
    SKIP_MISSING: bool = False  # skip (and count) samples absent from the store instead of failing
    SHUFFLE_BUFFER: int = 256  # raw samples mixed within a stream on top of the per-epoch shard order
    # the store's local vectors are held in memory up to this size; a larger store is copied into the run
    # dir (.store-cache/, removed when training ends) and memory-mapped from there
    STORE_MEMORY_GB: float = 8.0


@dataclass
class AugConfig:
    FLIP_PROB: float = 0.5  # horizontal flip of each patch (the CLIP vector of a flipped patch is kept)
    JPEG_PROB: float = 0.3
    JPEG_QUALITY: list[int] = field(default_factory=lambda: [50, 100])  # SPAI's range
    BLUR_PROB: float = 0.2
    BLUR_SIGMA: list[float] = field(default_factory=lambda: [0.1, 2.0])
    NOISE_PROB: float = 0.2
    NOISE_STD: list[float] = field(default_factory=lambda: [0.0, 0.03])  # on [0, 1] pixels
    # where the perturbations run: in the loader processes, or batched on the training device (the loader then
    # only decodes and cuts: a GPU's host cores are then free to feed it); auto = on the device unless it is the CPU
    WHERE: str = "auto"  # auto | loader | device


@dataclass
class TrainConfig:
    EPOCHS: int = 10
    BATCH_SIZE: int = 16
    BASE_LR: float = 5e-4
    MIN_LR: float = 1e-6
    WEIGHT_DECAY: float = 0.05
    WARMUP_EPOCHS: float = 1.0
    CLIP_GRAD: float = 1.0
    SEED: int = 0
    PRECISION: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    # torch.compile the spectral branch (most of a step's kernels): fused, fewer launches; the first steps and the
    # first validation compile (minutes), so it pays on long runs only. Dropout then draws from inductor's own
    # generator: a compiled run is not the eager run's numbers
    COMPILE: bool = False
    # stop once this many epochs in a row bring no better val AUC than the best before (0: train every epoch).
    # best.pt keeps the best epoch either way; this saves the epochs that would not have improved on it
    EARLY_STOP: int = 0


@dataclass
class LossConfig:
    SEMANTIC_WEIGHT: float = 0.0  # weight of the semantic-consistency term; 0 disables it
    TEMPERATURE: float = 0.07  # contrastive temperature of that term


@dataclass
class RunConfig:
    MODEL: ModelConfig = field(default_factory=ModelConfig)
    DATA: DataConfig = field(default_factory=DataConfig)
    AUG: AugConfig = field(default_factory=AugConfig)
    TRAIN: TrainConfig = field(default_factory=TrainConfig)
    LOSS: LossConfig = field(default_factory=LossConfig)

    def validate(self) -> RunConfig:
        sem = self.MODEL.SEMANTIC
        if sem.MODE not in SEMANTIC_MODES:
            raise ConfigError(f"MODEL.SEMANTIC.MODE: {sem.MODE!r} is not one of {', '.join(SEMANTIC_MODES)}")
        if sem.FUSION not in FUSION_KINDS:
            raise ConfigError(f"MODEL.SEMANTIC.FUSION: {sem.FUSION!r} is not one of {', '.join(FUSION_KINDS)}")
        if not self.MODEL.USE_SEMANTIC_CONTEXT and sem.MODE != "none":
            raise ConfigError(
                f"MODEL.USE_SEMANTIC_CONTEXT is false but MODEL.SEMANTIC.MODE is {sem.MODE!r}: "
                "set MODEL.SEMANTIC.MODE=none, or MODEL.USE_SEMANTIC_CONTEXT=true"
            )
        if self.MODEL.USE_SEMANTIC_CONTEXT and sem.MODE == "none":
            raise ConfigError(
                "MODEL.SEMANTIC.MODE is none but MODEL.USE_SEMANTIC_CONTEXT is true: "
                "set MODEL.USE_SEMANTIC_CONTEXT=false for the spectral-only baseline"
            )
        if self.TRAIN.PRECISION not in PRECISIONS:
            raise ConfigError(f"TRAIN.PRECISION: {self.TRAIN.PRECISION!r} is not one of auto, fp32, bf16")
        if self.AUG.WHERE not in AUG_PLACES:
            raise ConfigError(f"AUG.WHERE: {self.AUG.WHERE!r} is not one of {', '.join(AUG_PLACES)}")
        for key, pair in (
            ("AUG.JPEG_QUALITY", self.AUG.JPEG_QUALITY),
            ("AUG.BLUR_SIGMA", self.AUG.BLUR_SIGMA),
            ("AUG.NOISE_STD", self.AUG.NOISE_STD),
        ):
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ConfigError(f"{key}: expected [low, high] with low <= high, got {pair}")
        # a set of names: one order (and each name once), so that `b,a` is the configuration `a,b` is
        self.DATA.GENERATORS = sorted(set(self.DATA.GENERATORS))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """What makes a run this run: the config, with the keys that change how it is computed but not its
        results (NOT_IDENTITY) at their defaults, and keys added later (ADDED_LATER) left out at their old
        behaviour."""
        data, defaults = self.to_dict(), RunConfig().to_dict()
        for key in NOT_IDENTITY:
            mine, leaf = _section(data, key)
            mine[leaf] = _section(defaults, key)[0][leaf]
        for key, before in ADDED_LATER.items():
            mine, leaf = _section(data, key)
            if mine[leaf] == before:
                del mine[leaf]
        return data

    def digest(self) -> str:
        """sha256 of the canonical JSON form of `identity`: equal configs hash equal whatever file they came from
        (and configs at NOT_IDENTITY's defaults as they did before it existed)."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()


def _section(data: dict, key: str) -> tuple[dict, str]:
    """The nested dict of `data` that holds dotted `key` (e.g. TRAIN.EARLY_STOP -> data["TRAIN"]), and its leaf."""
    *parents, leaf = key.split(".")
    for p in parents:
        data = data[p]
    return data, leaf


def check_ranges(cfg: RunConfig, keys: typing.Collection[str] | None = None) -> RunConfig:
    """Out-of-range values (RANGES, and what makes no model) -> ConfigError naming the key. Only `keys` when
    given. Applied to what a user gives (files, `--set`), not to configs read back from checkpoints: a bound
    added later must not lock a user out of a model trained before it."""

    def wanted(key: str) -> bool:
        return keys is None or key in keys

    for key, (lo, hi) in RANGES.items():
        if not wanted(key):
            continue
        section, *rest = key.split(".")
        value = getattr(cfg, section)
        for name in rest:
            value = getattr(value, name)
        for v in value if isinstance(value, list) else [value]:
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                want = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"within [{lo}, {hi}]"
                raise ConfigError(f"{key}: {value!r} is out of range (expected {want})")
    if (wanted("MODEL.SCA_HEADS") or wanted("MODEL.HIDDEN_DIM")) and cfg.MODEL.HIDDEN_DIM % cfg.MODEL.SCA_HEADS:
        raise ConfigError(
            f"MODEL.SCA_HEADS: {cfg.MODEL.SCA_HEADS} does not divide MODEL.HIDDEN_DIM={cfg.MODEL.HIDDEN_DIM}"
        )
    if wanted("MODEL.DROPOUT") and cfg.MODEL.DROPOUT >= 1:
        raise ConfigError(f"MODEL.DROPOUT: {cfg.MODEL.DROPOUT} drops everything (expected 0 <= p < 1)")
    if (wanted("TRAIN.MIN_LR") or wanted("TRAIN.BASE_LR")) and cfg.TRAIN.MIN_LR > cfg.TRAIN.BASE_LR:
        raise ConfigError(f"TRAIN.MIN_LR: {cfg.TRAIN.MIN_LR} is above TRAIN.BASE_LR={cfg.TRAIN.BASE_LR} (the learning "
                          "rate warms up to BASE_LR, then decays to MIN_LR)")  # fmt: skip
    if wanted("LOSS.TEMPERATURE") and cfg.LOSS.TEMPERATURE <= 0:
        raise ConfigError(f"LOSS.TEMPERATURE: {cfg.LOSS.TEMPERATURE} (expected > 0)")
    fixed = {  # no effect: a value other than the default would only mislead
        "PROMPTS_PATH": "the prompt bank is fixed into the feature store at extraction (`semspai extract-clip "
        "--prompts FILE`, one class name a line); training and eval take it from there",
        "PROMPT_TEMPLATE": f"every prompt is {PROMPT_TEMPLATE!r} filled with a class name of the store's prompt bank, "
        "made at extraction (`semspai extract-clip --prompts FILE` chooses the names; the template is fixed)",
    }
    for key, why in fixed.items():
        if wanted(f"DATA.{key}") and getattr(cfg.DATA, key) != getattr(DataConfig, key):
            raise ConfigError(f"DATA.{key}: {why}: leave this key out")
    return cfg


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # --set DATA.GENERATORS=a,b,c or AUG.JPEG_QUALITY=50,100
            items = [v.strip() for v in value.split(",") if v.strip()]
            try:
                value = items if item_tp is str else [yaml.safe_load(v) for v in items]
            except yaml.YAMLError as exc:
                raise ConfigError(f"{key}: {value!r} is not a comma-separated list of values") from exc
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .nan passes every range check (comparisons are false) and .inf overflows
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (known under {prefix or 'the top level'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`A.B.C=value` -> {"A": {"B": {"C": value}}}; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. TRAIN.EPOCHS=5")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {yaml_problem(exc)}") from exc
    for p in reversed(parts):
        value = {p: value}
    return value


def shipped_config(name: str) -> Path:
    """A run config shipped in configs/ (e.g. `demo`)."""
    return Path(str(resources.files("semspai.configs") / f"{name}.yaml"))


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (its own message quotes the text over several)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        return exc.problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")
    return " ".join(str(exc).split())


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last
    silently: a forgotten earlier line would win over the one being edited, or the other way round)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: explicit keys may override merged ones
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
            except TypeError:  # a list or mapping as a key: the base class says so in its own words
                break
            if twice:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (), saved: bool = False) -> RunConfig:
    """The dataclass defaults <- `path` <- each `KEY=VALUE` override, then validated. `saved`: `path` is a run's
    own config.yaml, whose values are not range-checked again (only the overrides are)."""
    data: dict = {}
    if path is not None:
        try:
            loaded = yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader) or {}  # noqa: S506 (a safe loader)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                              f"{exc.start}); save it as UTF-8") from exc  # fmt: skip
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = loaded
    layers = [parse_override(text) for text in overrides]
    # of the two keys that say "spectral only", one given by --set alone decides the other, whatever the file set
    # (`--set MODEL.SEMANTIC.MODE=none` over a file that sets both turns the ablation off, not into an error)
    use, mode = ("MODEL", "USE_SEMANTIC_CONTEXT"), ("MODEL", "SEMANTIC", "MODE")
    for given, other in ((use, mode), (mode, use)):
        if any(_has(layer, given) for layer in layers) and not any(_has(layer, other) for layer in layers):
            data = _without(data, other)
    for layer in layers:
        data = _merge(data, layer)
    if not saved:
        return config_from_dict(data)
    return check_ranges(config_from_dict(data, saved=True), [t.split("=", 1)[0].strip() for t in overrides])


def _has(data: dict, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def _without(data: dict, path: tuple[str, ...]) -> dict:
    """A copy of nested `data` without the key at `path` (the same when it has none)."""
    if not _has(data, path):
        return data
    head, *rest = path
    return {**data, head: _without(data[head], tuple(rest))} if rest else {k: v for k, v in data.items() if k != head}


def config_from_dict(data: dict, saved: bool = False) -> RunConfig:
    """A config from a (partial) dict over the defaults. Of the two keys that say "spectral only", the one
    given decides the other when only one is (USE_SEMANTIC_CONTEXT false <-> SEMANTIC.MODE none); both given
    and disagreeing is an error (in validate). `saved`: a config read back from a checkpoint, whose values
    are not range-checked again (check_ranges)."""
    model = data.get("MODEL")
    if isinstance(model, dict):
        semantic = model.get("SEMANTIC")
        has_mode = isinstance(semantic, dict) and "MODE" in semantic
        if "USE_SEMANTIC_CONTEXT" in model and not has_mode and model["USE_SEMANTIC_CONTEXT"] is False:
            data = _merge(data, {"MODEL": {"SEMANTIC": {"MODE": "none"}}})
        elif has_mode and "USE_SEMANTIC_CONTEXT" not in model and semantic["MODE"] == "none":
            data = _merge(data, {"MODEL": {"USE_SEMANTIC_CONTEXT": False}})
    cfg = _build(RunConfig, data).validate()
    return cfg if saved else check_ranges(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the form `--config` reads back)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
