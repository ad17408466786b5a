import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def demo_model():
    from circuits.models import load_model

    return load_model("demo")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
