"""merge-engine tokensurgeon with hostile and unusual inputs: every refusal one line naming the culprit with nothing
written and the inputs unchanged; outputs of unusual pairs (another architecture, tied heads, other widths, bf16,
added tokens, BASE+ADAPTER, shards) right and loadable; runs with one seed identical; mergekit's rows where
mergekit-tokensurgeon works. (Parity method by method: tests/test_tokensurgeon.py.)"""
import json
import os
import random
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine import cli
from merge_engine import token_approximation as approx
from tests.conftest import _folder_tensors, find_mergekit, folder_digest
from tests.vocab_models import BASE_TOKENS, VOCAB_TENSORS, save_tokenizer

METHODS = ("omp", "common_interpolation", "subword", "mean", "zero", "randn", "john_hewitt", "landmark_pca", "stb",
           "mp_rope")


def surgeon(capsys, model, donor, out, *flags) -> tuple[int, str]:
    status = cli.main(["tokensurgeon", str(model), str(donor), str(out), "-q", *flags])
    return status, capsys.readouterr().err


def copy_model(src, dst, tensors=None, config=None, drop=()) -> str:
    """src copied to dst, its tensors and config.json changed by the given functions, files in drop removed."""
    shutil.copytree(src, dst)
    if tensors:
        path = os.path.join(dst, "model.safetensors")
        save_file(tensors(load_file(path)), path, metadata={"format": "pt"})
    if config:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            changed = config(json.load(f))
        with open(path, "w") as f:
            json.dump(changed, f)
    for name in drop:
        os.remove(os.path.join(dst, name))
    return str(dst)


def changed(name, change):
    return lambda tensors: {**tensors, name: change(tensors[name])}


def in_dtype(dtype):
    return lambda tensors: {k: v.to(dtype) for k, v in tensors.items()}


def shuffled_tokens(seed: int, first: int) -> list[str]:
    """The special tokens, then words from w{first} on (some the base lacks), in a seeded order."""
    tokens = BASE_TOKENS[:3] + [f"w{i}" for i in range(first, first + 253)]
    random.Random(seed).shuffle(tokens)
    return tokens


def make_gpt2(folder, width: int) -> str:
    """A one-layer GPT-2 (tied head, 4 heads) of this width with a word-level tokenizer."""
    import transformers as tf
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=256, n_embd=width, n_layer=1, n_head=4, n_positions=32)
                       ).save_pretrained(str(folder))
    save_tokenizer(str(folder), shuffled_tokens(2, 20))
    return str(folder)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, vocab_models):
    """Models unlike the Llama pairs: a GPT-2 with a tied head (another architecture, other names), one 32 wide, a
    Qwen2 with a tied head, a Gemma 3, bf16 and fp16 copies of the vocab models, the base with a LoRA adapter."""
    import transformers as tf

    from merge_engine.demo import make_models
    from tests.lora_adapters import write_adapter
    work = tmp_path_factory.mktemp("odd")
    out = {}
    for name, width in (("gpt2", 64), ("gpt2_narrow", 32)):
        out[name] = make_gpt2(work / name, width)
    out["qwen2"] = make_models(str(work / "qwen2"), "qwen2", 0)[0]
    save_tokenizer(out["qwen2"], BASE_TOKENS)
    torch.manual_seed(0)  # (RoPE bases by layer type: 10000 for sliding-window layers, 1000000 for the others)
    tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             max_position_embeddings=32)).save_pretrained(str(work / "gemma3"))
    save_tokenizer(str(work / "gemma3"), BASE_TOKENS)
    out["gemma3"] = str(work / "gemma3")
    for name, dtype, src in (("base_bf16", torch.bfloat16, "base"), ("other_bf16", torch.bfloat16, "other"),
                             ("base_fp16", torch.float16, "base")):
        out[name] = copy_model(vocab_models[src], work / name, tensors=in_dtype(dtype),
                               config=lambda c, d=str(dtype).removeprefix("torch."): {**c, "dtype": d})
    write_adapter(str(work / "adapter"), vocab_models["base"], embedding="model.embed_tokens")
    out["adapter"] = str(work / "adapter")
    return out


# ------------------------------------------------------------------------------------------------ refusals

def no_tokenizer(vocab_models, tmp):
    return vocab_models["base"], copy_model(vocab_models["other"], tmp / "donor",
                                            drop=("tokenizer.json", "tokenizer_config.json")), [], "tokenizer"


def no_config(vocab_models, tmp):
    return vocab_models["base"], copy_model(vocab_models["other"], tmp / "donor", drop=("config.json",)), [], \
        "config.json"


def no_embeddings(vocab_models, tmp):
    model = copy_model(vocab_models["base"], tmp / "model",
                       tensors=lambda t: {k: v for k, v in t.items() if k != "model.embed_tokens.weight"})
    return model, vocab_models["other"], [], "'model.embed_tokens.weight' (its input embeddings) is missing"


def flat_embeddings(vocab_models, tmp):
    model = copy_model(vocab_models["base"], tmp / "model", tensors=changed("model.embed_tokens.weight",
                                                                           torch.flatten))
    return model, vocab_models["other"], [], "'model.embed_tokens.weight' is [16384], not a matrix"


def cubic_donor_head(vocab_models, tmp):
    donor = copy_model(vocab_models["other"], tmp / "donor", tensors=changed("lm_head.weight", lambda t: t[None]))
    return vocab_models["base"], donor, [], "'lm_head.weight' is [1, 256, 64], not a matrix"


def nothing_shared(vocab_models, tmp):
    donor = copy_model(vocab_models["other"], tmp / "donor", drop=("tokenizer.json", "tokenizer_config.json"))
    save_tokenizer(donor, BASE_TOKENS[:3] + [f"z{i}" for i in range(253)])
    return vocab_models["base"], donor, ["-k", "8"], "omp needs at least 8 tokens both vocabularies share (--k); " \
                                                     "they share 3"


def k_beyond_shared(vocab_models, tmp):
    return vocab_models["base"], vocab_models["other"], ["-k", "252", "-a", "stb"], "they share 251"


def k_zero(vocab_models, tmp):
    return vocab_models["base"], vocab_models["other"], ["-k", "0"], "k must be a whole number of at least 1"


def k_zero_with_noise_and_scale(vocab_models, tmp):
    """(-nvn and -nvs, mergekit's names, were read as short flags run together, -v among them: a traceback.)"""
    return vocab_models["base"], vocab_models["other"], ["-k", "0", "-nvn", "0.1", "-nvs", "2"], "k must be"


def nan_noise(vocab_models, tmp):
    return vocab_models["base"], vocab_models["other"], ["-nvn", "nan"], "new_vocab_noise"


def infinite_scale(vocab_models, tmp):
    return vocab_models["base"], vocab_models["other"], ["-nvs", "inf"], "new_vocab_scale"


def heads_not_dividing_the_width(vocab_models, tmp):
    """(transformers refuses it with huggingface_hub's StrictDataclassClassValidationError, not a ValueError: it
    ended in a traceback.)"""
    donor = copy_model(vocab_models["other"], tmp / "donor", config=lambda c: {**c, "num_attention_heads": 5})
    return vocab_models["base"], donor, ["-a", "mp_rope", "-k", "8"], "donor: transformers cannot read its config.json"


def no_heads(vocab_models, tmp):
    """(transformers' check of the config divides by it: a ZeroDivisionError and a traceback.)"""
    donor = copy_model(vocab_models["other"], tmp / "donor", config=lambda c: {**c, "num_attention_heads": 0})
    return vocab_models["base"], donor, ["-k", "8"], "donor: transformers cannot read its config.json"


def rope_parameters_base_not_a_number(vocab_models, tmp):
    """(Only mp_rope reads the donor's RoPE base; it ended in a TypeError, a traceback.)"""
    donor = copy_model(vocab_models["other"], tmp / "donor",
                       config=lambda c: {**c, "rope_parameters": {"rope_theta": "abc", "rope_type": "default"}})
    return vocab_models["base"], donor, ["-k", "8", "-a", "mp_rope"], "mp_rope needs a positive RoPE base"


def rope_theta_not_a_number(vocab_models, tmp):
    """(transformers 5 reads rope_parameters and builds the model; mp_rope read rope_theta: a ValueError.)"""
    donor = copy_model(vocab_models["other"], tmp / "donor", config=lambda c: {**c, "rope_theta": "abc"})
    return vocab_models["base"], donor, ["-k", "8", "-a", "mp_rope"], "mp_rope needs a positive RoPE base, " \
                                                                      "config.json gives 'abc'"


def mp_rope_without_rope(vocab_models, tmp):
    """(A GPT-2 config names its heads n_head: the message read "gives None and None".)"""
    return vocab_models["base"], make_gpt2(tmp / "donor", 64), ["-k", "8", "-a", "mp_rope"], \
        "model_type 'gpt2') has neither"


REFUSED = [no_tokenizer, no_config, no_embeddings, flat_embeddings, cubic_donor_head, nothing_shared,
           k_beyond_shared, k_zero, k_zero_with_noise_and_scale, nan_noise, infinite_scale, heads_not_dividing_the_width,
           no_heads, rope_parameters_base_not_a_number, rope_theta_not_a_number,
           mp_rope_without_rope]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.__name__)
def test_refused_in_one_line_naming_the_culprit_and_nothing_written(case, vocab_models, tmp_path, capsys):
    model, donor, flags, culprit = case(vocab_models, tmp_path)
    digests = [folder_digest(f) for f in (model, donor)]
    status, err = surgeon(capsys, model, donor, tmp_path / "out", *flags)
    assert status == 2 and "Traceback" not in err and culprit in err, err
    assert not os.path.exists(tmp_path / "out") and [folder_digest(f) for f in (model, donor)] == digests
    assert not [f for f in os.listdir(tmp_path) if f not in ("model", "donor")]  # (no temporary folder left)


def test_an_existing_output_is_refused_before_any_tensor_is_read(vocab_models, tmp_path, capsys, monkeypatch):
    """(It was refused when writing began, after every row had been computed: minutes to hours on a large
    vocabulary.)"""
    from merge_engine.io.checkpoint import Checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def no_reading(self, name, *args, **kwargs):
        raise AssertionError(f"{name} read before the output folder was checked")
    monkeypatch.setattr(Checkpoint, "read", no_reading)
    status, err = surgeon(capsys, vocab_models["base"], vocab_models["other"], out, "-k", "8")
    assert status == 2 and "output folder exists and is not empty; pass --overwrite" in err, err
    assert os.listdir(out) == ["keep.txt"]
    monkeypatch.undo()
    assert surgeon(capsys, vocab_models["base"], vocab_models["other"], out, "-k", "8", "--overwrite")[0] == 0
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


# -------------------------------------------------------------------------------------------- right outputs

def loaded_tokenizer(folder):
    """The tokenizer as transformers loads it. (transformers 5 loads any tokenizer in a Qwen2 folder as a
    Qwen2Tokenizer, whatever class tokenizer_config.json names: a Qwen2 model's output, mergekit's as ours, holds the
    donor's tokenizer.json but loads as another tokenizer.)"""
    import transformers

    from merge_engine.vocabulary import load_tokenizer
    return load_tokenizer(transformers, folder)


def normalized(folder) -> dict:
    import transformers

    from merge_engine.tokensurgeon import normalized_vocabulary
    return normalized_vocabulary(transformers, loaded_tokenizer(folder))


def vocabulary_tensors(tensors: dict) -> list[str]:
    return [n for n in tensors if n.endswith(("embed_tokens.weight", "wte.weight", "lm_head.weight"))]


def assert_right_output(model_tensors: dict, model_folder: str, donor: str, out: str) -> None:
    """Rows of tokens the model has are its rows bit for bit, every other tensor is the model's, config.json's
    vocab_size is the rows, the tokenizer is the donor's, and transformers loads every weight."""
    import transformers
    ours, model_vocab, donor_vocab = _folder_tensors(out), normalized(model_folder), normalized(donor)
    assert sorted(ours) == sorted(model_tensors)
    with open(os.path.join(out, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    for name in vocabulary_tensors(model_tensors):
        new, old = ours[name], model_tensors[name]
        assert new.shape == (vocab_size, old.shape[1]) and new.dtype == old.dtype, name
        assert torch.isfinite(new.float()).all(), name
        for token, row in donor_vocab.items():
            if model_vocab.get(token, old.shape[0]) < old.shape[0] and row < new.shape[0]:
                assert torch.equal(new[row], old[model_vocab[token]]), (name, token)
    for name in set(model_tensors) - set(vocabulary_tensors(model_tensors)):
        assert torch.equal(ours[name], model_tensors[name]), name
    assert normalized(out) == donor_vocab or "qwen2" in model_folder  # (see loaded_tokenizer)
    with open(os.path.join(out, "tokenizer.json")) as f:
        assert json.load(f) == json.loads(loaded_tokenizer(donor).backend_tokenizer.to_str())
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info


PAIRS = {  # name: (model, donor, flags)
    "gpt2 donor, tied": ("base", "gpt2", ["-k", "8"]),
    "gpt2 donor, 32 wide": ("base", "gpt2_narrow", ["-k", "8", "-a", "landmark_pca"]),
    "gpt2 model, tied": ("gpt2", "other", ["-k", "8", "-a", "subword"]),
    "qwen2 model, tied": ("qwen2", "other", ["-k", "8", "--magikarp"]),
    "qwen2 donor, tied": ("base", "qwen2", ["-k", "8", "-a", "stb"]),
    "donor's added tokens past its rows": ("other", "extra", ["-k", "8"]),
    "model's rows past its tokens": ("padded", "other", ["-k", "8", "-a", "common_interpolation"]),
    "fp16 model, bf16 donor": ("base_fp16", "other_bf16", ["-k", "8", "-a", "mp_rope"]),
    "batch of one": ("base", "other", ["-k", "8", "--batch-size", "1", "-nvn", "0.01"]),
    "nothing to approximate, k past the vocabulary": ("base", "base_bf16", ["-k", "1000"]),  # (was refused)
    "batch size 0": ("base", "other", ["-k", "8", "--batch-size", "0", "-pm", "yes", "-bm", "yes"]),
}


@pytest.mark.parametrize("pair", PAIRS)
def test_an_unusual_pair_gives_a_right_output(pair, vocab_models, odd_models, tmp_path, capsys):
    model, donor = ((vocab_models | odd_models)[n] for n in PAIRS[pair][:2])
    flags = PAIRS[pair][2]
    digests = [folder_digest(f) for f in (model, donor)]
    assert surgeon(capsys, model, donor, tmp_path / "out", *flags)[0] == 0
    assert_right_output(_folder_tensors(model), model, donor, str(tmp_path / "out"))
    assert [folder_digest(f) for f in (model, donor)] == digests


def test_mp_rope_refuses_a_model_with_a_rope_base_per_layer_type(vocab_models, odd_models, tmp_path, capsys):
    """(It took 10000 for Gemma 3, whose config.json gives 1000000 for its global layers and 10000 for the
    others; mergekit fails on it.) Other methods take it."""
    model, donor = odd_models["gemma3"], vocab_models["other"]
    status, err = surgeon(capsys, model, donor, tmp_path / "out", "-k", "8", "-a", "mp_rope")
    assert status == 2 and "Traceback" not in err and "one RoPE base" in err and "full_attention" in err, err
    assert not os.path.exists(tmp_path / "out")
    assert surgeon(capsys, model, donor, tmp_path / "out", "-k", "8")[0] == 0
    assert_right_output(_folder_tensors(model), model, donor, str(tmp_path / "out"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_bf16(method, odd_models, tmp_path, capsys):
    """(mergekit-tokensurgeon fails on some: common_interpolation, for one.)"""
    model, donor = odd_models["base_bf16"], odd_models["other_bf16"]
    assert surgeon(capsys, model, donor, tmp_path / "out", "-k", "8", "-a", method, "--magikarp")[0] == 0
    ours = _folder_tensors(tmp_path / "out")
    assert all(ours[n].dtype == torch.bfloat16 and torch.isfinite(ours[n].float()).all() for n in VOCAB_TENSORS)


def test_base_adapter_and_sharded_models(vocab_models, odd_models, tmp_path, capsys):
    """A BASE+ADAPTER model gives the rows of the adapted model; a sharded output read back as model and donor
    gives what the single file gives."""
    from merge_engine.io.lora import open_model
    adapted = f"{vocab_models['base']}+{odd_models['adapter']}"
    assert surgeon(capsys, adapted, vocab_models["other"], tmp_path / "lora", "-k", "8")[0] == 0
    merged = open_model(adapted)
    assert_right_output({n: merged.read(n) for n in merged.tensors}, vocab_models["base"], vocab_models["other"],
                        str(tmp_path / "lora"))
    assert surgeon(capsys, vocab_models["base"], vocab_models["other"], tmp_path / "sharded", "-k", "8",
                   "--out-shard-size", "20K")[0] == 0
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    for model, donor in ((tmp_path / "sharded", vocab_models["extra"]), (vocab_models["extra"], tmp_path / "sharded")):
        assert surgeon(capsys, model, donor, tmp_path / "again", "-k", "8")[0] == 0
        assert_right_output(_folder_tensors(model), str(model), str(donor), str(tmp_path / "again"))
        shutil.rmtree(tmp_path / "again")


# ---------------------------------------------------------------------------------------------- determinism

def at_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x's values in storage starting `offset` elements into a fresh buffer (another alignment)."""
    buffer = torch.zeros(x.numel() + offset, dtype=x.dtype)
    view = buffer[offset:].view(x.shape)
    view.copy_(x)
    return view


LEAST_SQUARES = {  # the approximations that solve least-squares problems
    "least_squares": lambda a, b, c: approx.combine_rows(*approx.interpolation_weights(a, b, 8, False,
                                                                                       "least_squares"), c),
    "barycentric": lambda a, b, c: approx.combine_rows(*approx.interpolation_weights(a, b, 8, True, "barycentric"),
                                                       c),
    "stb": lambda a, b, c: approx.from_token_basis(a, b, c, approx.token_basis(b, c, 8)),
    "mp_rope": lambda a, b, c: approx.matching_pursuit_rope(a, b, c, 8, 4, 4, 10000.0, 500000.0),
}


@pytest.mark.parametrize("method", LEAST_SQUARES)
def test_least_squares_rows_do_not_depend_on_where_the_inputs_lie(method):
    """(torch.linalg.lstsq's default CPU driver, LAPACK gelsy from MKL, gives other last bits from run to run and
    with the inputs' alignment: two runs with one seed gave different files, as mergekit-tokensurgeon's do.)"""
    gen = torch.Generator().manual_seed(0)
    targets, donor, orig = (torch.randn(n, 64, generator=gen) for n in (40, 200, 200))
    first = LEAST_SQUARES[method](targets, donor, orig)
    for offset in range(1, 24):
        again = LEAST_SQUARES[method](*(at_offset(x, offset) for x in (targets, donor, orig)))
        assert torch.equal(first, again), offset


@pytest.mark.parametrize("flags", [["-a", m] for m in ("randn", "john_hewitt", "landmark_pca", "stb", "mp_rope")]
                         + [["-a", "common_interpolation", "-w", "least_squares"], ["-nvn", "0.1"]],
                         ids=" ".join)
def test_two_runs_with_one_seed_give_identical_files(flags, bpe_models, tmp_path, capsys):
    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        assert surgeon(capsys, bpe_models["bpe_base"], bpe_models["bpe_other"], out, "-k", "8", "--random-seed",
                       "7", *flags)[0] == 0
    assert sorted(os.listdir(runs[0])) == sorted(os.listdir(runs[1]))
    for name in os.listdir(runs[0]):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name


# ------------------------------------------------------------------------------------------- mergekit parity

MERGEKIT_PAIRS = {
    "gpt2 donor": ("base", "gpt2", ["-k", "8"]),
    "qwen2 tied model": ("qwen2", "other", ["-k", "8", "-a", "subword", "-s", "first_last"]),
    "bf16": ("base_bf16", "other_bf16", ["-k", "8", "--magikarp"]),
    "donor's added tokens": ("other", "extra", ["-a", "mean"]),
}


@pytest.mark.parametrize("pair", MERGEKIT_PAIRS)
def test_mergekit_rows_for_unusual_pairs(pair, vocab_models, odd_models, tmp_path, capsys):
    mergekit = find_mergekit()
    if mergekit is None:
        pytest.skip("mergekit is not installed (set MERGEKIT_YAML or run tools/test.sh with MERGEKIT=1)")
    names = MERGEKIT_PAIRS[pair]
    model, donor = ((vocab_models | odd_models)[n] for n in names[:2])
    subprocess.run([os.path.join(os.path.dirname(mergekit), "mergekit-tokensurgeon"), model, donor,
                    str(tmp_path / "theirs"), *names[2]], check=True, capture_output=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
    assert surgeon(capsys, model, donor, tmp_path / "ours", *names[2])[0] == 0
    ours, theirs = (_folder_tensors(tmp_path / d) for d in ("ours", "theirs"))
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "theirs")]
    assert configs[0] == configs[1]


@pytest.mark.parametrize("method", ["omp", "stb"])
def test_k_past_the_width_and_past_256(method, bpe_models, tmp_path, capsys):
    """(With k above 256 on a model narrower than k, orthogonal matching pursuit's re-orthogonalisation every 256
    steps took the QR of more columns than the width, which has only the width's: a RuntimeError and a traceback.
    mergekit-tokensurgeon fails alike; k from the width to 256 gives mergekit's rows.)"""
    model, donor = bpe_models["bpe_base"], bpe_models["bpe_other"]  # (64 wide, 267 tokens shared)
    status, err = surgeon(capsys, model, donor, tmp_path / "out", "-k", "260", "-a", method)
    assert status == 0, err
    assert_right_output(_folder_tensors(model), model, donor, str(tmp_path / "out"))


def test_matching_pursuit_re_orthogonalises_only_within_the_width():
    """Past the width the residual is zero and Q has no room for more orthonormal columns: the re-orthogonalisation
    stops there, and the k atoms chosen are still k distinct ones, with finite coefficients, the same as without it."""
    gen = torch.Generator().manual_seed(0)
    targets, atoms = torch.randn(5, 16, generator=gen), torch.randn(300, 16, generator=gen)
    indices, coefficients = approx.orthogonal_matching_pursuit(targets, atoms, 40, reorthogonalize_every=20)
    assert all(len(set(row.tolist())) == 40 for row in indices) and torch.isfinite(coefficients).all()
    plain = approx.orthogonal_matching_pursuit(targets, atoms, 40)
    assert torch.equal(indices, plain[0]) and torch.equal(coefficients, plain[1])
