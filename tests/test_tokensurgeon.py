"""merge_engine/tokensurgeon.py: a model given a donor's tokenizer, as mergekit-tokensurgeon gives it: parity with
mergekit-tokensurgeon per approximation method (tensors and config.json), rows recovered where the donor's space is
a known map of the model's, and the output loading in transformers with the donor's tokenizer."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine.errors import ConfigError, MergeEngineError
from merge_engine.tokensurgeon import SurgeryOptions, transplant_tokenizer
from tests.conftest import find_mergekit, folder_digest

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _variant(src: str, dst: str, dtype: torch.dtype | None = None, tie: bool = False) -> str:
    """A copy of a model folder in another dtype, or with its head tied to its embeddings (no lm_head stored)."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    if dtype is not None:
        tensors = {n: t.to(dtype) for n, t in tensors.items()}
    if tie:
        del tensors[HEAD]
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.update({"tie_word_embeddings": True} if tie else {})
    config.update({"dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return dst


@pytest.fixture(scope="module")
def pairs(bpe_models, tmp_path_factory):
    """{fp32, bf16, tied}: (model, donor) folders whose byte-level BPE tokenizers differ (tests/vocab_models.py:
    the model's 300 rows and 2 added tokens past them, the donor's 310 tokens; 267 tokens shared)."""
    root = tmp_path_factory.mktemp("surgery")
    model, donor = bpe_models["bpe_base"], bpe_models["bpe_other"]
    return {"fp32": (model, donor),
            "bf16": tuple(_variant(p, str(root / f"bf16-{i}"), torch.bfloat16) for i, p in enumerate((model, donor))),
            "tied": (_variant(model, str(root / "tied"), tie=True), donor)}


CASES = {  # (models, flags): every deterministic method and option mergekit 0.1.5 runs
    "omp": ("fp32", ["-k", "8"]),
    "omp-batches-of-7": ("fp32", ["-k", "16", "--batch-size", "7"]),
    "omp-bf16": ("bf16", ["-k", "8"]),
    "omp-tied": ("tied", ["-k", "8"]),
    "omp-magikarp": ("fp32", ["-k", "8", "--magikarp"]),
    "interpolation-distance": ("fp32", ["-a", "common_interpolation", "-k", "8"]),
    "interpolation-barycentric-cosine": ("fp32", ["-a", "common_interpolation", "-k", "8", "-w", "barycentric",
                                                  "-c"]),
    "interpolation-least-squares": ("fp32", ["-a", "common_interpolation", "-k", "8", "-w", "least_squares"]),
    "subword-weighted-mean-bf16": ("bf16", ["-a", "subword", "-s", "weighted_mean"]),
    "subword-first-last-matches": ("fp32", ["-a", "subword", "-s", "first_last", "-pm", "yes", "-bm", "yes"]),
    "mean": ("bf16", ["-a", "mean"]),
    "zero-scaled": ("fp32", ["-a", "zero", "-nvs", "2.0"]),
    "landmark-pca": ("fp32", ["-a", "landmark_pca", "--random-seed", "3"]),
}
RANDOM_CASES = {"randn": ["-a", "randn"], "john-hewitt": ["-a", "john_hewitt"]}


def _run_both(pairs, models: str, flags: list[str], tmp_path) -> tuple[dict, dict]:
    mergekit = find_mergekit()
    if mergekit is None:
        pytest.skip("mergekit is not installed (set MERGEKIT_YAML or run tools/test.sh with MERGEKIT=1)")
    model, donor = pairs[models]
    subprocess.run([os.path.join(os.path.dirname(mergekit), "mergekit-tokensurgeon"), model, donor,
                    str(tmp_path / "theirs"), *flags], check=True, capture_output=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
    from merge_engine.cli import main
    assert main(["tokensurgeon", model, donor, str(tmp_path / "ours"), *flags, "-q"]) == 0
    return tuple(load_file(str(tmp_path / d / "model.safetensors")) for d in ("ours", "theirs"))


ROW_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("case", CASES)
def test_the_same_as_mergekit_tokensurgeon(case, pairs, tmp_path):
    """Every tensor but the vocabulary matrices, every copied row and config.json identical. The 43 approximated
    rows are computed in a batch ordered by mergekit's get_vocab() order (a hash order that changes from run to
    run: two mergekit runs differ) and by id here: a row's place in the batched products can change its rounding,
    so they agree to 1e-5 of the row's largest element in fp32 (rounding of a least-squares solve with these
    condition numbers, below 1e2; measured: at most 3e-7, most cases bit for bit), and in bf16 to one bf16 rounding
    of it (2^-8 relative, doubled for the row's largest element as the scale)."""
    ours, theirs = _run_both(pairs, *CASES[case], tmp_path)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
        if name not in (EMBED, HEAD):
            assert torch.equal(ours[name], t), name
            continue
        scale = t.float().abs().amax(dim=1, keepdim=True)
        assert ((ours[name].float() - t.float()).abs() <= ROW_TOLERANCE[t.dtype] * scale).all(), name
        assert (ours[name] != t).any(dim=1).sum() <= 43, name  # (the approximated rows at most)
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "theirs")]
    assert configs[0] == configs[1]


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_rows_are_mergekits_draws(case, pairs, tmp_path):
    """With the same seed the new tokens get mergekit's draws; which token gets which follows mergekit's
    get_vocab() order, a hash order that changes from run to run (merge_engine's is by id), so the rows are
    compared as sets."""
    ours, theirs = _run_both(pairs, "fp32", [*RANDOM_CASES[case], "--random-seed", "3"], tmp_path)
    for name in (EMBED, HEAD):
        rows = [sorted(tuple(r.tolist()) for r in x[name]) for x in (ours, theirs)]
        assert rows[0] == rows[1], name
        assert not torch.equal(ours[name][-1], torch.zeros_like(ours[name][-1]))


@pytest.mark.parametrize("method", ["randn", "john_hewitt", "landmark_pca", "omp"])
def test_the_same_seed_gives_the_same_files(method, pairs, tmp_path):
    model, donor = pairs["fp32"]
    options = SurgeryOptions(method=method, k=8, random_seed=5, new_vocab_noise=0.01)
    for name in ("a", "b"):
        transplant_tokenizer(model, donor, str(tmp_path / name), options)
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")


def _vocab(folder: str) -> dict[str, int]:
    import transformers
    return transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


def test_shared_tokens_keep_their_rows_and_the_output_loads_with_the_donors_tokenizer(pairs, tmp_path):
    import transformers
    model, donor = pairs["fp32"]
    before = folder_digest(model), folder_digest(donor)
    report = transplant_tokenizer(model, donor, str(tmp_path / "out"), SurgeryOptions(k=8))
    assert (folder_digest(model), folder_digest(donor)) == before
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    src = load_file(os.path.join(model, "model.safetensors"))
    model_vocab, donor_vocab, out_vocab = _vocab(model), _vocab(donor), _vocab(str(tmp_path / "out"))
    assert out_vocab == donor_vocab
    shared = [t for t in donor_vocab if t in model_vocab and model_vocab[t] < 300]
    assert len(shared) == report.counts[EMBED].exact == 267
    for name in (EMBED, HEAD):
        assert out[name].shape == (310, 64)
        for t in shared:
            assert torch.equal(out[name][donor_vocab[t]], src[name][model_vocab[t]]), (name, t)
    for name in src:
        if name not in (EMBED, HEAD):
            assert torch.equal(out[name], src[name]), name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert loaded.config.vocab_size == 310
    assert torch.equal(loaded.get_input_embeddings().weight.detach(), out[EMBED])


def _linear_pair(root, transform: torch.Tensor, hidden: int = 64) -> tuple[str, str, list[str]]:
    """(model, donor, the donor's new tokens): word-level tokenizers; the donor has 40 tokens the model lacks, and
    every donor row is its token's true row (the model's, or a random one for a new token) times transform."""
    from merge_engine.demo import make_models
    from tests.vocab_models import save_tokenizer
    shared = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(200)]
    new = [f"n{i}" for i in range(40)]
    model, donor = make_models(str(root / "src"), "llama", 1, torch.float32, seed=21)
    gen = torch.Generator().manual_seed(22)
    truth = {t: torch.randn(hidden, generator=gen, dtype=torch.float64) for t in shared + new}
    for path, tokens, mapping in ((model, shared, None), (donor, new[:20] + shared + new[20:], transform)):
        tensors = load_file(os.path.join(path, "model.safetensors"))
        rows = torch.stack([truth[t] if mapping is None else truth[t] @ mapping for t in tokens])
        tensors[EMBED] = tensors[HEAD] = rows.float().contiguous()
        tensors[HEAD] = tensors[HEAD].clone()
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**config, "vocab_size": len(tokens)}, f)
        save_tokenizer(path, tokens)
    return model, donor, {t: truth[t] for t in new}


@pytest.mark.parametrize("method, transform", [("omp", "invertible"), ("landmark_pca", "orthogonal"),
                                               ("stb", "invertible"), ("mp_rope", "identity")])
def test_rows_are_recovered_where_the_donor_space_is_a_map_of_the_models(method, transform, tmp_path):
    """Donor rows = true rows @ T. omp, T invertible, k = the width: the least-squares coefficients over k shared
    donor rows represent a new token's donor row exactly, and on the model's rows give its true row. landmark_pca,
    T orthogonal: the Procrustes rotation between the spaces' principal axes is T. stb, T invertible: the new row's
    coordinates about the donor's mean row in a basis of shared rows, applied to the same rows of the model about
    its mean row, give true row + model mean - donor mean T^-1 (the donor's mean covers its new tokens too).
    mp_rope, T = I: the rotated atoms are the same in both spaces, so the refitted combination is the row itself.
    Bound: the fp32 solve of a k x k system loses about cond * 2^-24 relative; these random systems' condition
    numbers stay below 1e3, so 1e-3 of the row's norm (a wrong method errs by the order of the row itself)."""
    gen = torch.Generator().manual_seed(23)
    matrix = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    matrix = {"orthogonal": torch.linalg.qr(matrix).Q, "identity": torch.eye(64, dtype=torch.float64),
              "invertible": matrix / 8 + torch.eye(64, dtype=torch.float64)}[transform]
    model, donor, truth = _linear_pair(tmp_path, matrix)
    transplant_tokenizer(model, donor, str(tmp_path / "out"), SurgeryOptions(method=method, k=64, random_seed=1))
    out, vocab = load_file(str(tmp_path / "out" / "model.safetensors")), _vocab(donor)
    inputs = [load_file(os.path.join(p, "model.safetensors")) for p in (model, donor)]
    for name in (EMBED, HEAD):
        offset = 0
        if method == "stb":
            means = [x[name].double().mean(dim=0) for x in inputs]
            offset = means[0] - means[1] @ torch.linalg.inv(matrix)
        for token, row in truth.items():
            got, want = out[name][vocab[token]].double(), row + offset
            assert (got - want).norm() <= 1e-3 * want.norm(), (name, token, (got - want).norm() / want.norm())


def test_prefix_and_byte_matching_take_the_rows_they_name(pairs, tmp_path):
    """-pm embed matches prefixes in the embeddings only (mergekit 0.1.5 swaps embed and lm_head here)."""
    model, donor = pairs["fp32"]
    report = transplant_tokenizer(model, donor, str(tmp_path / "out"), SurgeryOptions(k=8, prefix_match="embed"))
    assert report.counts[EMBED].prefix > 0 and report.counts[HEAD].prefix == 0
    assert report.counts[EMBED].exact == report.counts[HEAD].exact
    out, src = (load_file(os.path.join(p, "model.safetensors")) for p in (str(tmp_path / "out"), model))
    model_vocab, donor_vocab = _vocab(model), _vocab(donor)
    checked = 0
    for token, row in donor_vocab.items():
        marker = "Ġ" if token.startswith("Ġ") else ""  # (a word start is a flag: prefixes of the text after it)
        text = token[len(marker):]
        prefix = marker + text[:-1]
        if token not in model_vocab and len(text) > 1 and text[:-1].strip() and prefix in model_vocab:
            assert torch.equal(out[EMBED][row], src[EMBED][model_vocab[prefix]]), token  # the longest prefix
            checked += 1
    assert checked > 0


def test_the_cli_prints_what_it_did(pairs, tmp_path, capsys):
    from merge_engine.cli import main
    model, donor = pairs["tied"]
    assert main(["tokensurgeon", model, donor, str(tmp_path / "out"), "-k", "4"]) == 0
    assert "310 tokens" in capsys.readouterr().out
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert HEAD not in out and out[EMBED].shape == (310, 64)  # a tied model stays tied


def test_too_few_shared_tokens_are_refused_before_any_write(pairs, tmp_path):
    model, donor = pairs["fp32"]
    with pytest.raises(ConfigError, match="needs at least 500 tokens both vocabularies share.*267"):
        transplant_tokenizer(model, donor, str(tmp_path / "out"), SurgeryOptions(k=500))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("change, match", [({"method": "nearest"}, "approximation method 'nearest'"),
                                           ({"k": 0}, "k must be"), ({"prefix_match": "head"}, "prefix_match")])
def test_bad_options_are_refused(change, match, pairs, tmp_path):
    model, donor = pairs["fp32"]
    with pytest.raises(MergeEngineError, match=match):
        transplant_tokenizer(model, donor, str(tmp_path / "out"), SurgeryOptions(**change))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["randn", "omp", "landmark_pca"])
def test_a_gpu_run_gives_the_cpu_rows(method, pairs, tmp_path):
    """Random draws come from the CPU generator whatever the device, so randn's rows are the CPU's exactly; the
    others' within 1e-4 of the row's largest element (fp32 products and solves in another order: the bound of
    the batch test, with room for GPU reductions and TF32-free cuBLAS sums over 64 terms)."""
    model, donor = pairs["fp32"]
    for device in ("cpu", "cuda"):
        transplant_tokenizer(model, donor, str(tmp_path / device), SurgeryOptions(method=method, k=8,
                                                                                  random_seed=2, device=device))
    cpu, gpu = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cpu", "cuda"))
    for name in (EMBED, HEAD):
        if method == "randn":
            assert torch.equal(cpu[name], gpu[name]), name
        else:
            assert ((cpu[name] - gpu[name]).abs() <= 1e-4 * cpu[name].abs().amax(dim=1, keepdim=True)).all(), name
