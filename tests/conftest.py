import os
import sys

import pytest
import torch

# Tests import shared helpers (tests/blocks.py, ...) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
