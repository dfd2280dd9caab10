"""One torch thread for the annotator tests: their networks run on small images, where one thread
is as fast, and two threads on a shared 2-core machine wait on each other (5-20x slower)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
