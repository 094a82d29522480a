"""The run config: one schema, TOML presets that round-trip, --set overrides validated with the field named."""

import tomllib

import pytest

from supsup.config import RunConfig, parse_setting
from supsup.presets import get_preset, has_small, preset_names, read_config_file


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_toml_and_json(name, tmp_path):
    for small in (False, True) if has_small(name) else (False,):
        config = get_preset(name, small=small)
        path = tmp_path / f"{name}.toml"
        path.write_text(config.to_toml())
        assert read_config_file(path).to_dict() == config.to_dict()
        assert RunConfig.from_dict(config.to_dict()) == config


def test_the_presets_cover_the_papers_experiments():
    names = set(preset_names())
    for name in ("split-fashion-mnist", "split-cifar100", "split-imagenet", "hopsupsup-split-mnist",
                 "permuted-mnist-abatche", "nns-permuted-mnist", "split-fashion-mnist-transfer",
                 *(f"split-fashion-mnist-{m}" for m in ("upper-bound", "lower-bound", "separate-heads", "batche",
                                                          "psp"))):
        assert name in names


def test_a_setting_is_read_as_a_toml_value_or_as_text():
    assert parse_setting("train.lr=1e-3") == {"train": {"lr": 1e-3}}
    assert parse_setting("tasks=3") == {"tasks": 3}
    assert parse_setting("eval_at=[1, 2]") == {"eval_at": [1, 2]}
    assert parse_setting("model=lenet") == {"model": "lenet"}
    assert parse_setting("train.cosine=true") == {"train": {"cosine": True}}


def test_changes_are_validated_together_naming_the_field():
    demo = get_preset("demo")
    assert demo.replaced({"train": {"lr": 1}}).train.lr == 1  # an int where a float is expected is fine
    with pytest.raises(ValueError, match=r"config\.inference: unknown objective 'x'"):
        demo.replaced({"inference": {"objective": "x"}})
    with pytest.raises(ValueError, match="the G objective needs superfluous outputs"):
        demo.replaced({"output_size": 10, "inference": {"objective": "g"}})
    with pytest.raises(ValueError, match=r"config\.nns\.budget must be of type int, got 2\.5"):
        demo.replaced({"nns": {"budget": 2.5}})


def test_the_summary_follows_the_settings():
    config = get_preset("permuted-mnist").replaced({"tasks": 2, "model": "lenet", "output_size": 30})
    assert config.summary().startswith("SupSup: 2 PermutedMNIST tasks, LeNet 300-100, s = 30, GNu")


def test_a_toml_file_without_a_preset_is_named_after_the_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('tasks = 3\n[train]\nbatches_per_task = 10\n')
    config = read_config_file(path)
    assert (config.preset, config.tasks, config.train.batches_per_task) == ("mine", 3, 10)
    assert tomllib.loads(config.to_toml())["preset"] == "mine"
