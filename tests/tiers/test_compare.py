"""Public against keyed outputs: KL(keyed || public) and top-1 agreement, checked against the keyed checkpoint
written by apply_key, and `merge-engine key compare` end to end."""
import json
import math

import pytest
import torch
import transformers as tf

from merge_engine.cli import main
from merge_engine.demo import make_models
from merge_engine.tiers import TierKey, apply_key, compare_prompts, generate_key
from merge_engine.tiers.compare import Comparison, PromptComparison, position_divergence
from tests.stats.tiny_text import SENTENCES, tiny_tokenizer
from tests.tiers.conftest import read_config


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A 2-layer Llama folder holding the tiny word-level tokenizer, a key for it, and a prompts file."""
    root = tmp_path_factory.mktemp("compare")
    model = make_models(str(root), "llama", n_experts=0, layers=2, seed=7)[0]
    tiny_tokenizer().save_pretrained(model)
    key = generate_key(read_config(model), "compare secret", 0.3, 0.5)
    key.save(str(root / "key.json"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(SENTENCES) + "\n")
    return model, key, str(root / "key.json"), str(prompts)


def test_position_divergence_known_values():
    public = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    keyed = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]]))
    kl, agree = position_divergence(public, keyed)
    torch.testing.assert_close(kl, torch.tensor([0.25 * math.log(0.5) + 0.5 * math.log(2), 0.0]))
    assert agree.tolist() == [False, True]


def test_position_divergence_is_never_negative():
    """Nearly equal distributions: float32 rounding of the sum can go below 0 (-2.5e-7 here), which a KL cannot."""
    g = torch.Generator().manual_seed(0)
    public = torch.randn(64, 1000, generator=g) * 3
    keyed = public + torch.randn(64, 1000, generator=g) * 1e-4
    kl, _ = position_divergence(public, keyed)
    assert (kl >= 0).all()
    exact, _ = position_divergence(public.double(), keyed.double())
    torch.testing.assert_close(kl.double(), exact.clamp(min=0), rtol=0, atol=1e-6)


def test_identity_key_changes_nothing(lm):
    model, _, _, prompts = lm
    comparison = compare_prompts(model, TierKey(), prompts, batch_size=4)
    assert len(comparison.prompts) == len(SENTENCES)
    assert comparison.tokens == sum(len(s.split()) for s in SENTENCES)  # one word, one token
    assert all(p.kl == 0 and p.agreement == 1 for p in comparison.prompts)
    assert comparison.mean_kl == 0 and comparison.agreement == 1


def test_key_matches_the_keyed_checkpoint(lm, tmp_path):
    """Each prompt's KL and agreement, recomputed one prompt at a time (no padding) from the public folder and
    the folder apply_key wrote; the compared run batches 4 prompts with padding. In float64, where batching and
    padding change the logits by ~1e-15, so the KLs (~1e-3) agree to 1e-9 relative."""
    model, key, _, prompts = lm
    comparison = compare_prompts(model, key, prompts, batch_size=4, dtype=torch.float64)
    apply_key(model, key, str(tmp_path / "keyed"))
    public = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64).eval()
    keyed = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "keyed"), dtype=torch.float64).eval()
    tokenizer = tiny_tokenizer()
    assert comparison.mean_kl > 0
    for text, got in zip(SENTENCES, comparison.prompts, strict=True):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            kl, agree = position_divergence(public(ids).logits[0], keyed(ids).logits[0])
        assert got.text == text and got.tokens == ids.shape[1]
        assert got.kl > 0
        assert got.kl == pytest.approx(kl.mean().item(), rel=1e-9)
        assert got.agreement == agree.double().mean().item()


def test_cli_compare(lm, tmp_path, capsys):
    model, _, key, prompts = lm
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:2]))
    assert main(["key", "compare", model, key, key, str(jsonl)]) == 0  # a key twice is the identity tier
    out = capsys.readouterr().out.splitlines()
    assert "KL(keyed||public)" in out[1] and len(out) == 2 + 2 + 1
    assert out[-1].split()[:4] == ["all", str(len(SENTENCES[0].split()) + len(SENTENCES[1].split())), "0.000000",
                                   "100.0%"]
    assert main(["key", "compare", model, key, prompts, "--max-examples", "3", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 + 3 + 1 and float(out[-1].split()[2]) > 0


def test_a_small_kl_is_not_printed_as_zero():
    """0.000000 is what the identity prints; a key that changes a nearly uniform model by 1e-8 nats must not."""
    table = Comparison("m", (PromptComparison("a", 3, 1.5e-8, 1.0), PromptComparison("b", 1, 0.0, 1.0))).table()
    rows = [line.split() for line in table.splitlines()[2:]]
    assert [float(r[2]) for r in rows] == pytest.approx([1.5e-8, 0.0, 1.125e-8], rel=1e-3)
    assert [r[2] for r in rows][1] == "0.000000"


def test_cli_compare_errors(lm, tier_model, tmp_path, capsys):
    model, _, key, prompts = lm
    assert main(["key", "compare", model, key, str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    other = generate_key(read_config(tier_model("gpt2")), "x", 0.3, 0.5)
    other.save(str(tmp_path / "gpt2_key.json"))
    assert main(["key", "compare", model, str(tmp_path / "gpt2_key.json"), prompts]) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["key", "compare", model, prompts])
    positions = read_config(model)["max_position_embeddings"]
    assert main(["key", "compare", model, key, prompts, "--max-length", str(positions + 1)]) == 2
    assert f"--max-length {positions + 1} is more than the {positions} positions" in capsys.readouterr().err
