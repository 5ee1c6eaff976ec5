"""Tests for harness.config: one RunConfig from defaults, a YAML file and the command line."""

from __future__ import annotations

import dataclasses

import pytest

from harness.config import (
    METHOD_NAMES,
    RunConfig,
    build_parser,
    config_from_args,
    config_from_dict,
    config_to_dict,
    save_config_yaml,
    split_methods,
)
from harness.errors import UserError
from harness.models import DEFAULT_MODEL


def test_defaults_are_the_embedded_offline_run():
    cfg = config_from_args([])
    assert cfg.model == DEFAULT_MODEL
    assert cfg.methods == ["lora", "moslora", "linchain"]
    assert cfg.train_data == "arithmetic" and cfg.tasks == ["arithmetic"]
    assert cfg.targets == ["auto"]  # the architecture's defaults: q,k,v,up,down on Llama (tests/test_architectures.py)
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (16, 32.0, 0.0)
    assert cfg.lr is None  # each method's tuned rate (tests/test_tuned_rates.py), not one shared rate
    assert cfg.seeds == [0] and cfg.output_dir == "results" and cfg.tracking_uri is None


def test_every_field_is_an_option_with_help():
    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for f in dataclasses.fields(RunConfig):
        assert f.metadata["help"], f.name
        assert "--" + f.name.replace("_", "-") in flags
    help_text = parser.format_help()
    for flag in ("--model", "--train-data", "--tasks", "--data-dir", "--rank", "--alpha", "--dropout", "--targets",
                 "--lr", "--epochs", "--max-steps", "--batch-size", "--grad-accum", "--cutoff-len", "--prompt-format",
                 "--seeds", "--limit", "--output-dir", "--tracking-uri", "--experiment", "--config"):
        assert flag in help_text


@pytest.mark.parametrize("text, expected", [
    ("lora,moslora,linchain", ["lora", "moslora", "linchain"]),
    ("lora,linchain:r=8,widths=8-16-8", ["lora", "linchain:r=8,widths=8-16-8"]),
    ("linchain:r=8,widths=8-16-8,lr=5e-4,mtlora:structure=icfm,condlora",
     ["linchain:r=8,widths=8-16-8,lr=5e-4", "mtlora:structure=icfm", "condlora"]),
    (" lora , moslora:init=orthogonal ", ["lora", "moslora:init=orthogonal"]),
    ("bogus,lora", ["bogus", "lora"]),  # unknown names are kept for the adapters module to reject
])
def test_method_specs_split_at_top_level_commas(text, expected):
    assert split_methods(text) == expected
    assert config_from_args(["--methods", text]).methods == expected


def test_an_option_without_a_method_is_a_user_error():
    with pytest.raises(UserError, match="no method before it"):
        split_methods("r=8,lora")


def test_method_names_match_the_adapters_module():
    spec = pytest.importorskip("harness.adapters.spec")
    assert tuple(METHOD_NAMES) == tuple(spec.METHODS)


def test_lists_and_types_from_the_command_line():
    cfg = config_from_args(["--seeds", "0,1,2", "--targets", "q_proj,v_proj", "--tasks", "a,b",
                            "--rank", "8", "--lr", "5e-4", "--limit", "20", "--data-dir", "/tmp/d"])
    assert cfg.seeds == [0, 1, 2] and cfg.targets == ["q_proj", "v_proj"] and cfg.tasks == ["a", "b"]
    assert cfg.rank == 8 and cfg.lr == 5e-4 and cfg.limit == 20 and cfg.data_dir == "/tmp/d"


def test_bad_command_line_values_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        config_from_args(["--rank", "abc"])
    assert exit_.value.code == 2
    assert "--rank: expected an integer, got 'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_from_args(["--no-such-option", "1"])


def test_out_of_range_values_are_user_errors():
    with pytest.raises(UserError, match="--dropout"):
        config_from_args(["--dropout", "1.5"])
    with pytest.raises(UserError, match="--seeds"):
        config_from_args(["--seeds", "1,1"])


def test_yaml_file_then_command_line_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-random\nrank: 4\nmax-steps: 7\nseeds: [1, 2]\nmethods: lora,linchain:n=2\n"
                    "tasks:\n  - t1\n  - t2\n")
    cfg = config_from_args(["--config", str(path), "--rank", "8"])
    assert cfg.model == "tiny-random" and cfg.max_steps == 7 and cfg.seeds == [1, 2]
    assert cfg.rank == 8  # the command line wins
    assert cfg.methods == ["lora", "linchain:n=2"] and cfg.tasks == ["t1", "t2"]


def test_unknown_yaml_key_names_it_and_the_valid_ones(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rank: 4\nrnak: 8\n")
    with pytest.raises(UserError) as err:
        config_from_args(["--config", str(path)])
    message = str(err.value)
    assert "'rnak'" in message and "rank" in message and "max_steps" in message and "\n" not in message


def test_bad_yaml_type_and_bad_yaml_are_one_line_user_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rank: many\n")
    with pytest.raises(UserError, match="--rank: expected an integer"):
        config_from_args(["--config", str(path)])
    path.write_text("rank: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config_from_args(["--config", str(path)])
    with pytest.raises(UserError, match="cannot read"):
        config_from_args(["--config", str(tmp_path / "missing.yaml")])


def test_epochs_alone_trains_by_epochs(tmp_path):
    assert config_from_args([]).max_steps == 50
    assert config_from_args(["--epochs", "2"]).max_steps is None
    assert config_from_args(["--epochs", "2", "--max-steps", "5"]).max_steps == 5
    assert config_from_args(["--max-steps", "none"]).max_steps is None
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\n")
    assert config_from_args(["--config", str(path)]).max_steps is None


def test_dict_and_yaml_round_trip(tmp_path):
    cfg = config_from_args(["--methods", "lora,linchain:r=8,widths=8-16-8", "--seeds", "0,1", "--limit", "5",
                            "--run-name", "x", "--tracking-uri", "sqlite:///a.db"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    path = save_config_yaml(cfg, tmp_path / "out" / "config.yaml")
    assert config_from_args(["--config", str(path)]) == cfg
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_unknown_key_in_dict_is_a_user_error():
    with pytest.raises(UserError, match="unknown option 'colour'"):
        config_from_dict({"colour": "red"})
