"""`sekft-train`: the loop's contract (packed loss, exact resume, kill safety, learning, PEFT
compatibility), its schedule and command line, and every bad input it must refuse clearly."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import CORPUS

from sekft.base import load_base
from sekft.errors import CheckpointError, ConfigError, DataError, TemplateError, TrainError
from sekft.lora import attach_lora, lora_parameters
from sekft.loss import trained_token_loss
from sekft.pack import IGNORE, Example, collate_row
from sekft.sft import (
    TrainConfig,
    build_parser,
    config_from_args,
    lr_at,
    main,
    plan_run,
    prepare_data,
    resolve_device_dtype,
    split_validation,
    train,
    weights_dtype,
)

COMMANDS = [line for line in CORPUS if "\n" not in line and len(line) < 45]
OUTPUTS = [line for line in CORPUS if line not in COMMANDS]


def shell_session(rng: random.Random, turns: int) -> dict:
    messages = [
        {"role": "system", "content": "You are a helpful assistant that operates a POSIX shell."},
        {"role": "user", "content": "List the files in the current directory."},
    ]
    for _ in range(turns):
        messages.append({"role": "assistant", "content": rng.choice(COMMANDS)})
        messages.append({"role": "user", "content": rng.choice(OUTPUTS)})
    messages.append({"role": "assistant", "content": "exit"})
    return {"messages": messages}


def write_sessions(
    path: Path, n: int, seed: int = 0, turns: tuple[int, int] = (1, 3), distinct: int = 0
) -> Path:
    """n random shell sessions as JSONL; with `distinct`, only that many different ones."""
    lines = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i % distinct if distinct else i}")
        lines.append(json.dumps(shell_session(rng, rng.randint(*turns))))
    path.write_text("\n".join(lines) + "\n")
    return path


def config(tiny: Path, tmp_path: Path, **overrides) -> TrainConfig:
    data = tmp_path / "data.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        write_sessions(data, 12)
    fields = dict(
        data=str(data), base=str(tiny), out=str(tmp_path / "out"), r=4, alpha=8.0,
        dropout=0.1, lr=5e-3, max_len=256, batch_tokens=400, val_fraction=0.0, device="cpu",
        max_steps=4, dtype="float32",
    )  # fmt: skip
    fields.update(overrides)
    return TrainConfig(**fields)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- schedule and command line


def test_lr_warms_up_linearly_so_the_first_step_already_moves():
    assert [lr_at(s, 1.0, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_lr_decays_by_cosine_to_min_ratio():
    assert lr_at(4, 1.0, 4, 104) == 1.0
    assert lr_at(54, 1.0, 4, 104) == pytest.approx(0.5)
    assert lr_at(104, 1.0, 4, 104, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(54, 1.0, 4, 104, min_ratio=0.1) == pytest.approx(0.55)


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, 3e-4, 0, 10) == 3e-4


def test_every_config_field_is_one_command_line_option():
    options = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert options == {f.name for f in dataclasses.fields(TrainConfig)}


def test_command_line_values_land_in_their_fields():
    cfg = config_from_args(
        ["--data", "d", "--base", "b", "--out", "o", "--batch-tokens", "99", "--load-4bit",
         "--targets", "q_proj", "v_proj", "--lr", "0.01"]
    )  # fmt: skip
    assert (cfg.batch_tokens, cfg.load_4bit, cfg.lr) == (99, True, 0.01)
    assert cfg.targets == ["q_proj", "v_proj"]
    assert cfg.r == TrainConfig.r


def test_split_validation_is_deterministic_and_sized_by_fraction():
    assert split_validation(100, 0.1, seed=3) == split_validation(100, 0.1, seed=3)
    assert len(split_validation(100, 0.1, seed=3)) == 10
    assert split_validation(100, 0.1, seed=3) != split_validation(100, 0.1, seed=4)


def test_max_steps_repeats_the_data_as_needed():
    cfg = TrainConfig(data="", base="", max_len=10, batch_tokens=10, max_steps=7)
    assert len(plan_run([10, 10, 10], cfg)) == 7


# ---------------------------------------------------------------- the loss over packed rows


def test_packed_loss_and_gradients_equal_the_token_weighted_mean_over_sessions(tiny_llama):
    model = load_base(tiny_llama, device="cpu").model
    attach_lora(model, r=4, alpha=8.0)
    for p in lora_parameters(model).values():
        torch.nn.init.normal_(p, std=0.1)  # non-zero B, so LoRA shapes the gradients too
    rng = torch.Generator().manual_seed(0)
    sessions = []
    for n in (9, 17, 5, 30):
        ids = torch.randint(3, 300, (n,), generator=rng).tolist()
        labels = [t if torch.rand((), generator=rng) < 0.4 else IGNORE for t in ids]
        sessions.append(Example(ids, labels))
    total = sum(e.n_trained for e in sessions)
    weight = model.output_weight()

    row = collate_row(sessions)
    packed, _ = trained_token_loss(model.hidden(row.input_ids, row.position_ids, row.doc_ids),
                                   weight, row.labels)
    (packed / total).backward()
    packed_grads = {k: p.grad.clone() for k, p in lora_parameters(model).items()}
    model.zero_grad()

    separate = torch.zeros(())
    for e in sessions:
        alone = collate_row([e])
        loss, _ = trained_token_loss(model.hidden(alone.input_ids), weight, alone.labels)
        (loss / total).backward()
        separate = separate + loss.detach()
    torch.testing.assert_close(packed.detach() / total, separate / total, rtol=1e-6, atol=1e-6)
    for k, p in lora_parameters(model).items():
        torch.testing.assert_close(packed_grads[k], p.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- runs


def test_a_short_run_writes_adapter_checkpoint_metrics_run_json_and_curve(tiny_llama, tmp_path):
    result = train(config(tiny_llama, tmp_path, save_every=2))
    out = Path(result.out)
    assert (result.steps, result.interrupted) == (4, False)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert {"adapter_model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"} <= {
        p.name for p in (out / "checkpoint-4").iterdir()
    }
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    wanted = {"loss", "lr", "tokens_per_s", "trained_tokens", "peak_memory", "memory", "elapsed"}
    assert wanted <= set(metrics[0])
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["r"] == 4 and len(run["data"]["sha256"]) == 64
    assert {"base", "template_sha256", "versions"} <= set(run)
    assert (out / "loss.svg").read_text().startswith("<svg")


def test_loss_falls_clearly_on_a_tiny_model_and_validation_is_reported(tiny_llama, tmp_path):
    # Three distinct sessions, eight copies each: learnable by a rank-4 adapter in 30 steps.
    write_sessions(tmp_path / "data.jsonl", 24, turns=(1, 2), distinct=3)
    result = train(config(tiny_llama, tmp_path, max_steps=30, lr=1e-2, dropout=0.0,
                          val_fraction=0.2, eval_every=10))
    metrics = [json.loads(line) for line in (Path(result.out) / "metrics.jsonl").open()]
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.6 * first
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 3 and val[-1] < val[0]


def test_trained_adapter_loads_in_peft_with_the_same_logits(tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    result = train(config(tiny_llama, tmp_path, max_steps=3, lr=2e-2))
    base = load_base(tiny_llama, device="cpu")
    from sekft.lora import load_adapter

    load_adapter(base.model, result.out)
    base.model.eval()  # the freshly attached LoRA layers start in training mode (dropout on)
    ids = torch.tensor([base.tokenizer.encode("<|im_start|>user\nls -la /home<|im_end|>").ids])
    with torch.no_grad():
        ours = base.model(ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        plain = hf(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf, result.out).eval()(ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes something
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_resume_is_exact_n_steps_equal_k_then_stop_then_n_minus_k(tiny_llama, tmp_path):
    straight = train(config(tiny_llama, tmp_path / "a", max_steps=5))
    stop = threading.Event()

    def stop_after_two(line, **fields):
        if fields.get("step") == 2:
            stop.set()

    first = train(config(tiny_llama, tmp_path / "b", max_steps=5, save_every=100),
                  stop=stop, report=stop_after_two)
    assert (first.steps, first.interrupted) == (2, True)
    resumed = train(config(tiny_llama, tmp_path / "b", max_steps=5, resume=True))
    assert resumed.steps == 5
    a, b = adapter_tensors(straight.out), adapter_tensors(resumed.out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (Path(resumed.out) / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5]


def test_sigkill_during_a_checkpoint_save_leaves_a_run_that_resumes_exactly(tiny_llama, tmp_path):
    cfg = config(tiny_llama, tmp_path / "killed", max_steps=3, save_every=1)
    script = textwrap.dedent(
        f"""
        import time
        import sekft.sft as sft
        from sekft.sft import TrainConfig, train
        real_save = sft.save_checkpoint
        def save(out, step, write_weights, optimizer, state):
            def slow(folder):
                write_weights(folder)
                print("saving", step, flush=True)
                time.sleep(120)
            return real_save(out, step, slow if step == 2 else write_weights, optimizer, state)
        sft.save_checkpoint = save
        train(TrainConfig(**{dataclasses.asdict(cfg)!r}))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout.readline().split() == ["saving", "2"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    out = Path(cfg.out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    resumed = train(dataclasses.replace(cfg, resume=True))
    straight = train(config(tiny_llama, tmp_path / "straight", max_steps=3))
    a, b = adapter_tensors(straight.out), adapter_tensors(resumed.out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list(out.glob(".checkpoint-*"))


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny_llama, tmp_path, capsys):
    cfg = config(tiny_llama, tmp_path, max_steps=6)

    def interrupt(line, **fields):
        if fields.get("step") == 2:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    result = train(cfg, report=interrupt)
    assert (result.steps, result.interrupted) == (2, True)
    assert (Path(cfg.out) / "checkpoint-2" / "trainer_state.json").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_full_mode_trains_every_weight_and_saves_a_base_our_loader_reads(tiny_llama, tmp_path):
    result = train(config(tiny_llama, tmp_path, full=True, max_steps=2, lr=1e-3))
    trained = load_base(result.out, device="cpu")
    original = load_base(tiny_llama, device="cpu")
    changed = [
        name for name, p in trained.model.named_parameters()
        if not torch.equal(p, original.model.get_parameter(name))
    ]  # fmt: skip
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert trained.chat_template == original.chat_template


def test_grad_ckpt_trains_the_same_adapter(tiny_llama, tmp_path):
    plain = train(config(tiny_llama, tmp_path / "plain", max_steps=2))
    ckpt = train(config(tiny_llama, tmp_path / "ckpt", max_steps=2, grad_ckpt=True))
    a, b = adapter_tensors(plain.out), adapter_tensors(ckpt.out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_a_4bit_base_trains_its_adapter_and_loss_falls(tiny_llama, tmp_path):
    write_sessions(tmp_path / "data.jsonl", 24, turns=(1, 2), distinct=3)
    result = train(config(tiny_llama, tmp_path, load_4bit=True, max_steps=6, lr=1e-2,
                          dropout=0.0))
    metrics = [json.loads(line) for line in (Path(result.out) / "metrics.jsonl").open()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    lora_b = [t for k, t in adapter_tensors(result.out).items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)


def test_resume_refuses_changed_settings(tiny_llama, tmp_path):
    cfg = config(tiny_llama, tmp_path, max_steps=2)
    train(cfg)
    with pytest.raises(TrainError, match=r"different config\.r, config\.seed"):
        train(dataclasses.replace(cfg, resume=True, r=8, seed=3))


def test_resume_refuses_changed_data(tiny_llama, tmp_path):
    cfg = config(tiny_llama, tmp_path, max_steps=2)
    train(cfg)
    write_sessions(Path(cfg.data), 12, seed=1)
    with pytest.raises(TrainError, match="different data"):
        train(dataclasses.replace(cfg, resume=True))


def test_inspect_shows_exactly_the_sessions_training_uses_without_weights(tiny_llama, tmp_path,
                                                                          capsys):
    base = tmp_path / "tokenizer-only"
    shutil.copytree(tiny_llama, base)
    (base / "model.safetensors").unlink()
    data = write_sessions(tmp_path / "data.jsonl", 3, turns=(1, 1))
    with data.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "ls"}]}) + "\n")
        f.write(json.dumps(shell_session(random.Random(0), 40)) + "\n")
    code = main(["--data", str(data), "--base", str(base), "--inspect", "--max-len", "256"])
    out = capsys.readouterr().out
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("=== session")] == [
        "=== session 0", "=== session 1", "=== session 2"
    ]
    assert "=== 3 sessions" in out


# ---------------------------------------------------------------- bad input


def test_empty_data_is_an_error(tiny_llama, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    code, err = run_cli(["--data", str(tmp_path / "empty.jsonl"), "--base", str(tiny_llama),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "empty.jsonl" in err


def test_malformed_jsonl_names_file_and_line(tiny_llama, tmp_path, capsys):
    data = write_sessions(tmp_path / "bad.jsonl", 3)
    data.write_text(data.read_text() + '{"messages": [\n')
    code, err = run_cli(["--data", str(data), "--base", str(tiny_llama),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    assert "bad.jsonl:4" in err and err.count("\n") == 1


def test_a_session_with_no_assistant_turn_is_dropped_and_named(tiny_llama, tmp_path, capsys):
    data = write_sessions(tmp_path / "data.jsonl", 4)
    user_only = {"messages": [{"role": "user", "content": "ls"}]}
    data.write_text(data.read_text() + json.dumps(user_only) + "\n")
    result = train(config(tiny_llama, tmp_path, max_steps=1))
    run = json.loads((Path(result.out) / "run.json").read_text())
    assert run["data"]["dropped_untrained"] == [f"{data}:5 has no assistant turn"]
    assert "data.jsonl:5 has no assistant turn" in capsys.readouterr().err


def test_a_session_with_no_assistant_turn_is_an_error_under_strict(tiny_llama, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "ls"}]}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:1 has no assistant turn"):
        train(config(tiny_llama, tmp_path, strict=True))


def test_data_with_no_assistant_turn_at_all_is_an_error(tiny_llama, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "ls"}]}) + "\n")
    with pytest.raises(DataError, match="no session left to train on"):
        train(config(tiny_llama, tmp_path))


def test_a_template_that_raises_is_an_error_naming_the_session(tiny_llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config_path = base / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = (
        "{% for m in messages %}{% if m['content'] == 'boom' %}"
        "{{ raise_exception('content boom refused') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    config_path.write_text(json.dumps(tokenizer_config))
    data = tmp_path / "data.jsonl"
    turns = [("user", "y"), ("assistant", "boom")]
    session = {"messages": [{"role": r, "content": c} for r, c in turns]}
    data.write_text(json.dumps(session) + "\n")
    with pytest.raises(TemplateError, match=r"data.jsonl:1.*turn 1.*content boom refused"):
        train(config(base, tmp_path))


def test_out_holding_another_run_is_refused_without_resume_or_overwrite(tiny_llama, tmp_path):
    cfg = config(tiny_llama, tmp_path, max_steps=1)
    train(cfg)
    with pytest.raises(TrainError, match="another training run"):
        train(cfg)
    assert train(dataclasses.replace(cfg, overwrite=True)).steps == 1


def test_float16_training_is_refused_and_auto_follows_the_cpu(monkeypatch):
    with pytest.raises(ConfigError, match="bfloat16 or float32"):
        resolve_device_dtype(TrainConfig("d", "b", device="cpu", dtype="float16"))
    cpu = torch.device("cpu")
    assert resolve_device_dtype(TrainConfig("d", "b", device="cpu"))[:2] == (cpu, torch.float32)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_device_dtype(TrainConfig("d", "b", device="cpu"))[:2] == (cpu, torch.bfloat16)
    f32 = TrainConfig("d", "b", device="cpu", dtype="float32")
    assert resolve_device_dtype(f32)[:2] == (cpu, torch.float32)


def test_full_training_keeps_float32_master_weights_whatever_the_compute_dtype():
    assert weights_dtype(TrainConfig("d", "b", full=True), torch.bfloat16) == torch.float32
    assert weights_dtype(TrainConfig("d", "b"), torch.bfloat16) == torch.bfloat16


def test_a_base_that_does_not_exist_is_an_error(tmp_path, capsys):
    data = write_sessions(tmp_path / "data.jsonl", 2)
    code, err = run_cli(["--data", str(data), "--base", str(tmp_path / "nope"),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "nope" in err and err.count("\n") == 1
    with pytest.raises(CheckpointError):
        train(TrainConfig(data=str(data), base=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_overlong_sessions_are_dropped_with_a_count_or_refused_under_strict(tiny_llama, tmp_path):
    data = write_sessions(tmp_path / "data.jsonl", 6, turns=(1, 1))
    long = shell_session(random.Random(0), 40)
    data.write_text(data.read_text() + json.dumps(long) + "\n")
    result = train(config(tiny_llama, tmp_path, max_steps=1))
    run = json.loads((Path(result.out) / "run.json").read_text())
    assert run["data"]["dropped_overlong"] == [f"{data}:7"]
    with pytest.raises(DataError, match=r"data.jsonl:7: session is \d+ tokens"):
        train(config(tiny_llama, tmp_path, max_steps=1, strict=True, overwrite=True))



def test_bf16_is_the_default_only_on_gpus_with_native_bf16(monkeypatch):
    from sekft.base import default_dtype

    assert default_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert default_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert default_dtype("cuda") == torch.float32


# Like Qwen3's think blocks: a past assistant turn renders differently from the last one.
REWRITING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}(elided){% else %}{{ m.content }}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_turns_a_template_rewrites_train_from_own_renders_held_out_by_session(tiny_llama,
                                                                              tmp_path):
    from sekft.template import ChatTemplate
    from sekft.tokenizer import load_tokenizer

    write_sessions(tmp_path / "data.jsonl", 20, turns=(2, 3))
    cfg = config(tiny_llama, tmp_path, val_fraction=0.25, max_len=4096)
    template = ChatTemplate(REWRITING, {"eos_token": "<|im_end|>"})
    data = prepare_data(cfg, template, load_tokenizer(tiny_llama))
    turns = [sum(m["role"] == "assistant" for m in s.messages) for _, s in data.sessions]
    examples = data.train + data.val
    # One example per assistant turn: the full render trains the last, own renders the rest.
    assert len(examples) == sum(turns) and data.violations == 0
    assert all(e.n_trained > 0 for e in examples)
    # Every turn of a session lands on the same side of the validation split.
    def session_of(e):
        return e.source.split(" turn ")[0]
    assert not {session_of(e) for e in data.train} & {session_of(e) for e in data.val}
    assert len({session_of(e) for e in data.val}) == 5


def test_named_template_and_template_vars_reach_training_as_they_reach_inspect(tiny_llama,
                                                                               tmp_path):
    """--template NAME and --template-var render training exactly as --inspect shows it."""
    from sekft.sft import _template_and_tokenizer

    base_dir = tmp_path / "base"
    shutil.copytree(tiny_llama, base_dir)
    (base_dir / "additional_chat_templates").mkdir()
    (base_dir / "additional_chat_templates" / "plain.jinja").write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% if terse %}${% endif %}{% endif %}")
    cfg = config_from_args(["--data", "d.jsonl", "--base", str(base_dir), "--out", "o",
                            "--template", "plain", "--template-var", "terse=true",
                            "--template-var", "unused=x"])
    assert cfg.template_var == ["terse=true", "unused=x"]
    base = load_base(base_dir, device="cpu")
    for loaded in (None, base):
        _, template, _ = _template_and_tokenizer(cfg, loaded)
        assert template.variables == {"terse": True, "unused": "x"}
        assert template.render([{"role": "user", "content": "hi"}], True).endswith(
            "assistant: $")
    with pytest.raises(ConfigError, match="--template-var 'terse'"):
        _template_and_tokenizer(dataclasses.replace(cfg, template_var=["terse"]), base)
