"""Feature cards from a corpus scan, checked against a brute-force pass over each document."""

import pytest
import torch

from circuits.cli import main
from circuits.errors import CircuitsError
from circuits.features import FeatureScanConfig, load_features, scan_features
from circuits.text import TextSource
from circuits.transcoders.circuit_tracer import save_transcoder
from circuits.transcoders.clt import CrossLayerTranscoder
from tests.attribution.test_attribute import GEMMA_LIKE, _random_clt, _random_model
from tests.train.test_hooks_training import at_the_hooks

CFG = FeatureScanConfig(n_documents=24, batch_size=10, top_k=4, n_bins=8, n_logits=5)


@pytest.fixture(scope="module")
def scan(demo_model, random_clt):
    return scan_features(demo_model, random_clt, CFG, clt_name="random")


@pytest.fixture(scope="module")
@torch.no_grad()
def gemma_pair():
    """A Gemma-2-like random model, a random 12-feature CLT reading mlp.hook_in (the pre-MLP norm's
    output) and writing mlp.hook_out (before the norm after the MLP) whose features fire on about
    10% of tokens, and its scan."""
    model = _random_model(**GEMMA_LIKE)
    clt = _random_clt(model, n_features=12, input_hook="mlp.hook_in", output_hook="mlp.hook_out")
    tokens = model.to_tokens(TextSource("demo", seed=99).documents(0, 16), padding_side="right")
    x = at_the_hooks(model, tokens)[0]["mlp.hook_in"].flatten(0, 1)  # [n, L, d]
    pre = torch.einsum("nld,lfd->nlf", x, clt.W_enc)
    clt.b_enc.copy_(clt.threshold - torch.quantile(pre, 0.9, dim=0))
    return model, clt, scan_features(model, clt, CFG, clt_name="gemma")


def _case(name: str, request):
    """(model, clt, its scan, the input hook it reads)."""
    if name == "demo":
        return request.getfixturevalue("demo_model"), request.getfixturevalue("random_clt"), \
            request.getfixturevalue("scan"), "hook_resid_mid"  # fmt: skip
    return (*request.getfixturevalue("gemma_pair"), "mlp.hook_in")


@torch.no_grad()
def _reference_acts(model, clt, input_hook: str):
    """Per document: (tokens [p], acts [L, p, F]) with BOS zeroed, one forward pass per document,
    the encoder applied to the values at `input_hook` computed by its definition."""
    out = []
    for doc in TextSource(CFG.text, seed=CFG.seed).documents(0, CFG.n_documents):
        tokens = model.to_tokens(doc)[0, : CFG.max_tokens_per_doc]
        x = at_the_hooks(model, tokens[None])[0][input_hook][0]  # [p, L, d]
        acts = torch.stack([clt.encode_layer(x[:, l], l) for l in range(clt.cfg.n_layers)])
        acts[:, 0] = 0
        out.append((tokens, acts))
    return out


def _window(tokens, acts, peak):
    """Token ids and activations of the window around `peak`, -1 / 0 outside the document."""
    ids, values = [], []
    for i in range(peak - CFG.before, peak + CFG.after + 1):
        inside = 0 <= i < len(tokens)
        ids.append(int(tokens[i]) if inside else -1)
        values.append(float(acts[i]) if inside else 0.0)
    return tuple(ids), values


@pytest.mark.parametrize("case", ["demo", "gemma2 mlp.hook_in"])
def test_top_contexts_and_histograms_match_brute_force(case, request):
    model, clt, scan, input_hook = _case(case, request)
    ref = _reference_acts(model, clt, input_hook)
    n_tokens = sum(len(t) - 1 for t, _ in ref)
    assert scan.n_tokens == n_tokens
    for l in range(clt.cfg.n_layers):
        for f in range(clt.cfg.n_features):
            # per document: its maximum and the window around it; strongest first, repeated windows dropped
            docs = []
            for tokens, acts in ref:
                peak = int(acts[l, :, f].argmax())
                docs.append((acts[l, peak, f].item(), *_window(tokens, acts[l, :, f], peak)))
            docs.sort(key=lambda d: -d[0])
            kept, seen = [], set()
            for value, ids, values in docs:
                if value > 0 and ids not in seen:
                    seen.add(ids)
                    kept.append((value, ids, values))
            kept = kept[: CFG.top_k]
            n = len(kept)
            torch.testing.assert_close(scan.context_max[l, f, :n], torch.tensor([v for v, _, _ in kept]))
            assert (scan.context_max[l, f, n:] == 0).all()
            # each shown context is a distinct real window with that peak (ties may pick either document)
            windows = [tuple(t) for t in scan.context_tokens[l, f, :n].tolist()]
            assert len(set(windows)) == n
            for i, ids in enumerate(windows):
                match = [v for value, w, v in docs if w == ids and abs(value - scan.context_max[l, f, i].item()) < 1e-5]
                assert match, f"layer {l} feature {f}: context {i} is no document's window"
                shown = scan.context_acts[l, f, i].float()
                torch.testing.assert_close(shown, torch.tensor(match[0]), rtol=1e-3, atol=1e-3)  # kept at fp16
            n_active = sum(int((a[l, :, f] > 0).sum()) for _, a in ref)
            assert scan.histogram[l, f].sum().item() == n_active
            assert scan.frequency[l, f].item() == pytest.approx(n_active / n_tokens)
    assert scan.histogram[..., -1].sum() > 0  # the maximum lands in the last bin


def test_output_logits_match_the_models_final_norm_and_unembedding(demo_model, random_clt, scan):
    """The direct effect of a feature's summed decoders, through ln_final with the scale divided
    out: LN(v) = (v - mean) / std * w + b, so (LN(v) - b) * std is its linear part."""
    for l in (0, 2):
        v = random_clt.W_dec[l].sum(1).detach()  # [F, d]
        centred = v - v.mean(-1, keepdim=True)
        std = (centred.square().mean(-1, keepdim=True) + demo_model.cfg.eps).sqrt()
        with torch.no_grad():
            logits = (demo_model.ln_final(v[:, None])[:, 0] - demo_model.ln_final.b) * std @ demo_model.W_U
        logits = logits - logits.mean(-1, keepdim=True)
        readable = [i for i in range(logits.shape[-1]) if i not in demo_model.tokenizer.all_special_ids]
        top = torch.tensor(readable)[logits[:, readable].topk(CFG.n_logits).indices]
        assert torch.equal(scan.logit_ids[l, :, : CFG.n_logits].long(), top)
        torch.testing.assert_close(
            scan.logit_values[l, :, : CFG.n_logits], logits.gather(-1, top), rtol=1e-4, atol=1e-5
        )
        assert (scan.logit_values[l, :, CFG.n_logits :] < 0).all()


def test_output_logits_pass_each_write_through_the_norm_after_the_mlp(gemma_pair):
    """mlp.hook_out on Gemma 2 is written before each target layer's post-MLP RMSNorm: each decoder
    row goes through that norm with its scale divided out (RMSNorm(v) * rms(v) = v * w), the sum
    through ln_final likewise, then W_U. The norm's weight changes which tokens come first."""
    model, clt, scan = gemma_pair

    def linear(norm, v):  # a TransformerLens RMSNorm with its scale divided out
        return norm(v[:, None])[:, 0] * (v.square().mean(-1, keepdim=True) + model.cfg.eps).sqrt()

    readable = [i for i in range(model.cfg.d_vocab) if i not in model.tokenizer.all_special_ids]
    for l in range(clt.cfg.n_layers):
        with torch.no_grad():
            W = clt.W_dec[l]  # [F, L - l, d]
            written = sum(linear(model.blocks[l + k].ln2_post, W[:, k]) for k in range(W.shape[1]))
            logits = linear(model.ln_final, written) @ model.W_U
            ignored = linear(model.ln_final, W.sum(1)) @ model.W_U  # as if the decoders wrote the residual stream
        logits, ignored = logits - logits.mean(-1, keepdim=True), ignored - ignored.mean(-1, keepdim=True)
        top = torch.tensor(readable)[logits[:, readable].topk(CFG.n_logits).indices]
        assert torch.equal(scan.logit_ids[l, :, : CFG.n_logits].long(), top)
        torch.testing.assert_close(
            scan.logit_values[l, :, : CFG.n_logits], logits.gather(-1, top), rtol=1e-4, atol=1e-5
        )
        assert not torch.equal(torch.tensor(readable)[ignored[:, readable].topk(CFG.n_logits).indices], top)


def test_cards_labels_and_round_trip(random_clt, scan, tmp_path):
    scan.save(tmp_path / "features")
    loaded = load_features(tmp_path / "features", clt=random_clt)
    card = loaded.card(1, 3)
    assert card == scan.card(1, 3)
    assert len(card["contexts"]) == CFG.top_k
    peak_tokens = {c["tokens"][c["acts"].index(max(c["acts"]))] for c in card["contexts"]}
    assert any(f'"{t}"' in card["label"] for t in peak_tokens)
    assert card["label"].endswith(", ".join(t for t, _ in card["top_logits"][:2]))
    other = CrossLayerTranscoder(random_clt.cfg)
    with pytest.raises(CircuitsError, match="another transcoder"):
        load_features(tmp_path / "features", clt=other)


def test_cli_writes_a_scan_and_rejects_bad_input(random_clt, tmp_path, capsys):
    save_transcoder(random_clt, tmp_path / "clt")
    assert main(["features", "--clt", str(tmp_path / "clt"), "--documents", "8", "--top-k", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == str(tmp_path / "clt" / "features")
    assert load_features(out, clt=random_clt).context_max.shape == (4, 12, 2)
    assert main(["features", "--clt", str(tmp_path / "nothing")]) == 2
    assert "holds no transcoder" in capsys.readouterr().err


def test_histogram_counts_positive_activations_only():
    """A JumpReLU feature with a negative threshold can output negative values: they are not counted."""
    from circuits.features import _histogram

    acts = torch.tensor([[[0.5, -0.2], [2.0, 0.0], [-0.1, 1.0], [1.2, 3.0]]])  # [b=1, p=4, F=2]
    counts = _histogram(acts, torch.tensor([2.0, 3.0]), n_bins=4)
    assert counts.tolist() == [[1, 0, 1, 1], [0, 1, 0, 1]]  # bins (0, max/4], (max/4, max/2], ...
