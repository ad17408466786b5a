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
    from circuits.text import TextSource
    from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder

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


@pytest.fixture(scope="session")
def demo_clt(demo_model):
    """The shipped demo CLT; until it exists, a random CLT whose thresholds make each feature fire
    on about 3% of the demo corpus's tokens (real algebra, untrained features)."""
    from circuits.demo.corpus import generate_documents
    from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder
    from circuits.transcoders.load import DEMO_CLT_DIR, load_transcoder

    if (DEMO_CLT_DIR / "W_enc_0.safetensors").exists():
        return load_transcoder("demo", model=demo_model)
    gen = torch.Generator().manual_seed(0)
    L, d, F = demo_model.cfg.n_layers, demo_model.cfg.d_model, 256
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=d, n_features=F, model_name="demo"))
    tokens = demo_model.to_tokens(generate_documents(64, seed=1), padding_side="right")[:, :32]
    _, cache = demo_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_mid"))
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(L, F, d, generator=gen) / d**0.5)
        for w in clt.W_dec:
            w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
        for l in range(L):
            pre = cache[f"blocks.{l}.hook_resid_mid"].flatten(0, 1) @ clt.W_enc[l].T
            clt.threshold[l] = pre.quantile(0.97, dim=0) + 1e-3  # not exactly at a token's pre-activation
    return clt.eval()
