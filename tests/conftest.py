"""Test-wide settings: one intra-op thread keeps the many tiny models fast on 2-core machines."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
