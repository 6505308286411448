"""Test-wide settings: Triton runs in its CPU interpreter when there is no GPU, nothing downloads."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Real DeepSpeed runs shared by the distributed, evaluation and export tests (about a minute)."""
    from tests.training.launcher import reference_runs

    return reference_runs(tmp_path_factory.mktemp("runs"))
