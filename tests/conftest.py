"""Shared test set-up: never touch the network, find the conformance vectors, small worlds."""
from __future__ import annotations

import os
from pathlib import Path

# Before anything imports transformers / huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def conformance_dir() -> Path:
    """The official release's golden vectors: $AMOE_CONFORMANCE_DIR or ../shared/conformance."""
    return Path(os.environ.get("AMOE_CONFORMANCE_DIR", REPO_ROOT.parent / "shared" / "conformance"))


@pytest.fixture(scope="session")
def conformance() -> Path:
    path = conformance_dir()
    if not (path / "tiny-moe.safetensors").exists():
        pytest.skip(f"conformance vectors not found at {path} (set AMOE_CONFORMANCE_DIR to the folder "
                    "holding tiny-moe.safetensors)")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
