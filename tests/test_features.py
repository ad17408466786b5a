"""Feature cards from a corpus scan, checked against a brute-force pass over each document."""

import pytest
import torch

from circuits.cli import main
from circuits.errors import CircuitsError
from circuits.features import FeatureScanConfig, load_features, scan_features
from circuits.text import TextSource
from circuits.transcoders.circuit_tracer import save_transcoder
from circuits.transcoders.clt import CrossLayerTranscoder

CFG = FeatureScanConfig(n_documents=24, batch_size=10, top_k=4, n_bins=8, n_logits=5)


@pytest.fixture(scope="module")
def scan(demo_model, random_clt):
    return scan_features(demo_model, random_clt, CFG, clt_name="random")


def _reference_acts(model, clt):
    """Per document: (tokens [p], acts [L, p, F]) with BOS zeroed, one forward pass per document."""
    out = []
    for doc in TextSource(CFG.text, seed=CFG.seed).documents(0, CFG.n_documents):
        tokens = model.to_tokens(doc)[0, : CFG.max_tokens_per_doc]
        _, cache = model.run_with_cache(tokens[None])
        acts = torch.stack([clt.encode_layer(cache[f"blocks.{l}.hook_resid_mid"][0], l) for l in range(4)])
        acts[:, 0] = 0
        out.append((tokens, acts.detach()))
    return out


def _window(tokens, acts, peak):
    """Token ids and activations of the window around `peak`, -1 / 0 outside the document."""
    ids, values = [], []
    for i in range(peak - CFG.before, peak + CFG.after + 1):
        inside = 0 <= i < len(tokens)
        ids.append(int(tokens[i]) if inside else -1)
        values.append(float(acts[i]) if inside else 0.0)
    return tuple(ids), values


def test_top_contexts_and_histograms_match_brute_force(demo_model, random_clt, scan):
    ref = _reference_acts(demo_model, random_clt)
    n_tokens = sum(len(t) - 1 for t, _ in ref)
    assert scan.n_tokens == n_tokens
    for l in range(4):
        for f in range(12):
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
