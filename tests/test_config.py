import re

import pytest
from conftest import ROOT

from config import Config, config_changes, load_config, save_config
from errors import UserError
from registries import check_names


def test_defaults_preset_and_overrides_are_merged_in_order(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 3e-4\n  steps: 10\nflow:\n  coupling: ot\n")
    cfg = load_config(preset, ["train.steps=20", "train.trackers=[]", "model.width=64"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # PyYAML alone reads '3e-4' as a string
    assert cfg.train.steps == 20 and cfg.flow.coupling == "ot" and cfg.model.width == 64
    assert cfg.train.trackers == [] and cfg.train.batch_size == Config().train.batch_size


def test_values_are_coerced_to_the_declared_type():
    cfg = load_config(None, ["train.lr=1e-3", "train.steps=1e3", "train.betas=[0.5, 0.9]",
                             "train.trackers=tensorboard"])
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 1000 and cfg.train.betas == [0.5, 0.9]
    assert cfg.train.trackers == ["tensorboard"]


def test_no_and_yes_stay_words_in_text_fields_and_are_booleans_in_switches(tmp_path):
    """YAML 1.1 would read `no` as False: `train.mixed_precision=no` must stay the word 'no'."""
    cfg = load_config(None, ["train.mixed_precision=no", "data.hflip=yes", "train.ema_warmup=off"])
    assert cfg.train.mixed_precision == "no" and cfg.data.hflip is True and cfg.train.ema_warmup is False
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n  compile: true\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.mixed_precision == "no" and cfg.train.compile is True


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "unknown config key train.lrr; did you mean train.lr?"),
    (["trian.lr=1"], "unknown config key trian; did you mean train?"),
    (["train.steps=abc"], "config key train.steps must be int, got 'abc'"),
    (["train.steps=1.5"], "config key train.steps must be int, got 1.5"),
    (["train.lr=yes"], "config key train.lr must be float, got 'yes'"),
    (["train.steps=0"], "config key train.steps must be positive, got 0"),
    (["train.ema_decay=2"], "config key train.ema_decay must be in [0, 1), got 2.0"),
    (["train.ema_decay=1"], "config key train.ema_decay must be in [0, 1), got 1.0"),
    (["flow.label_dropout=-0.1"], "config key flow.label_dropout must be in [0, 1), got -0.1"),
    (["model.dropout=1.5"], "config key model.dropout must be in [0, 1), got 1.5"),
    (["flow.sigma_min=1"], "config key flow.sigma_min must be in [0, 1), got 1.0"),
    (["train.betas=[0.9, 1.0]"], "config key train.betas must hold two numbers in [0, 1), got [0.9, 1.0]"),
    (["train.lr=nan"], "config key train.lr must be positive, got nan"),
    (["train.grad_clip=-1"], "config key train.grad_clip must be ≥ 0, got -1.0"),
    (["data.num_workers=-2"], "config key data.num_workers must be ≥ 0, got -2"),
    (["model.width=0"], "config key model.width must be positive, got 0"),
    (["flow.mode_scale=2"], "config key flow.mode_scale must be in [-1, 1.75194], got 2.0"),
    (["train.lr=1e-3", "train.lr_min=1e-2"], "config key train.lr_min (0.01) must not exceed train.lr (0.001)"),
    (["sample.atol=0", "sample.rtol=0"], "config keys sample.atol and sample.rtol must not both be 0"),
    (["train=3"], "config key train is a section"),
    (["train.lr"], "is not of the form key.sub=value"),
])
def test_bad_overrides_fail_with_one_clear_sentence(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, override)


def test_unknown_key_in_a_yaml_file_names_its_dotted_path(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("flow:\n  sigma_mn: 0.1\n")
    with pytest.raises(UserError, match=r"flow.sigma_mn; did you mean flow.sigma_min\?"):
        load_config(preset)


@pytest.mark.parametrize("key, value", [("model.name", "mpl"), ("flow.path", "curved"), ("flow.coupling", "sinkhorn"),
                                        ("data.name", "moon"), ("flow.time_density", "logitnormal"),
                                        ("model.activation", "relu"), ("model.time_input", "linear")])
def test_bad_registry_names_fail_before_any_data_is_loaded(key, value):
    with pytest.raises(UserError, match=f"config key {key}: unknown name '{value}'"):
        check_names(load_config(None, [f"{key}={value}"]))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "flow.coupling=ot", "train.betas=[0.8,0.95]", "data.path=a b.npy"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_missing_or_invalid_yaml_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("preset", sorted(p for p in (ROOT / "configs").glob("**/*.yaml")
                                           if "accelerate" not in p.parts), ids=lambda p: p.name)
def test_every_preset_loads_and_names_registered_parts(preset):
    check_names(load_config(preset))


@pytest.mark.parametrize("preset", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_the_accelerate_configs_are_what_accelerate_launch_reads(preset):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(preset))
    assert config.distributed_type in ("FSDP", "DEEPSPEED")
    assert config.fsdp_config.get("fsdp_version") == 2 if config.distributed_type == "FSDP" else (
        config.deepspeed_config["zero_stage"] == 2)


def test_the_keys_allowed_to_change_on_resume_and_the_others():
    old = load_config(None, ["train.steps=100", "flow.coupling=ot"])
    new = load_config(None, ["train.steps=200", "train.log_every=5", "sample.steps=8", "flow.coupling=independent",
                             "data.path=other.npy"])
    allowed, forbidden = config_changes(old, new)
    assert allowed == [("train.steps", 100, 200), ("train.log_every", 100, 5), ("sample.steps", None, 8)]
    assert forbidden == [("data.path", "", "other.npy"), ("flow.coupling", "ot", "independent")]
