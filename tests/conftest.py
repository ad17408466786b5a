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


@pytest.fixture(scope="session")
def random_clt(demo_model):
    """A random 12-feature CLT for the demo model whose features fire on about 10% of tokens
    (b_enc set from a calibration batch): real encoder algebra, no training."""
    from circuits.activations import TextSource
    from circuits.clt import CLTConfig, CrossLayerTranscoder

    torch.manual_seed(1)
    m = demo_model.cfg
    clt = CrossLayerTranscoder(CLTConfig(n_layers=m.n_layers, d_model=m.d_model, n_features=12)).eval()
    docs = TextSource("demo", seed=99).documents(0, 16)
    _, cache = demo_model.run_with_cache(demo_model.to_tokens(docs, padding_side="right"))
    with torch.no_grad():
        for l in range(m.n_layers):
            pre = cache[f"blocks.{l}.hook_resid_mid"].flatten(0, 1) @ clt.W_enc[l].T
            clt.b_enc[l] = -torch.quantile(pre, 0.9, dim=0)
    return clt
