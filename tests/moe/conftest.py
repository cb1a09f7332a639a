"""MoE tests run single-threaded: their tensors are tiny, so intra-op threads only add
synchronisation cost (large on a shared, oversubscribed CI machine)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
