"""Session-wide fixtures: tiny random checkpoints built once per test run (see tests/tiny.py).

The folders are shared by every test in the session: read them, never write into them
(copy with `shutil.copytree` first when a test needs to damage one).

`--dtype auto` (`sekft.device`) is float32 in every test, as on a CPU without native bf16,
so float32 oracles and tolerances hold on every kind of machine; the tests of the policy
and of bf16 training force the capability or ask for bfloat16 themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import make_tiny_checkpoint


@pytest.fixture(autouse=True, scope="session")
def cpu_without_native_bf16():
    # Session-wide, so module-scoped fixtures that load models see it too. Subprocesses do
    # not: tests that start sekft commands pass --dtype themselves.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        patch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), kind="llama")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral with `sliding_window=8`, so most test sequences are longer than the window."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mistral"), kind="mistral")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 with tied embeddings (as Qwen2.5-0.5B ships) and q/k/v biases."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-qwen2"), kind="qwen2", tie_embeddings=True
    )


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama split over several safetensors files with a `model.safetensors.index.json`."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-llama-sharded"), kind="llama", shards=3, seed=1
    )
