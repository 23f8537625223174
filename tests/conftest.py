"""Session fixtures: tiny model families written once per test session (offline, no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "EVOMERGE_KERNEL_CACHE" not in os.environ:  # precompiled kernels built by tests stay with the test session
    import atexit
    import shutil
    import tempfile

    os.environ["EVOMERGE_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="evomerge-kernels-")
    atexit.register(shutil.rmtree, os.environ["EVOMERGE_KERNEL_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from evomerge.testing.tiny import Family, TinySpec, make_family  # noqa: E402


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Family:
    """Llama base + 3 sources, fp32, every checkpoint sharded (~40 KB shards)."""
    return make_family(tmp_path_factory.mktemp("llama"), TinySpec(arch="llama"), n_sources=3, seed=0, shard_size="40KB")


@pytest.fixture(scope="session")
def qwen2_bf16(tmp_path_factory) -> Family:
    """Qwen2 (attention biases) base + 2 sources stored in bfloat16, single-file checkpoints."""
    return make_family(tmp_path_factory.mktemp("qwen2"), TinySpec(arch="qwen2"), n_sources=2, seed=1, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def gpt2_tied(tmp_path_factory) -> Family:
    """GPT-2 (tied embeddings, Conv1D weights) base + 2 sources, fp16."""
    return make_family(tmp_path_factory.mktemp("gpt2"), TinySpec(arch="gpt2"), n_sources=2, seed=2, dtype=torch.float16)
