"""Recipes as files: `--config recipe.toml` for sekft-train and sekft-eval."""

from __future__ import annotations

import pytest

from sekft import eval as sekft_eval
from sekft import sft
from sekft.errors import ConfigError


def recipe(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return str(path)


def test_train_recipe_sets_options_by_their_names(tmp_path):
    path = recipe(tmp_path, 'base = "b"\ndata = "d.jsonl"\nout = "o"\nmax-steps = 30\n'
                  'lr = 1e-3\nbatch_tokens = 4096\ngrad-ckpt = true\ntargets = ["q_proj"]\n')
    cfg = sft.config_from_args(["--config", path])
    assert (cfg.base, cfg.data, cfg.out) == ("b", "d.jsonl", "o")
    assert (cfg.max_steps, cfg.lr, cfg.batch_tokens) == (30, 1e-3, 4096)
    assert cfg.grad_ckpt is True and cfg.targets == ["q_proj"]
    assert cfg.r == 16  # untouched options keep their defaults


def test_command_line_overrides_the_recipe(tmp_path):
    path = recipe(tmp_path, 'base = "b"\ndata = "d"\nout = "o"\nlr = 1e-3\nr = 8\n')
    cfg = sft.config_from_args(["--lr", "5e-4", "--config", path, "--out", "elsewhere"])
    assert (cfg.lr, cfg.r, cfg.out) == (5e-4, 8, "elsewhere")


def test_a_repeatable_option_is_a_list_in_the_recipe_and_the_command_line_adds_to_it(tmp_path):
    path = recipe(tmp_path, 'base = "b"\ndata = "d"\nout = "o"\n'
                  'template-var = ["enable_thinking=false"]\n')
    assert sft.config_from_args(["--config", path]).template_var == ["enable_thinking=false"]
    cfg = sft.config_from_args(["--config", path, "--template-var", "x=1"])
    assert cfg.template_var == ["enable_thinking=false", "x=1"]
    assert sekft_eval.parse_args(["--scenarios", "s", "--out", "o"]).template_var == []
    bad = recipe(tmp_path, 'base = "b"\ndata = "d"\nout = "o"\ntemplate_var = "x=1"\n')
    with pytest.raises(ConfigError, match="'template_var' must be a list of strings"):
        sft.config_from_args(["--config", bad])


def test_integer_is_accepted_where_a_number_is_expected(tmp_path):
    path = recipe(tmp_path, 'base = "b"\ndata = "d"\nout = "o"\nalpha = 16\n')
    assert sft.config_from_args(["--config", path]).alpha == 16.0


@pytest.mark.parametrize("line, key", [
    ("learning_rate = 1e-3", "learning_rate"),
    ("max-steps = 1.5", "max-steps"),
    ('r = "16"', "r"),
    ("grad-ckpt = 1", "grad-ckpt"),
    ("targets = \"q_proj\"", "targets"),
])
def test_unknown_keys_and_wrong_types_name_the_key(tmp_path, line, key):
    path = recipe(tmp_path, f'base = "b"\ndata = "d"\nout = "o"\n{line}\n')
    with pytest.raises(ConfigError, match=f"recipe.toml: .*'{key}'"):
        sft.config_from_args(["--config", path])


def test_invalid_toml_names_the_file(tmp_path):
    path = recipe(tmp_path, "lr = \n")
    with pytest.raises(ConfigError, match=r"recipe\.toml: not valid TOML .*line 1"):
        sft.config_from_args(["--config", path])


def test_missing_recipe_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        sft.config_from_args(["--config", str(tmp_path / "nope.toml")])


def test_eval_recipe_fills_required_options_and_checks_choices(tmp_path):
    path = recipe(tmp_path, 'base = "b"\nscenarios = "s"\nout = "o"\nmax-new-tokens = 48\n'
                  'dtype = "bfloat16"\nbaseline = true\n')
    args = sekft_eval.parse_args(["--config", path, "--adapter", "a"])
    assert (args.scenarios, args.max_new_tokens, args.dtype) == ("s", 48, "bfloat16")
    assert args.baseline and not hasattr(args, "config")
    bad = recipe(tmp_path, 'scenarios = "s"\nout = "o"\ndtype = "int8"\n')
    with pytest.raises(ConfigError, match="'dtype' must be one of"):
        sekft_eval.parse_args(["--config", bad])


def test_cli_prints_one_line_for_a_bad_recipe(tmp_path, capsys):
    path = recipe(tmp_path, "colour = 'blue'\n")
    assert sft.main(["--config", path]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'colour'" in err
