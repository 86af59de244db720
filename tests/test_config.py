"""Run configs: defaults, YAML + `--set` overrides, errors naming the key, the semantic-mode rule, round trip."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import yaml

from semspai.pipeline.config import (
    SEMANTIC_MODES,
    ConfigError,
    RunConfig,
    UniqueKeyLoader,
    check_ranges,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
    shipped_config,
)


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_load_and_are_valid():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.MODEL.USE_SEMANTIC_CONTEXT is True and cfg.MODEL.SEMANTIC.MODE in SEMANTIC_MODES
    assert cfg.DATA.GENERATORS == []
    assert cfg.digest() == RunConfig().digest()


def test_every_design_key_exists():
    d = RunConfig().to_dict()
    for key in (
        "MODEL.USE_SEMANTIC_CONTEXT",
        "MODEL.SEMANTIC.MODE",
        "MODEL.SEMANTIC.FUSION",
        "MODEL.CLIP.NAME",
        "MODEL.CLIP.WEIGHTS",
        "DATA.PROMPTS_PATH",
        "LOSS.SEMANTIC_WEIGHT",
        "DATA.GENERATORS",
        "TRAIN.EPOCHS",
        "TRAIN.BATCH_SIZE",
        "TRAIN.BASE_LR",
        "TRAIN.SEED",
    ):
        node = d
        for part in key.split("."):
            assert part in node, f"{key} is missing"
            node = node[part]


def test_shipped_configs_load():
    for path in sorted(shipped_config("x").parent.glob("*.yaml")):
        assert isinstance(load_config(path), RunConfig)


def test_yaml_file_then_overrides(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"TRAIN": {"EPOCHS": 3, "BASE_LR": 0.001}, "DATA": {"GENERATORS": ["a"]}})
    cfg = load_config(path, ["TRAIN.EPOCHS=7", "MODEL.SEMANTIC.FUSION=gate"])
    assert cfg.TRAIN.EPOCHS == 7  # the override wins over the file
    assert cfg.TRAIN.BASE_LR == 0.001  # the file wins over the default
    assert cfg.DATA.GENERATORS == ["a"]
    assert cfg.MODEL.SEMANTIC.FUSION == "gate"
    assert cfg.MODEL.SEMANTIC.MODE == RunConfig().MODEL.SEMANTIC.MODE  # siblings of an override are kept
    assert cfg.TRAIN.BATCH_SIZE == RunConfig().TRAIN.BATCH_SIZE


@pytest.mark.parametrize(
    "text,expected",
    [
        ("TRAIN.EPOCHS=5", {"TRAIN": {"EPOCHS": 5}}),
        ("TRAIN.BASE_LR=0.0003", {"TRAIN": {"BASE_LR": 0.0003}}),
        ("MODEL.USE_SEMANTIC_CONTEXT=false", {"MODEL": {"USE_SEMANTIC_CONTEXT": False}}),
        ("DATA.GENERATORS=[a, b]", {"DATA": {"GENERATORS": ["a", "b"]}}),
        ("MODEL.CLIP.NAME=", {"MODEL": {"CLIP": {"NAME": ""}}}),
        ("A=x=y", {"A": "x=y"}),  # only the first = separates key and value
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["TRAIN.EPOCHS", "TRAIN..EPOCHS=1", "=1", "A.B=[unclosed"])
def test_bad_override_syntax(text):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


@pytest.mark.parametrize(
    "override,path,expected",
    [
        ("TRAIN.EPOCHS=5", ("TRAIN", "EPOCHS"), 5),
        ("TRAIN.BASE_LR=0.001", ("TRAIN", "BASE_LR"), 0.001),
        ("TRAIN.BASE_LR=1e-4", ("TRAIN", "BASE_LR"), 1e-4),  # YAML 1.1 reads this as a string
        ("TRAIN.WARMUP_EPOCHS=2", ("TRAIN", "WARMUP_EPOCHS"), 2.0),  # an int where a float is wanted
        ("DATA.SKIP_MISSING=true", ("DATA", "SKIP_MISSING"), True),
        ("DATA.GENERATORS=a,b,c", ("DATA", "GENERATORS"), ["a", "b", "c"]),
        ("DATA.GENERATORS=progan", ("DATA", "GENERATORS"), ["progan"]),
        ("DATA.GENERATORS=[sd3, flux, sd3]", ("DATA", "GENERATORS"), ["flux", "sd3"]),  # a set: sorted, once each
        ("DATA.GENERATORS=", ("DATA", "GENERATORS"), []),
        ("AUG.JPEG_QUALITY=[60, 90]", ("AUG", "JPEG_QUALITY"), [60, 90]),
        ("AUG.JPEG_QUALITY=60,90", ("AUG", "JPEG_QUALITY"), [60, 90]),
        ("AUG.BLUR_SIGMA=0.5,1.5", ("AUG", "BLUR_SIGMA"), [0.5, 1.5]),
        (
            "MODEL.CLIP.WEIGHTS=pretrained/clip/ViT-B-32.safetensors",
            ("MODEL", "CLIP", "WEIGHTS"),
            "pretrained/clip/ViT-B-32.safetensors",
        ),
        ("MODEL.CLIP.NAME=ViT-B-16", ("MODEL", "CLIP", "NAME"), "ViT-B-16"),
    ],
)
def test_set_values_are_typed(override, path, expected):
    node = load_config(None, [override])
    for part in path:
        node = getattr(node, part)
    assert node == expected and type(node) is type(expected)
    if isinstance(expected, list):
        assert [type(v) for v in node] == [type(v) for v in expected]


def test_float_with_exponent_in_a_yaml_file(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", "TRAIN:\n  BASE_LR: 5e-4\n  MIN_LR: 1.0e-6\n"))
    assert (cfg.TRAIN.BASE_LR, cfg.TRAIN.MIN_LR) == (5e-4, 1e-6)


@pytest.mark.parametrize(
    "data,key",
    [
        ({"TRIAN": {"EPOCHS": 1}}, "TRIAN"),
        ({"TRAIN": {"EPOCH": 1}}, "TRAIN.EPOCH"),
        ({"MODEL": {"SEMANTIC": {"MOD": "global"}}}, "MODEL.SEMANTIC.MOD"),
    ],
)
def test_unknown_keys_are_named(tmp_path, data, key):
    with pytest.raises(ConfigError, match=rf"unknown config key {key}\b"):
        load_config(write_yaml(tmp_path / "c.yaml", data))
    override = key + "=1"
    with pytest.raises(ConfigError, match=rf"unknown config key {key}\b"):
        load_config(None, [override])


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["TRAIN.EPOHCS=3"])
    assert "EPOCHS" in str(info.value) and "BATCH_SIZE" in str(info.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("TRAIN.EPOCHS=many", "TRAIN.EPOCHS"),
        ("TRAIN.EPOCHS=2.5", "TRAIN.EPOCHS"),
        ("TRAIN.EPOCHS=true", "TRAIN.EPOCHS"),
        ("TRAIN.BASE_LR=fast", "TRAIN.BASE_LR"),
        ("TRAIN.BASE_LR=true", "TRAIN.BASE_LR"),
        ("MODEL.USE_SEMANTIC_CONTEXT=1", "MODEL.USE_SEMANTIC_CONTEXT"),
        ("MODEL.USE_SEMANTIC_CONTEXT=maybe", "MODEL.USE_SEMANTIC_CONTEXT"),
        ("MODEL.CLIP.NAME=[a, b]", "MODEL.CLIP.NAME"),
        ("MODEL.SEMANTIC=global", "MODEL.SEMANTIC"),
        ("DATA.GENERATORS={a: 1}", "DATA.GENERATORS"),
        ("AUG.JPEG_QUALITY=[50, high]", "AUG.JPEG_QUALITY[1]"),
        ("AUG.JPEG_QUALITY=50,high", "AUG.JPEG_QUALITY[1]"),
        ("AUG.JPEG_QUALITY=50,[", "AUG.JPEG_QUALITY"),
        ("AUG.BLUR_SIGMA=0.5,1e", "AUG.BLUR_SIGMA[1]"),
    ],
)
def test_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(key + ":"), str(info.value)


def test_wrong_type_in_a_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^TRAIN\.BATCH_SIZE: expected an integer"):
        load_config(write_yaml(tmp_path / "c.yaml", {"TRAIN": {"BATCH_SIZE": "sixteen"}}))
    with pytest.raises(ConfigError, match="TRAIN: expected a mapping"):
        load_config(write_yaml(tmp_path / "c.yaml", {"TRAIN": [1, 2]}))


def test_generator_order_is_not_another_configuration():
    a, b = load_config(None, ["DATA.GENERATORS=b,a"]), load_config(None, ["DATA.GENERATORS=a,b,a"])
    assert a.DATA.GENERATORS == b.DATA.GENERATORS == ["a", "b"] and a.digest() == b.digest()


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(write_yaml(tmp_path / "bad.yaml", "TRAIN: [unclosed\n"))
    assert "\n" not in str(info.value)  # one line, with the place
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n"))
    (tmp_path / "latin1.yaml").write_bytes("# café\nTRAIN:\n  EPOCHS: 3\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 5\); save it as UTF-8"):
        load_config(tmp_path / "latin1.yaml")
    assert load_config(write_yaml(tmp_path / "empty.yaml", "")) == RunConfig()
    twice = "TRAIN:\n  EPOCHS: 3\n  BASE_LR: 0.001\n  EPOCHS: 30\n"
    with pytest.raises(ConfigError, match=r"not valid YAML: found the key 'EPOCHS' twice \(line 4, column 3\)$"):
        load_config(write_yaml(tmp_path / "twice.yaml", twice))
    sections = "TRAIN:\n  EPOCHS: 3\nDATA:\n  MAX_PATCHES: 4\nTRAIN:\n  BASE_LR: 0.001\n"
    with pytest.raises(ConfigError, match="found the key 'TRAIN' twice"):
        load_config(write_yaml(tmp_path / "sections.yaml", sections))
    anchors = "AUG:\n  JPEG_QUALITY: &q [60, 90]\nDATA:\n  GENERATORS: *q\n"  # anchors and aliases still work
    assert load_config(write_yaml(tmp_path / "anchors.yaml", anchors)).AUG.JPEG_QUALITY == [60, 90]
    merge = "x: &base\n  EPOCHS: 3\n  BASE_LR: 0.1\nTRAIN:\n  <<: *base\n  BASE_LR: 0.001\n"
    loaded = yaml.load(merge, Loader=UniqueKeyLoader)  # a merged key given again explicitly is not "twice"
    assert loaded["TRAIN"] == {"EPOCHS": 3, "BASE_LR": 0.001}
    with pytest.raises(ConfigError, match="not valid YAML: found unhashable key"):
        load_config(write_yaml(tmp_path / "unhashable.yaml", "? [a, b]\n: 1\n"))
    same_leaf = "TRAIN:\n  EPOCHS: 3\nLOSS:\n  EPOCHS_UNUSED: 1\n"  # one name in two mappings is fine
    with pytest.raises(ConfigError, match="LOSS.EPOCHS_UNUSED"):  # (the unknown key is, as always)
        load_config(write_yaml(tmp_path / "ok.yaml", same_leaf))


@pytest.mark.parametrize(
    "use,mode,ok",
    [
        (True, "global", True),
        (True, "global_local", True),
        (False, "none", True),
        (False, "global", False),
        (False, "global_local", False),
        (True, "none", False),
    ],
)
def test_semantic_context_and_mode_must_agree(use, mode, ok):
    overrides = [f"MODEL.USE_SEMANTIC_CONTEXT={str(use).lower()}", f"MODEL.SEMANTIC.MODE={mode}"]
    if ok:
        cfg = load_config(None, overrides)
        assert (cfg.MODEL.USE_SEMANTIC_CONTEXT, cfg.MODEL.SEMANTIC.MODE) == (use, mode)
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert "MODEL.USE_SEMANTIC_CONTEXT" in msg and "MODEL.SEMANTIC.MODE" in msg
    assert "set MODEL." in msg  # says how to fix it


@pytest.mark.parametrize("given", ["MODEL.USE_SEMANTIC_CONTEXT=false", "MODEL.SEMANTIC.MODE=none"])
def test_either_spectral_only_key_alone_implies_the_other(tmp_path, given):
    cfg = load_config(None, [given])
    assert (cfg.MODEL.USE_SEMANTIC_CONTEXT, cfg.MODEL.SEMANTIC.MODE) == (False, "none")
    key, value = given.split("=")
    section, *rest = key.split(".")
    nested: object = yaml.safe_load(value)
    for name in reversed(rest):
        nested = {name: nested}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({section: nested}))  # the same from a file
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.MODEL.USE_SEMANTIC_CONTEXT, cfg.MODEL.SEMANTIC.MODE) == (False, "none")
    # one given by --set alone decides the other over what a file set (the ablation recipe over the demo config,
    # which sets both); the two given together still have to agree
    (tmp_path / "m.yaml").write_text("MODEL:\n  USE_SEMANTIC_CONTEXT: true\n  SEMANTIC:\n    MODE: global\n")
    cfg = load_config(tmp_path / "m.yaml", [given])
    assert (cfg.MODEL.USE_SEMANTIC_CONTEXT, cfg.MODEL.SEMANTIC.MODE) == (False, "none")
    (tmp_path / "n.yaml").write_text("MODEL:\n  USE_SEMANTIC_CONTEXT: false\n  SEMANTIC:\n    MODE: none\n")
    cfg = load_config(tmp_path / "n.yaml", ["MODEL.SEMANTIC.MODE=global_local"])
    assert (cfg.MODEL.USE_SEMANTIC_CONTEXT, cfg.MODEL.SEMANTIC.MODE) == (True, "global_local")
    with pytest.raises(ConfigError, match="MODEL.USE_SEMANTIC_CONTEXT is false but MODEL.SEMANTIC.MODE is 'global'"):
        load_config(tmp_path / "m.yaml", ["MODEL.USE_SEMANTIC_CONTEXT=false", "MODEL.SEMANTIC.MODE=global"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("MODEL.SEMANTIC.MODE=local", "MODEL.SEMANTIC.MODE"),
        ("MODEL.SEMANTIC.FUSION=sum", "MODEL.SEMANTIC.FUSION"),
        ("TRAIN.PRECISION=fp16", "TRAIN.PRECISION"),
        ("AUG.JPEG_QUALITY=[90, 50]", "AUG.JPEG_QUALITY"),
        ("AUG.NOISE_STD=[0.1]", "AUG.NOISE_STD"),
        ("AUG.WHERE=gpu", "AUG.WHERE"),
        ("TRAIN.EPOCHS=0", "TRAIN.EPOCHS"),
        ("TRAIN.BATCH_SIZE=0", "TRAIN.BATCH_SIZE"),
        ("TRAIN.BASE_LR=-1", "TRAIN.BASE_LR"),
        ("TRAIN.MIN_LR=0.01", "TRAIN.MIN_LR"),  # above BASE_LR (5e-4): the cosine would climb
        ("MODEL.HIDDEN_DIM=0", "MODEL.HIDDEN_DIM"),
        ("MODEL.SCA_HEADS=3", "MODEL.SCA_HEADS"),
        ("MODEL.DROPOUT=2", "MODEL.DROPOUT"),
        ("MODEL.DROPOUT=1", "MODEL.DROPOUT"),
        ("MODEL.SEMANTIC.PROJ_DIM=0", "MODEL.SEMANTIC.PROJ_DIM"),
        ("DATA.MAX_PATCHES=0", "DATA.MAX_PATCHES"),
        ("DATA.NUM_WORKERS=-1", "DATA.NUM_WORKERS"),
        ("TRAIN.SEED=-1", "TRAIN.SEED"),
        ("AUG.JPEG_QUALITY=[10, 200]", "AUG.JPEG_QUALITY"),
        ("AUG.FLIP_PROB=1.5", "AUG.FLIP_PROB"),
        ("LOSS.TEMPERATURE=0", "LOSS.TEMPERATURE"),
        ("TRAIN.BASE_LR=.nan", "TRAIN.BASE_LR"),  # NaN passes every comparison
        ("LOSS.SEMANTIC_WEIGHT=.nan", "LOSS.SEMANTIC_WEIGHT"),
        ("TRAIN.WARMUP_EPOCHS=.inf", "TRAIN.WARMUP_EPOCHS"),
        ("AUG.NOISE_STD=[0, .nan]", r"AUG.NOISE_STD\[1\]"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(None, [override])


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "TRAIN.EPOCHS=2",
            "TRAIN.BASE_LR=1.5e-05",
            "DATA.GENERATORS=a,b",
            "MODEL.USE_SEMANTIC_CONTEXT=false",
            "MODEL.SEMANTIC.MODE=none",
            "MODEL.CLIP.WEIGHTS=my weights, v2.safetensors",
            "MODEL.CLIP.NAME=ViT-B-32",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg and again.digest() == cfg.digest()
    assert yaml.safe_load(path.read_text())["TRAIN"]["EPOCHS"] == 2


def test_digest_tracks_every_change():
    base = RunConfig()
    changed = dataclasses.replace(base, TRAIN=dataclasses.replace(base.TRAIN, SEED=1))
    assert changed.digest() != base.digest()
    assert config_from_dict(base.to_dict()).digest() == base.digest()


def test_settings_of_how_not_what_leave_the_digest_alone():
    """DATA.STORE_MEMORY_GB changes no result: a run differing in it alone is the same run. It counts at its
    default, so digests of configs with the defaults are those of before. A key added later (TRAIN.EARLY_STOP) is
    left out at the value that behaves as before it existed, so runs made before stay up to date."""
    base = load_config(None, [])
    assert load_config(None, ["DATA.STORE_MEMORY_GB=0"]).digest() == base.digest()
    assert load_config(None, ["MODEL.SPECTRAL.CHUNK_SIZE=3"]).digest() != base.digest()  # a frozen encoder's chunks
    before = base.to_dict()
    del before["TRAIN"]["EARLY_STOP"]  # the config as it was before the key existed
    assert base.digest() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert load_config(None, ["TRAIN.EARLY_STOP=2"]).digest() != base.digest()  # fewer epochs: another run
    assert load_config(None, ["DATA.NUM_WORKERS=2"]).digest() != base.digest()  # the sample order may change


def test_prompt_keys_of_old_configs_load_but_are_refused_when_given(tmp_path):
    """The prompt bank is the store's (fixed at extraction): a DATA.PROMPTS_PATH given to train would do nothing."""
    with pytest.raises(ConfigError, match=r"^DATA.PROMPTS_PATH: the prompt bank is fixed into the feature store"):
        load_config(None, [f"DATA.PROMPTS_PATH={tmp_path / 'p.txt'}"])
    with pytest.raises(
        ConfigError, match=r"^DATA.PROMPT_TEMPLATE: every prompt is 'a photo of a \{\}.' .*template is fixed"
    ):
        load_config(None, ["DATA.PROMPT_TEMPLATE='{} here'"])
    saved = tmp_path / "resolved.yaml"
    save_config(RunConfig(), saved)  # a resolved config.yaml holds both keys, at their defaults: it loads
    assert load_config(saved).DATA.PROMPT_TEMPLATE == RunConfig().DATA.PROMPT_TEMPLATE
    old = RunConfig().to_dict()
    old["DATA"]["PROMPTS_PATH"] = "/somewhere/p.txt"  # a checkpoint's config of an earlier version
    assert config_from_dict(old, saved=True).DATA.PROMPTS_PATH == "/somewhere/p.txt"
    save_config(config_from_dict(old, saved=True), tmp_path / "config.yaml")  # that run's own config.yaml
    with pytest.raises(ConfigError, match="DATA.PROMPTS_PATH"):
        load_config(tmp_path / "config.yaml")  # as a user's --config: refused
    resumed = load_config(tmp_path / "config.yaml", ["DATA.STORE_MEMORY_GB=1"], saved=True)  # as --resume reads it
    assert resumed.DATA.PROMPTS_PATH == "/somewhere/p.txt" and resumed.DATA.STORE_MEMORY_GB == 1
    with pytest.raises(ConfigError, match="TRAIN.SEED"):  # what --set gives is still checked
        load_config(tmp_path / "config.yaml", ["TRAIN.SEED=-1"], saved=True)


def test_saved_configs_are_not_range_checked_again():
    """A bound added later must not lock a user out of a checkpoint trained before it; eval's own overrides
    are still checked."""
    data = load_config().to_dict()
    data["DATA"]["NUM_WORKERS"] = -1
    with pytest.raises(ConfigError, match="DATA.NUM_WORKERS"):
        config_from_dict(data)
    saved = config_from_dict(data, saved=True)
    assert saved.DATA.NUM_WORKERS == -1
    assert check_ranges(saved, ["MODEL.SPECTRAL.CHUNK_SIZE"]) is saved
    saved.MODEL.SPECTRAL.CHUNK_SIZE = 0
    with pytest.raises(ConfigError, match="MODEL.SPECTRAL.CHUNK_SIZE"):
        check_ranges(saved, ["MODEL.SPECTRAL.CHUNK_SIZE"])
