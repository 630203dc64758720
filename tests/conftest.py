import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tests are small: one thread is faster and keeps runs repeatable.
torch.set_num_threads(1)


@pytest.fixture
def synth(tmp_path):
    import synthetic
    return synthetic.write(tmp_path / "synth")
