"""The run folder: atomic checkpoints, resume lookup, metrics, refusing to mix runs, loss SVG."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from sekft.errors import TrainError
from sekft.rundir import (
    append_metrics,
    claim_out_dir,
    latest_checkpoint,
    load_checkpoint,
    loss_curve_svg,
    read_metrics,
    remove_stale_temporaries,
    rewind_metrics,
    save_checkpoint,
    set_rng_state,
    write_atomic,
)


def _optimizer() -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    opt.step()
    return opt


def _weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").write_bytes(b"weights")


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")
    write_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_claim_out_dir_refuses_a_folder_holding_another_run(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(TrainError, match="another training run.*--resume.*--overwrite"):
        claim_out_dir(tmp_path, resume=False, overwrite=False)


def test_claim_out_dir_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="1 other files"):
        claim_out_dir(tmp_path, resume=False, overwrite=False)


def test_claim_out_dir_accepts_a_run_folder_to_resume(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    claim_out_dir(tmp_path, resume=True, overwrite=False)
    assert (tmp_path / "run.json").exists()


def test_claim_out_dir_overwrite_removes_only_run_outputs(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    claim_out_dir(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_claim_out_dir_creates_a_missing_folder(tmp_path):
    claim_out_dir(tmp_path / "a" / "b", resume=False, overwrite=False)
    assert (tmp_path / "a" / "b").is_dir()


def test_checkpoint_round_trip_restores_optimizer_and_rng(tmp_path):
    opt = _optimizer()
    torch.manual_seed(5)
    random.seed(5)
    save_checkpoint(tmp_path, 7, _weights, opt, {"step": 7})
    expected = torch.rand(3), random.random()
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh)
    assert state == {"step": 7}
    moments = [o.state_dict()["state"][0]["exp_avg"] for o in (fresh, opt)]
    assert torch.equal(*moments)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]


def test_resume_restores_cuda_rng_only_for_the_gpus_it_sees(monkeypatch):
    # Saved with two GPUs visible, resumed with one: restoring the second would fail.
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((s, i)))
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": ["a", "b"]}
    set_rng_state(state)
    assert restored == [("a", 0)]


def test_latest_checkpoint_picks_the_highest_complete_step(tmp_path):
    opt = _optimizer()
    for step in (2, 10, 9):
        save_checkpoint(tmp_path, step, _weights, opt, {"step": step})
    (tmp_path / "checkpoint-11").mkdir()
    (tmp_path / ".checkpoint-12-abc").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"


def test_latest_checkpoint_of_an_empty_folder_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None


def test_save_checkpoint_failing_midway_leaves_nothing_behind(tmp_path):
    def broken(folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 1, broken, _optimizer(), {"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_sigkill_during_a_checkpoint_save_leaves_the_previous_checkpoint_intact(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        from pathlib import Path
        from sekft.rundir import save_checkpoint
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p])
        def weights(folder):
            (folder / "adapter_model.safetensors").write_bytes(b"w")
        def slow_weights(folder):
            weights(folder)
            print("saving", flush=True)
            time.sleep(60)
        save_checkpoint(Path({str(tmp_path)!r}), 1, weights, opt, {{"step": 1}})
        save_checkpoint(Path({str(tmp_path)!r}), 2, slow_weights, opt, {{"step": 2}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".checkpoint-2") for p in tmp_path.iterdir())
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    assert load_checkpoint(tmp_path / "checkpoint-1", fresh) == {"step": 1}
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_load_checkpoint_of_a_damaged_folder_says_what_to_do(tmp_path):
    folder = save_checkpoint(tmp_path, 1, _weights, _optimizer(), {"step": 1})
    (folder / "optimizer.pt").write_bytes(b"garbage")
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(TrainError, match="checkpoint-1: cannot resume.*delete it"):
        load_checkpoint(folder, fresh)


def test_rewind_metrics_drops_later_steps_and_a_torn_line(tmp_path):
    for step in (1, 2, 3):
        append_metrics(tmp_path, {"step": step, "loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    rewind_metrics(tmp_path, 2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_loss_curve_svg_is_valid_svg_with_one_line_per_series():
    svg = loss_curve_svg([(1, 2.5), (2, 2.0), (3, 1.2)], [(3, 1.5)])
    root = ET.fromstring(svg)
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2
    assert len(lines[0].get("points").split()) == 3


def test_loss_curve_svg_puts_a_lower_loss_higher_up_the_page():
    svg = loss_curve_svg([(1, 3.0), (2, 1.0)])
    points = ET.fromstring(svg).find("{http://www.w3.org/2000/svg}polyline").get("points")
    (_, y_first), (_, y_last) = (map(float, p.split(",")) for p in points.split())
    assert y_last > y_first


def test_loss_curve_svg_of_no_points_is_still_valid():
    ET.fromstring(loss_curve_svg([]))


def test_metrics_lines_are_json_objects(tmp_path):
    append_metrics(tmp_path, {"step": 1, "loss": 0.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}


def test_replace_dir_swaps_a_complete_folder_in_and_leaves_nothing_aside(tmp_path):
    from sekft.rundir import replace_dir

    out = tmp_path / "base"
    for version in ("old", "new"):
        new = tmp_path / f".tmp-{version}"
        new.mkdir()
        (new / "weights").write_text(version)
        replace_dir(new, out)
        assert (out / "weights").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
