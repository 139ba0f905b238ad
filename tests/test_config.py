"""The typed, frozen config: YAML files, unknown keys, type checks, --set overrides, round trip."""
from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from pipeline.core.config import Config, ConfigError, from_dict, load_config, parse_override, to_dict, to_yaml

from conftest import REPO

CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def test_default_config_is_shipped():
    assert (REPO / "configs" / "default.yaml").is_file()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert isinstance(cfg, Config)
    # every value written in the file is the value in the config (nested sections such as search.arch too)
    def check(node, values, where):
        for key, value in values.items():
            got = getattr(node, key)
            if dataclasses.is_dataclass(got):
                check(got, value, f"{where}.{key}")
            else:
                assert got == value, f"{path.name}: {where}.{key}"

    for section, values in raw.items():
        if isinstance(values, dict):
            check(getattr(cfg, section), values, section)
        else:
            assert getattr(cfg, section) == values


def test_default_yaml_values():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.model.name == "airnet_tiny"
    assert cfg.train.weight_decay == pytest.approx(5e-4)
    assert cfg.infer.tta == ["identity", "shift_left", "shift_right"]
    assert str(cfg.run_dir) == "runs/demo"


def test_no_path_gives_builtin_defaults():
    assert load_config(None) == Config()


def test_unknown_top_level_key_is_named():
    with pytest.raises(ConfigError, match="'epochs'"):
        from_dict({"epochs": 3})


def test_unknown_section_key_is_named_with_its_section():
    with pytest.raises(ConfigError) as err:
        from_dict({"train": {"epoch": 3}})
    assert "train.epoch" in str(err.value)
    assert "epochs" in str(err.value)  # the valid keys are listed


def test_unknown_key_from_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 2\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.lerning_rate" in str(err.value) and "bad.yaml" in str(err.value)


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"model\.nmae"):
        load_config(None, ["model.nmae=resnet18"])


@pytest.mark.parametrize("values, key", [
    ({"train": {"epochs": "ten"}}, "train.epochs"),          # str for int
    ({"data": {"root": ["a", "b"]}}, "data.root"),           # list for str
    ({"train": {"epochs": True}}, "train.epochs"),           # bool is not an int
    ({"train": {"nesterov": 1}}, "train.nesterov"),          # int is not a bool
    ({"train": {"lr": True}}, "train.lr"),                   # bool is not a float
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"infer": {"tta": "hflip"}}, "infer.tta"),              # str for list
    ({"infer": {"tta": ["hflip", 3]}}, "infer.tta[1]"),      # wrong item type
    ({"train": "fast"}, "train"),                            # scalar for a section
    ({"model": {"kwargs": [1]}}, "model.kwargs"),            # list for a mapping
    ({"train": {"class_weights": "inverse"}}, "train.class_weights"),
])
def test_wrong_types_name_the_key(values, key):
    with pytest.raises(ConfigError) as err:
        from_dict(values)
    assert key in str(err.value)


def test_ints_are_accepted_for_floats():
    cfg = from_dict({"train": {"lr": 1, "warmup_epochs": 2}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.train.warmup_epochs, float)


def test_literal_choices_are_enforced():
    assert from_dict({"train": {"optimizer": "adamw"}}).train.optimizer == "adamw"
    with pytest.raises(ConfigError) as err:
        from_dict({"train": {"optimizer": "adam"}})
    assert "train.optimizer" in str(err.value) and "sgd" in str(err.value)
    with pytest.raises(ConfigError, match="submit.format"):
        from_dict({"submit": {"format": "csv"}})


def test_class_weights_accepts_balanced_a_list_or_null():
    assert from_dict({"train": {"class_weights": "balanced"}}).train.class_weights == "balanced"
    assert from_dict({"train": {"class_weights": [1, 2.5]}}).train.class_weights == [1.0, 2.5]
    assert from_dict({"train": {"class_weights": None}}).train.class_weights is None


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(REPO / "configs" / "default.yaml", [
        "train.epochs=3", "train.lr=0.5", "infer.tta=[identity, hflip]", "data.subset=null",
        "train.folds=[0, 2]", "model.kwargs={widths: [8, 16, 32]}", "experiment=exp_b", "train.nesterov=false",
    ])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 0.5
    assert cfg.infer.tta == ["identity", "hflip"]
    assert cfg.data.subset is None
    assert cfg.train.folds == [0, 2]
    assert cfg.model.kwargs == {"widths": [8, 16, 32]}
    assert cfg.experiment == "exp_b"
    assert cfg.train.nesterov is False
    # values not overridden still come from the file
    assert cfg.model.name == "airnet_tiny"


def test_override_later_wins_and_bad_override_text_fails():
    assert load_config(None, ["train.epochs=3", "train.epochs=4"]).train.epochs == 4
    assert parse_override("data.subset=100") == ("data.subset", 100)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=three"])


def test_scientific_notation_is_a_float():
    """``--set train.lr=3e-4`` is how everyone writes a learning rate (PyYAML reads it as a string)."""
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)
    assert from_dict({"train": {"weight_decay": "1e-5"}}).train.weight_decay == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=1e3"])  # still not an int


def test_augment_section_checks_values():
    with pytest.raises(ConfigError, match="augment.level"):
        from_dict({"augment": {"level": 40, "n_level": 30}})


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.experiment = "other"


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_to_yaml_round_trips():
    cfg = load_config(REPO / "configs" / "default.yaml", [
        "train.class_weights=[1, 2, 3]", "augment.ops=[Rotate, Solarize]", "data.group_col=patient",
        "model.kwargs={stem: 8}", "ensemble.weights=[1, 0.5]", "augment.sizes=[16, 32]",
        "augment.size_epochs=[0, 2]",
    ])
    text = to_yaml(cfg)
    again = from_dict(yaml.safe_load(text))
    assert again == cfg
    assert to_yaml(again) == text
    assert to_dict(again) == to_dict(cfg)


def test_override_that_is_not_yaml_is_a_one_line_error(capsys):
    from pipeline import folds

    with pytest.raises(ConfigError, match=r"--set 'train.lr=\[1,': the value is not valid YAML \(.*line 1, column 4"):
        load_config(None, ["train.lr=[1,"])
    assert folds.main(["--set", "train.lr=[1,"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "train.lr=[1," in err and "Traceback" not in err


def test_invalid_yaml_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "\n" not in str(err.value) and "line 3" in str(err.value)


def test_data_input_keys_are_checked():
    assert load_config(None, ["data.csv_encoding=latin-1"]).data.csv_encoding == "latin-1"
    with pytest.raises(ConfigError, match="data.csv_encoding: unknown encoding 'klingon'"):
        load_config(None, ["data.csv_encoding=klingon"])
    assert load_config(None, ["data.max_pixels=null"]).data.max_pixels is None
    with pytest.raises(ConfigError, match="data.max_pixels: must be positive"):
        load_config(None, ["data.max_pixels=0"])


# --------------------------------------------------------------------------- ranges of sizes, counts and fractions


def _numeric(tp) -> bool:
    """Whether a type hint holds numbers: int or float, a list of them (nested too), or a union with one."""
    if tp in (int, float):
        return True
    return any(_numeric(arg) for arg in typing.get_args(tp) if arg is not type(None))


def _depth(tp) -> int:
    """How deep the lists of a type hint nest (0: a plain number)."""
    if typing.get_origin(tp) in (list, tuple):
        return 1 + _depth(typing.get_args(tp)[0])
    return max((_depth(a) for a in typing.get_args(tp) if typing.get_origin(a) in (list, tuple)), default=0)


def _number_keys(cls=Config, prefix: str = ""):
    """(dotted key, section class, field name, list depth) of every number key of the config, sections within."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _number_keys(hints[f.name], f"{key}.")
        elif _numeric(hints[f.name]):
            yield key, cls, f.name, _depth(hints[f.name])


def test_every_size_count_and_fraction_key_has_a_range():
    keys = list(_number_keys())
    assert len(keys) >= 85 and {"infer.batch_size", "search.arch.channels", "seed"} <= {k for k, *_ in keys}
    assert [key for key, cls, name, _ in keys if name not in cls.LIMITS] == []


def _outside(limit):
    """A value just outside ``limit``."""
    if limit.low is not None:
        return limit.low if limit.low_open else limit.low - 1
    return limit.high + 1


@pytest.mark.parametrize("key, cls, name, depth", [pytest.param(*k, id=k[0]) for k in _number_keys()])
def test_a_value_out_of_range_is_refused_at_load_naming_the_key(key, cls, name, depth):
    value = _outside(cls.LIMITS[name])
    for _ in range(depth):
        value = [value]
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"])
    assert f"{key}: " in str(err.value) and f"must be {cls.LIMITS[name]}" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_zero_inference_batch_is_a_one_line_error_before_anything_runs(tmp_path, capsys):
    from pipeline import train

    assert train.main(["--set", f"runs_dir={tmp_path}", "--set", "infer.batch_size=0"]) == 1
    err = capsys.readouterr().err
    assert err == "error: configs/default.yaml: infer.batch_size: must be positive, got 0\n"
    assert not any(tmp_path.iterdir())  # refused before a run folder was made
