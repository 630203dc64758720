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


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo pipeline on 30 bundled Flickr8K photos (2 epochs): a real feature
    store and three trained models, shared by the demo, index and service tests."""
    from fnemm_studies.demo import run_demo
    if not (DATA / "flickr8k" / "images").is_dir():
        pytest.skip("../shared/data (bundled Flickr8K photos) not present")
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out, DATA / "flickr8k", max_images=30, epochs=2, quiet=True)
    return out, result
