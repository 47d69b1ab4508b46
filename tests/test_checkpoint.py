"""Finding a base and refusing bad ones: each bad input is one line naming the file and fault."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sekft import base as base_cli
from sekft.base import load_base
from sekft.checkpoint import resolve_base
from sekft.errors import CheckpointError, ConfigError, run_cli


@pytest.fixture
def copy_of(tmp_path):
    """A writable copy of a session checkpoint, to damage."""

    def copy(folder: Path) -> Path:
        return Path(shutil.copytree(folder, tmp_path / folder.name))

    return copy


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


# ---- finding a base ---------------------------------------------------------------------


def test_resolve_base_returns_a_local_folder(tiny_llama):
    assert resolve_base(str(tiny_llama)) == tiny_llama


def test_resolve_base_finds_a_hub_id_in_the_cache_through_refs_main(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--org--name"
    for rev in ("aaa", "bbb"):
        (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbb\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_base("org/name") == repo / "snapshots" / "bbb"


def test_resolve_base_uses_hf_home_when_no_hub_cache_is_set(tmp_path, monkeypatch):
    snapshot = tmp_path / "home" / "hub" / "models--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_base("org/name") == snapshot


def test_resolve_base_reads_the_older_hub_cache_variable(tmp_path, monkeypatch):
    snapshot = tmp_path / "old" / "models--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "old"))
    assert resolve_base("org/name") == snapshot


def test_resolve_base_refuses_to_pick_among_revisions_without_refs_main(tmp_path, monkeypatch):
    repo = tmp_path / "models--org--name"
    for rev in ("aaa", "bbb"):
        (repo / "snapshots" / rev).mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"holds 2 revisions and no refs/main; pass one as "
                                              r"a folder: .*snapshots/aaa, .*snapshots/bbb"):
        resolve_base("org/name")


def test_resolve_base_miss_says_where_it_looked_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        resolve_base("org/absent")
    assert str(tmp_path / "models--org--absent") in str(e.value)
    assert "never downloads" in str(e.value)


# ---- bad inputs -------------------------------------------------------------------------


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}.*no such folder"):
        load_base(tmp_path / "nope")


def test_folder_without_config_names_config_json(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_base(tmp_path)


def test_missing_config_key_is_named(tiny_llama, copy_of):
    folder = copy_of(tiny_llama)
    _edit_config(folder, num_hidden_layers=None)
    with pytest.raises(ConfigError, match=r"missing required key 'num_hidden_layers'"):
        load_base(folder)


def test_unknown_model_type_lists_the_supported_ones(tiny_llama, copy_of):
    folder = copy_of(tiny_llama)
    _edit_config(folder, model_type="falcon")
    with pytest.raises(ConfigError, match="'falcon' is not supported; supported: llama, mistral"):
        load_base(folder)


def test_truncated_safetensors_is_named(tiny_mistral, copy_of):
    folder = copy_of(tiny_mistral)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        load_base(folder)


def test_corrupt_safetensors_header_is_named(tiny_mistral, copy_of):
    folder = copy_of(tiny_mistral)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        load_base(folder)


def test_shard_named_in_the_index_but_absent_is_named(tiny_llama_sharded, copy_of):
    folder = copy_of(tiny_llama_sharded)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}' .* is missing"):
        load_base(folder)


def test_tensor_shape_disagreeing_with_config_is_named(tiny_llama, copy_of):
    folder = copy_of(tiny_llama)
    _edit_config(folder, intermediate_size=100)  # stored MLP weights are 96 wide
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[96, 64\]"
    ):
        load_base(folder)


def test_weights_missing_a_tensor_the_config_needs_are_named(tiny_llama, copy_of):
    folder = copy_of(tiny_llama)
    _edit_config(folder, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\..*' is missing"):
        load_base(folder)


def test_cli_prints_one_line_and_exits_1_on_bad_input(tmp_path, capsys):
    code = run_cli("sekft.base", base_cli.main, [str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("sekft.base: error: ")


def test_cli_process_exits_non_zero_without_a_traceback(tiny_llama, copy_of):
    folder = copy_of(tiny_llama)
    _edit_config(folder, model_type="falcon")
    done = subprocess.run(
        [sys.executable, "-m", "sekft.base", str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "'falcon' is not supported" in done.stderr


def test_cli_summarises_a_good_base(tiny_qwen2, capsys):
    assert base_cli.main([str(tiny_qwen2), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "model_type  qwen2" in out and "q/k/v bias" in out and "tied        True" in out


def test_load_base_is_exported_from_the_package():
    import sekft

    assert sekft.load_base is load_base
