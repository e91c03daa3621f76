"""Vocabulary alignment (tokenizer_source / tokenizer): the output tokenizer, the row recipe, and
align_rows against a token-by-token transcription of mergekit 0.1.5's PermutedVocabulary."""
import json
import os
import zlib

import pytest
import torch
import transformers
from safetensors.torch import load_file

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.errors import ConfigError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.ops.fisher import fisher_merge_reference
from merge_engine.vocabulary import align_rows, build_vocabulary
from tests.methods.test_fisher import write_fisher
from tests.vocab_models import BASE_TOKENS, VOCAB_TENSORS, save_tokenizer

ORDER = ("base", "extra", "other", "padded")
OPTIONS = MergeOptions(quiet=True, device="cpu")


@pytest.fixture
def vm(vocab_models):
    return vocab_models


def vocabulary(vm, names=ORDER, **tokenizer):
    cfg = parse_config({"merge_method": "linear", "tokenizer": {"source": "union", **tokenizer},
                        "models": [{"model": vm[n], "parameters": {"weight": 1.0}} for n in names]})
    models = {ref: Checkpoint(ref) for ref in cfg.referenced_models()}
    return build_vocabulary(cfg.tokenizer, models, vm[names[0]])


def aligned_reference(vocab, tensors, models, base):
    """mergekit's PermutedVocabulary token by token: the specification align_rows vectorises."""
    perm = {m: vocab.index[m].tolist() for m in models}
    t = dict(zip(models, tensors))
    defaults = {}
    for tid, token in enumerate(vocab.tokens):
        setting = vocab.settings.get(token)
        forced = bool(setting and setting.force)
        have = [m for m in models if perm[m][tid] >= 0]
        if not forced and len(have) == len(models):
            continue
        source = setting.source if setting else None
        if source is not None and source.kind == "zero" or source is None and not have:
            embed = tensors[0].new_zeros(tensors[0].shape[1:])
        elif source is not None and source.kind == "model_token":
            row = source.token_id if source.token_id is not None else vocab.original[source.model][source.token]
            embed = t[source.model][row]
        elif source is not None:
            embed = t[source.model][perm[source.model][tid]]
        elif len(have) == 1:
            embed = t[have[0]][perm[have[0]][tid]]
        elif base in have:
            embed = t[base][perm[base][tid]]
        else:
            embed = tensors[0].new_zeros(tensors[0].shape[1:])
            for m in have:
                embed = embed + t[m][perm[m][tid]]
            embed /= len(have)
        defaults[token] = embed
    out = []
    for m in models:
        new = tensors[0].new_zeros((vocab.rows, *tensors[0].shape[1:]))
        for tid, token in enumerate(vocab.tokens):
            setting = vocab.settings.get(token)
            if perm[m][tid] >= 0 and not (setting and setting.force):
                new[tid] = t[m][perm[m][tid]]
            elif token in defaults:
                new[tid] = defaults[token]
        if vocab.rows > len(vocab.tokens):
            new[len(vocab.tokens):] = torch.mean(new[:len(vocab.tokens)], dim=0)
        out.append(new)
    return out


TOKEN_SETTINGS = {
    "<|im_start|>": {"source": {"kind": "model_token", "model": "base", "token": "<eos>"}},
    "w0": {"source": "extra", "force": True},  # every input has w0 but "other": forced for all
    "w262": {"source": {"kind": "zero"}},  # only in "other": zeros instead of its row
    "w7": {"source": {"kind": "model_token", "model": "other", "token_id": 3}, "force": True},
    "brand_new": {"source": {"kind": "model_token", "model": "padded", "token_id": 260}},  # a padding row
}


def token_settings(vm):
    def resolve(source):
        if isinstance(source, str):
            return vm[source]
        return {**source, "model": vm[source["model"]]} if "model" in source else source
    return {tok: {**s, "source": resolve(s["source"])} for tok, s in TOKEN_SETTINGS.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["union", "union_tokens_padded", "two_inputs_no_base"])
def test_align_rows_matches_the_reference(vm, case, dtype):
    names = ORDER[2:] if case == "two_inputs_no_base" else ORDER
    kw = {"tokens": token_settings(vm), "pad_to_multiple_of": 24} if case == "union_tokens_padded" else {}
    vocab = vocabulary(vm, ORDER, **kw)
    models = [vm[n] for n in names]
    base = vm["base"] if "base" in names else None
    g = torch.Generator().manual_seed(zlib.crc32(f"{case} {dtype}".encode()))  # fixed per case, across runs
    for width in [(37,), ()]:  # a matrix of odd width, and a bias-like vector
        tensors = [torch.randn((vocab.vocab_size[m], *width), generator=g).to(dtype) for m in models]
        problems = []
        recipe = vocab.recipe(models, base, [len(t) for t in tensors], "t", problems)
        assert not problems
        got = align_rows(recipe, tensors)
        want = aligned_reference(vocab, tensors, models, base)
        assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(got, want))


def test_inputs_already_in_the_output_order_are_not_copied(vm):
    vocab = vocabulary(vm, ("base", "padded"))  # the same tokens; "padded" has 8 more rows
    base, padded = torch.randn(256, 5), torch.randn(264, 5)
    same = vocab.recipe([vm["base"]], vm["base"], [256], "t", [])
    assert same.identity and align_rows(same, [base])[0] is base
    trimmed = vocab.recipe([vm["base"], vm["padded"]], vm["base"], [256, 264], "t", [])
    assert not trimmed.identity and torch.equal(align_rows(trimmed, [base, padded])[1], padded[:256])


def test_union_vocabulary(vm):
    vocab = vocabulary(vm)
    assert vocab.tokens[:256] == BASE_TOKENS  # the base keeps its ids
    # then the other models' plain tokens (config order, each in its id order), then added tokens
    other = transformers.AutoTokenizer.from_pretrained(vm["other"]).get_vocab()
    new_words = sorted((t for t in other if t not in BASE_TOKENS), key=other.get)
    assert vocab.tokens[256:] == new_words + ["<|im_start|>", "<|im_end|>"]
    assert vocabulary(vm).tokens == vocab.tokens  # deterministic (mergekit's order changes between runs)
    for name in ORDER:
        own = transformers.AutoTokenizer.from_pretrained(vm[name]).get_vocab()
        assert vocab.index[vm[name]].tolist() == [own.get(t, -1) for t in vocab.tokens]
    assert vocab.rows == len(vocab.tokens) == 263
    assert vocabulary(vm, pad_to_multiple_of=16).rows == 272


def test_a_model_token_source_out_of_range_is_named(vm):
    vocab = vocabulary(vm, tokens={"w1": {"source": {"kind": "model_token", "model": vm["base"], "token_id": 256},
                                          "force": True}})
    problems = []
    assert vocab.recipe([vm["base"], vm["padded"]], vm["base"], [256, 264], "'emb'", problems) is None
    assert problems == [f"'emb': token 'w1': token id 256 is out of range for {vm['base']} (256 rows)"]


def test_base_tokenizer_is_trimmed_to_the_models_rows(tmp_path):
    from tokenizers import Tokenizer, models
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}
    merges = [("a", "b"), ("ab", "c"), ("b", "c")]
    backend = Tokenizer(models.BPE(vocab, merges))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    folder = tmp_path / "m"
    tok.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"vocab_size": 4}))

    class Model:
        path, config = str(folder), {"vocab_size": 4}
    out = build_vocabulary(parse_config({"merge_method": "linear", "tokenizer_source": "base",
                                         "models": [{"model": str(folder), "parameters": {"weight": 1}}]}).tokenizer,
                           {str(folder): Model()}, str(folder))
    assert out.tokens == ["a", "b", "c", "ab"]
    assert out.tokenizer.tokenize("abc") == ["ab", "c"]  # the merges into removed tokens are gone too


def merged(vm, tmp_path, cfg, name="out", **options):
    out = tmp_path / name
    merge(parse_config(cfg), str(out), MergeOptions(quiet=True, device="cpu", **options))
    return out, load_file(str(out / "model.safetensors"))


def linear(vm, names=ORDER, **top):
    return {"merge_method": "linear", **top,
            "models": [{"model": vm[n], "parameters": {"weight": 0.25 * (i + 1)}} for i, n in enumerate(names)]}


def test_union_merge_end_to_end(vm, tmp_path, folder_tensors):
    out, t = merged(vm, tmp_path, linear(vm, tokenizer={"source": "union", "pad_to_multiple_of": 16,
                                                       "tokens": token_settings(vm)}))
    vocab = vocabulary(vm, pad_to_multiple_of=16, tokens=token_settings(vm))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert [t_ for t_, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])] == vocab.tokens
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab.rows == 272
    inputs = [folder_tensors(vm[n]) for n in ORDER]
    weights = torch.tensor([0.25, 0.5, 0.75, 1.0])
    for name in t:
        per_model = [x[name] for x in inputs]
        if name in VOCAB_TENSORS:
            per_model = aligned_reference(vocab, per_model, [vm[n] for n in ORDER], None)  # linear: no base
        want = sum(w * x for w, x in zip(weights.tolist(), per_model)) / weights.sum()
        torch.testing.assert_close(t[name], want, rtol=1e-6, atol=1e-7)  # fp32 sums in another order
    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # shapes agree with config.json
    assert model.get_input_embeddings().weight.shape == (272, 64)


def test_fisher_merge_aligns_the_fisher_with_its_weight(vm, tmp_path, folder_tensors):
    inputs = [folder_tensors(vm[n]) for n in ORDER]
    fishers = [write_fisher(str(tmp_path / f"f{i}"), x, seed=i) for i, x in enumerate(inputs)]
    cfg = {"merge_method": "fisher", "tokenizer_source": "union",
           "models": [{"model": vm[n], "fisher": str(tmp_path / f"f{i}"), "parameters": {"weight": 1.0}}
                      for i, n in enumerate(ORDER)]}
    _, t = merged(vm, tmp_path, cfg)
    vocab = vocabulary(vm)
    refs = [vm[n] for n in ORDER]
    for name in t:
        weights, fisher = [x[name] for x in inputs], [f[name] for f in fishers]
        if name in VOCAB_TENSORS:
            weights = aligned_reference(vocab, weights, refs, None)
            fisher = aligned_reference(vocab, fisher, refs, None)
        want = fisher_merge_reference(weights, fisher, [1.0] * 4, [1e-6, 0.0, 0.0, 0.0])
        assert torch.equal(t[name], want), name


def test_tokenizer_source_base_keeps_the_base_vocabulary(vm, tmp_path):
    out, t = merged(vm, tmp_path, linear(vm, ("base", "padded"), tokenizer_source="base"))
    assert t["model.embed_tokens.weight"].shape == (256, 64)  # "padded"'s 8 extra rows are dropped
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 256


def test_tokens_added_to_the_base_vocabulary(vm, tmp_path):
    # (mergekit 0.1.5 fails on this config: it adds the tokens to the base's own tokenizer, KeyError 256)
    settings = {"new_a": {"source": {"kind": "model_token", "model": vm["extra"], "token": "<|im_end|>"}},
                "new_b": {"source": {"kind": "zero"}}}
    cfg = linear(vm, ("base", "extra"), tokenizer={"source": "base", "tokens": settings})
    out, t = merged(vm, tmp_path, cfg)
    src = load_file(os.path.join(vm["extra"], "model.safetensors"))
    emb = t["model.embed_tokens.weight"]
    assert emb.shape == (258, 64) and json.loads((out / "config.json").read_text())["vocab_size"] == 258
    # both inputs take extra's <|im_end|> row: their weighted mean is that row, up to fp32 rounding
    torch.testing.assert_close(emb[256], src["model.embed_tokens.weight"][257], rtol=1e-6, atol=0)
    assert not emb[257].any()


def test_without_a_tokenizer_setting_the_donors_files_are_copied(vm, tmp_path):
    out, _ = merged(vm, tmp_path, linear(vm, ("padded",)))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == open(os.path.join(vm["padded"], f), "rb").read()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 264


def test_a_tokenizer_is_written_even_with_no_copy_tokenizer(vm, tmp_path):
    out, _ = merged(vm, tmp_path, linear(vm, tokenizer_source="union"), copy_tokenizer=False)
    assert len(transformers.AutoTokenizer.from_pretrained(out).get_vocab()) == 263


@pytest.mark.parametrize("change,match", [
    (lambda vm, c: c.update(tokenizer_source="union", tokenizer={"source": "base"}), "not both"),
    (lambda vm, c: c.update(tokenizer={"source": "union", "pad_to_multiple_of": -8}), "pad_to_multiple_of"),
    (lambda vm, c: c.update(tokenizer={"tokens": {"x": {"force": True}}}), "force needs a source"),
    (lambda vm, c: c.update(tokenizer={"tokens": {"x": {"source": {"kind": "model_token", "model": vm["base"]}}}}),
     "one of token_id or token"),
    (lambda vm, c: c.update(tokenizer={"tokens": {"x": {"source": {"kind": "mean"}}}}), "kind: zero"),
    (lambda vm, c: c.update(tokenizer={"tokens": {"x": {"source": "/elsewhere"}}}), "not a model of this merge"),
    (lambda vm, c: c.update(tokenizer={"tokens": {"w1": {"source": {"kind": "model_token", "model": vm["base"],
                                                                    "token": "nope"}, "force": True}}}),
     "has no token 'nope'"),
    (lambda vm, c: c.update(tokenizer={"tokens": {"w260": {"source": vm["base"]}}}), "which lacks it"),
    (lambda vm, c: c.update(modules={"text": {}}), "exactly one of 'models', 'slices' or 'modules'"),
])
def test_bad_tokenizer_settings_are_refused_before_any_write(vm, tmp_path, change, match):
    cfg = linear(vm)
    change(vm, cfg)
    with pytest.raises(ConfigError, match=match):
        merge(parse_config(cfg), str(tmp_path / "out"), OPTIONS)
    assert not (tmp_path / "out").exists()


def test_a_base_without_a_tokenizer_is_named(vm, model_sets, tmp_path):
    base = model_sets("llama")[0]  # no tokenizer files
    cfg = {"merge_method": "linear", "tokenizer_source": "union",
           "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, vm["base"])]}
    with pytest.raises(ConfigError, match=f"{base}: cannot load its tokenizer"):
        merge(parse_config(cfg), str(tmp_path / "out"), OPTIONS)


def test_position_embeddings_are_not_vocabulary_rows(tmp_path):
    # GPT-2 with n_positions == vocab_size: wpe has vocab_size rows but is indexed by position
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=256, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    folders = []
    for i in range(2):
        folders.append(str(tmp_path / f"gpt2_{i}"))
        transformers.GPT2LMHeadModel(cfg).save_pretrained(folders[-1])
        save_tokenizer(folders[-1], BASE_TOKENS[:255] + ["<|x|>"] if i else BASE_TOKENS)
    out, t = merged(None, tmp_path, {"merge_method": "linear", "tokenizer_source": "union",
                                     "models": [{"model": m, "parameters": {"weight": 1.0}} for m in folders]})
    assert t["transformer.wte.weight"].shape == (257, 16) and t["transformer.wpe.weight"].shape == (256, 16)


def test_unsafe_truncation_keeps_the_rows_every_input_has(vm, tmp_path, folder_tensors, caplog):
    """--unsafe-truncate-embeddings without a tokenizer setting: each vocabulary tensor is the merge of its
    inputs' first rows (as many as the smallest vocab_size), one warning per tensor; config.json says so."""
    names = ("extra", "padded", "base")  # 258, 264 and 256 rows
    with pytest.raises(ConfigError, match="has shape \\[264, 64\\]"):
        merged(vm, tmp_path, linear(vm, names), "refused")
    with caplog.at_level("WARNING", logger="merge_engine"):
        out, t = merged(vm, tmp_path, linear(vm, names), unsafe_truncate_embeddings=True)
    assert sorted(r.getMessage().split("'")[1] for r in caplog.records if "UNSAFE" in r.getMessage()) == sorted(VOCAB_TENSORS)
    inputs = [folder_tensors(vm[n]) for n in names]
    weights = [0.25, 0.5, 0.75]
    for name in t:
        per_model = [x[name][:256] if name in VOCAB_TENSORS else x[name] for x in inputs]
        want = sum(w * x for w, x in zip(weights, per_model)) / sum(weights)
        torch.testing.assert_close(t[name], want, rtol=1e-6, atol=1e-7)  # fp32 sums in another order
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 256
    # a tokenizer setting aligns the vocabularies instead: the option changes nothing then
    with_tokenizer = linear(vm, names, tokenizer_source="base")
    _, aligned = merged(vm, tmp_path, with_tokenizer, "aligned", unsafe_truncate_embeddings=True)
    _, plain = merged(vm, tmp_path, with_tokenizer, "plain")
    assert aligned.keys() == plain.keys() and all(torch.equal(aligned[n], plain[n]) for n in plain)


def test_a_tokenizer_naming_its_own_code_is_never_run(vocab_models, tmp_path, monkeypatch):
    """auto_map in tokenizer_config.json names Python the folder ships: transformers would ask on a terminal
    whether to run it (and import it on yes); the merge loads tokenizers with trust_remote_code=False."""
    import builtins
    import shutil

    from merge_engine.vocabulary import load_tokenizer
    folder = tmp_path / "custom"
    shutil.copytree(vocab_models["extra"], folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    ran = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("transformers asked whether to run the code"))
    with pytest.raises(ValueError, match="custom code"):
        load_tokenizer(transformers, str(folder))
    assert not ran.exists()


def test_a_tokenizer_setting_with_no_tensor_of_vocab_size_rows_is_refused(vocab_models, tmp_path):
    """config.json's vocab_size decides which tensors are vocabulary-indexed: where it matches no tensor, nothing
    would be aligned (rows averaged by position) while the output's tokenizer and config changed."""
    import shutil

    from merge_engine.plan import build_plan
    folders = []
    for name in ("base", "extra"):
        shutil.copytree(vocab_models[name], tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "vocab_size": 4096}))
        folders.append(str(tmp_path / name))
    cfg = parse_config({"merge_method": "linear", "tokenizer_source": "union",
                        "models": [{"model": f, "parameters": {"weight": 0.5}} for f in folders]})
    with pytest.raises(ConfigError, match=r"the config sets a tokenizer, but no tensor has as many rows as its "
                                          r"model's vocab_size \(.*base: 4096, .*extra: 4096\)"):
        build_plan(cfg)


def test_a_token_that_cannot_be_placed_is_the_only_problem_named(vm, tmp_path):
    # rows that cannot be aligned are not also compared as whole shapes (the inputs' vocabularies differ)
    cfg = linear(vm)
    cfg["tokenizer"] = {"source": "union", "tokens": {"w260": {"source": vm["base"]}}}
    with pytest.raises(ConfigError, match="which lacks it") as e:
        merge(parse_config(cfg), str(tmp_path / "out"), OPTIONS)
    assert not [p for p in e.value.problems if "has shape" in p or "no tensor has" in p], e.value.problems
