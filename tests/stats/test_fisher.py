"""Fisher collection: data reading, the Fisher definitions against an fp64 autograd reference, the
saved folder, and the `merge-engine fisher` command."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from merge_engine.cli import main
from merge_engine.errors import MergeEngineError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.experts import with_expert_layout
from merge_engine.io.fishers import load_fisher_manifest
from merge_engine.stats import DataError, compute_fisher, load_data, make_batch, read_texts, save_fisher
from merge_engine.stats.fisher import FisherOptions, collect_fisher, sequence_log_likelihoods, warn_if_swamped
from tests.stats.tiny_text import SENTENCES, tiny_tokenizer

MAX_LENGTH = 16


def load_model(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def sequences(text_file: str) -> list[list[int]]:
    return load_data(text_file, tiny_tokenizer(), MAX_LENGTH).sequences


def fisher(model, seqs, batch_size=None, **kwargs):
    """compute_fisher over seqs cut into right-padded batches (one batch of all when batch_size is None)."""
    batch_size = batch_size or len(seqs)
    batches = [make_batch(seqs[i:i + batch_size], pad_id=0) for i in range(0, len(seqs), batch_size)]
    return compute_fisher(model, batches, progress=False, **kwargs)


# ---- fp64 reference: plain autograd, one unpadded example at a time ----

def example_gradients(model64, seq) -> dict[str, torch.Tensor]:
    """d/dtheta of sum_t log p(x_{t+1} | x_<=t), in float64."""
    params = dict(model64.named_parameters())
    ids = torch.tensor([seq])
    log_probs = model64(input_ids=ids, use_cache=False).logits[0, :-1].log_softmax(-1)
    ll = log_probs.gather(1, ids[0, 1:, None]).sum()
    grads = torch.autograd.grad(ll, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def reference_fisher(model, seqs, batch_size=1) -> dict[str, torch.Tensor]:
    """(1/N) sum_B (sum_{i in B} g_i)^2: the squared gradient of each batch's summed log-likelihood
    (per-example for batch_size 1)."""
    model64 = copy.deepcopy(model).double()
    seqs = [s for s in seqs if len(s) >= 2]  # no next-token position: not an example
    total: dict[str, torch.Tensor] = {}
    for i in range(0, len(seqs), batch_size):
        grads = [example_gradients(model64, s) for s in seqs[i:i + batch_size]]
        for name in grads[0]:
            total[name] = total.get(name, 0) + sum(g[name] for g in grads) ** 2
    return {name: f / len(seqs) for name, f in total.items()}


def assert_matches_reference(result, reference):
    """fp32 model vs fp64 reference: gradients carry ~1e-6 relative rounding, squares ~2e-6; the
    tolerance (1e-4 relative, plus 1e-5 of the tensor's largest entry for values near zero) leaves margin
    for the accumulation over examples and positions."""
    assert list(result.fisher) == list(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(result.fisher[name].double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()),
                                   msg=lambda m: f"{name}: {m}")


# ---- data ----

def test_read_texts_plain_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\n  \nsecond line\r\nthird\n")
    assert read_texts(str(txt)) == ["first line", "second line", "third"]
    assert read_texts(str(txt), max_examples=2) == ["first line", "second line"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    assert read_texts(str(jsonl)) == ["one", "two"]


@pytest.mark.parametrize("name", ["a.JSONL", "a.json"])
def test_json_lines_under_other_suffixes_are_read_as_json_lines(tmp_path, name):
    """Datasets' to_json writes JSON Lines to .json: read as plain text, each example would be its JSON source."""
    path = tmp_path / name
    path.write_text('{"text": "one", "id": 1}\n{"text": "two"}\n')
    assert read_texts(str(path)) == ["one", "two"]
    path.write_text('[{"text": "one"}]\n')
    with pytest.raises(DataError, match=f'{path}:1: expected a JSON object with a string "text" field'):
        read_texts(str(path))


@pytest.mark.parametrize("content, needle", [
    ('{"text": "ok"}\n{"text": oops}\n', ":2: not a JSON object"),
    ('{"text": "ok"}\n{"body": "x"}\n', ':2: expected a JSON object with a string "text" field'),
    ('["text"]\n', ':1: expected a JSON object'),
    ('{"text": "one", "text": "two"}\n', ":1: the key 'text' appears twice"),
    ("[" * 100_000 + "]" * 100_000 + "\n", ":1: not a JSON object (RecursionError"),
    ('{"text": "a \\ud800 b"}\n', ':1: "text" is not text: it holds a lone surrogate escape'),
    ("\n  \n", "no examples"),
])
def test_read_texts_errors_name_file_and_line(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=f"{path}.*") as e:
        read_texts(str(path))
    assert needle in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        read_texts(str(tmp_path / "missing.txt"))


def test_load_data_tokenizes_truncates_and_pads(text_file):
    data = load_data(text_file, tiny_tokenizer(), max_length=4, max_examples=4)
    assert len(data) == 4 and data.pad_id == 0
    assert [len(s) for s in data.sequences] == [4, 4, 4, 1]
    batch = data.batches(3)[1]
    assert batch["input_ids"].tolist() == [data.sequences[3]]
    first = data.batches(8)[0]
    assert first["attention_mask"].tolist()[3] == [1, 0, 0, 0] and first["input_ids"][3, 1:].eq(0).all()
    no_pad = load_data(text_file, tiny_tokenizer(pad=False), max_length=4)
    assert no_pad.pad_id == tiny_tokenizer().eos_token_id


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("specials", [False, True])
def test_long_examples_are_tokenized_only_at_the_end_truncation_keeps_with_the_same_tokens(specials, side):
    """A line of megabytes is not tokenized whole to keep max_length tokens (that took ~140 bytes per character);
    the tokens kept are the whole line's truncation, special tokens (BOS, EOS) included."""
    from tokenizers import processors

    from merge_engine.stats.data import CHARS_PER_TOKEN, kept_tokens
    from tests.stats.tiny_text import WORDS
    tokenizer = tiny_tokenizer()
    tokenizer.truncation_side = side  # left (alignment-handbook models): the last tokens, from the text's end
    if specials:  # BOS and EOS around every text, as many tokenizers' post-processors add them
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<eos> $A <eos>", special_tokens=[("<eos>", tokenizer.eos_token_id)])
    text = " ".join(WORDS[i % len(WORDS)] for i in range(200_000))
    seen = []
    calls = tokenizer.__class__.__call__

    def recording(self, text, *args, **kwargs):
        seen.append(len(text))
        return calls(self, text, *args, **kwargs)
    for max_length in (3, 7, 300):  # (below the specials' count, transformers does not truncate at all)
        whole = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        tokenizer.__class__.__call__ = recording
        try:
            assert kept_tokens(tokenizer, text, max_length) == whole
        finally:
            tokenizer.__class__.__call__ = calls
        assert max(seen) <= (max_length + 8) * CHARS_PER_TOKEN < len(text)
    short = "the cat"
    assert kept_tokens(tokenizer, short, 50) == tokenizer(short, truncation=True, max_length=50)["input_ids"]


def test_data_that_is_not_utf8_is_named_by_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"the cat\n\nsat on the mat \xff\n")
    with pytest.raises(DataError) as e:
        read_texts(str(path))
    assert str(e.value) == f"{path}: not UTF-8 text (line 3, byte 24)"


@pytest.mark.parametrize("name, content", [("bom.txt", "the cat\nsat\n"), ("bom.jsonl", '{"text": "the cat"}\n{"text": "sat"}\n')])
def test_a_byte_order_mark_is_not_part_of_the_first_example(tmp_path, name, content):
    path = tmp_path / name
    path.write_text("\ufeff" + content, encoding="utf-8")
    assert read_texts(str(path)) == ["the cat", "sat"]


def test_unusable_examples_are_named_by_file_and_line(tmp_path):
    """Blank lines are skipped, so an example's number is not its line: errors name the line."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "the cat"}\n\n{"text": "  "}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: the example tokenizes to no tokens$"):
        load_data(str(path), tiny_tokenizer(), MAX_LENGTH)
    path.write_text('{"text": "the cat"}\n\n{"text": "quickly"}\n')
    quickly = tiny_tokenizer().convert_tokens_to_ids("quickly")
    with pytest.raises(DataError, match=rf"^{path}:3: the example holds token id {quickly}, beyond the model's"):
        load_data(str(path), tiny_tokenizer(), MAX_LENGTH, vocab_size=quickly)


def test_token_ids_beyond_the_models_vocabulary_are_refused(text_file):
    largest = max(max(s) for s in load_data(text_file, tiny_tokenizer(), MAX_LENGTH).sequences)
    with pytest.raises(DataError, match=rf"holds token id {largest}, beyond the model's vocabulary of {largest}"):
        load_data(text_file, tiny_tokenizer(), MAX_LENGTH, vocab_size=largest)
    load_data(text_file, tiny_tokenizer(), MAX_LENGTH, vocab_size=largest + 1)


def test_load_data_reads_the_model_folders_tokenizer(tiny_lm, text_file):
    assert load_data(text_file, tiny_lm("llama"), MAX_LENGTH).sequences == sequences(text_file)


# ---- the Fisher definitions ----

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_empirical_per_example_matches_fp64_reference(tiny_lm, text_file, arch):
    model, seqs = load_model(tiny_lm(arch)), sequences(text_file)
    result = fisher(model, seqs, batch_size=4, per_example=True)
    assert (result.examples, result.granularity) == (len(SENTENCES) - 1, "per_example")  # "dog": one token
    assert result.tokens == sum(len(s) - 1 for s in seqs)
    assert_matches_reference(result, reference_fisher(model, seqs))


def test_per_batch_of_one_equals_per_example(tiny_lm, text_file):
    model, seqs = load_model(tiny_lm("llama")), sequences(text_file)
    per_batch = fisher(model, seqs, batch_size=1)
    per_example = fisher(model, seqs, batch_size=3, per_example=True)
    for name, f in per_example.fisher.items():
        torch.testing.assert_close(per_batch.fisher[name], f, rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padded_per_batch_matches_batch_formula(tiny_lm, text_file, arch):
    """(|B| g_B)^2 on right-padded batches equals the formula from unpadded fp64 example gradients."""
    model, seqs = load_model(tiny_lm(arch)), sequences(text_file)
    result = fisher(model, seqs, batch_size=3)
    assert result.granularity == "per_batch" and result.examples == len(SENTENCES) - 1
    # the second batch is ("dog", ..., ...): its one-token example counts in neither |B| nor N
    kept = [s for s in seqs if len(s) >= 2]
    reference = reference_fisher(model, kept[:3], 3)
    second = reference_fisher(model, kept[3:], 2)
    reference = {n: (3 * f + 2 * second[n]) / 5 for n, f in reference.items()}
    assert_matches_reference(result, reference)


def test_per_batch_sampled_fisher_is_unbiased(tiny_lm, text_file):
    """The sampled Fisher per batch has the per-example one's expectation: the cross terms g_i g_j of a
    batch's squared summed gradient average out over draws. Compared on the total over every parameter,
    averaged over 8 seeds (one batch of all the examples, so each draw's cross terms are many): within
    25% (a Fisher divided by the batch size, as (1/N) sum_B |B| g_B^2 gives, would be ~1/8 of it)."""
    model, seqs = load_model(tiny_lm("llama")), sequences(text_file)

    def total(**kwargs):
        return sum(float(f.double().sum()) for seed in range(8)
                   for f in fisher(model, seqs, variant="sampled", seed=seed, **kwargs).fisher.values())
    per_batch, per_example = total(), total(per_example=True)
    assert 0.75 < per_batch / per_example < 1.25, per_batch / per_example


def test_padding_is_excluded(tiny_lm, text_file):
    model, seqs = load_model(tiny_lm("llama")), sequences(text_file)
    batch = make_batch(seqs, pad_id=5)
    extra = {k: torch.nn.functional.pad(v, (0, 7), value=0 if k == "attention_mask" else 9) for k, v in batch.items()}
    one_by_one = compute_fisher(model, [make_batch([s], 0) for s in seqs], per_example=True, progress=False)
    for per_example in (True, False):
        padded = compute_fisher(model, [batch], per_example=per_example, progress=False)
        more_padded = compute_fisher(model, [extra], per_example=per_example, progress=False)
        for name, f in padded.fisher.items():
            torch.testing.assert_close(more_padded.fisher[name], f, rtol=1e-4, atol=1e-6 * float(f.abs().max()))
            if per_example:
                torch.testing.assert_close(one_by_one.fisher[name], f, rtol=1e-5, atol=0)


def test_sampled_labels_are_seeded_draws(tiny_lm, text_file):
    model, seqs = load_model(tiny_lm("llama")), sequences(text_file)
    batch = make_batch(seqs, 0)
    logits = model(**batch).logits
    observed_ll, _ = sequence_log_likelihoods(logits, batch["input_ids"], batch["attention_mask"])
    draws = [sequence_log_likelihoods(logits, batch["input_ids"], batch["attention_mask"],
                                      torch.Generator().manual_seed(s))[0] for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert not torch.allclose(draws[0], observed_ll)

    runs = [fisher(model, seqs, batch_size=2, variant="sampled", seed=s) for s in (3, 3, 4)]
    empirical = fisher(model, seqs, batch_size=2)
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(runs[0].fisher[n], runs[1].fisher[n]) for n in runs[0].fisher)
    assert not torch.equal(runs[0].fisher[name], runs[2].fisher[name])
    assert not torch.allclose(runs[0].fisher[name], empirical.fisher[name], rtol=0.05)
    assert runs[0].variant == "sampled" and runs[0].seed == 3


def test_gradients_freed_and_bfloat16_storage(tiny_lm, text_file):
    model, seqs = load_model(tiny_lm("llama")), sequences(text_file)
    fp32 = fisher(model, seqs, batch_size=2)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    bf16 = fisher(model, seqs, batch_size=2, fisher_dtype=torch.bfloat16)
    for name, f in fp32.fisher.items():
        assert bf16.fisher[name].dtype == torch.bfloat16
        # 3 accumulation steps, each rounded to 8 significant bits (~0.4%), plus the final division
        torch.testing.assert_close(bf16.fisher[name].float(), f, rtol=2e-2, atol=1e-3 * float(f.abs().max()))


def test_long_bfloat16_runs_warn(caplog):
    warn_if_swamped(100, torch.bfloat16)
    warn_if_swamped(10_000, torch.float32)
    assert not caplog.records
    warn_if_swamped(200, torch.bfloat16)
    assert "200 accumulation steps into bfloat16" in caplog.text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_recomputes_and_matches(tiny_lm, text_file, arch):
    model, seqs = load_model(tiny_lm(arch)), sequences(text_file)
    plain = fisher(model, seqs, batch_size=3)
    mlp = model.model.layers[0].mlp if arch == "llama" else model.transformer.h[0].mlp
    calls = []
    # a pre-hook: the recompute stops early, once the last saved tensor (inside the MLP) is rebuilt
    handle = mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    checkpointed = fisher(model, seqs, batch_size=3, gradient_checkpointing=True)
    handle.remove()
    assert len(calls) == 4  # 2 batches, each forward run again in the backward pass
    assert not any(m.training for m in model.modules())
    for name, f in plain.fisher.items():  # dropout stays off (GPT-2 has dropout 0.1 in training mode)
        torch.testing.assert_close(checkpointed.fisher[name], f, rtol=1e-5, atol=1e-7 * float(f.abs().max()))


def test_non_finite_fisher_names_the_parameter(tiny_lm, text_file):
    model = load_model(tiny_lm("llama"))
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("inf")
    with pytest.raises(MergeEngineError, match="the Fisher of '.*' has non-finite values"):
        fisher(model, sequences(text_file))


def test_tied_weights_appear_once(tiny_lm, text_file):
    result = fisher(load_model(tiny_lm("gpt2")), sequences(text_file))
    assert "transformer.wte.weight" in result.fisher and "lm_head.weight" not in result.fisher


def test_fisher_tensors_are_named_as_the_checkpoint_names_them(gpt2_without_prefix, text_file, tmp_path):
    """A merge looks a weight's Fisher up by the checkpoint's tensor name, which may lack the model's prefix."""
    options = FisherOptions(batch_size=2, max_length=MAX_LENGTH, quiet=True, device="cpu", tokenizer=tiny_tokenizer())
    manifest = collect_fisher(gpt2_without_prefix, text_file, str(tmp_path / "fisher"), options)
    names = set(Checkpoint(str(tmp_path / "fisher")).tensors)
    assert len(names) == manifest["tensors"] and names <= set(Checkpoint(gpt2_without_prefix).tensors)
    assert "wte.weight" in names



@pytest.mark.parametrize("model_type", ["gpt_neox", "mixtral"])
def test_fisher_tensors_are_named_as_a_merge_reads_the_checkpoint(renamed_on_load, model_type, text_file, tmp_path):
    """transformers 5 renames these checkpoints' tensors as it loads them: GPT-NeoX's embed_out is lm_head (a merge
    reads embed_out), Mixtral's experts are fused into mlp.experts (as a merge reads them, io/experts.py)."""
    path = renamed_on_load(model_type)
    options = FisherOptions(batch_size=2, max_length=MAX_LENGTH, quiet=True, device="cpu", tokenizer=tiny_tokenizer())
    collect_fisher(path, text_file, str(tmp_path / "fisher"), options)
    assert set(Checkpoint(str(tmp_path / "fisher")).tensors) == set(with_expert_layout(Checkpoint(path), "fused").tensors)


# ---- the saved folder ----

def test_saved_folder_and_manifest(tiny_lm, text_file, tmp_path):
    path = tiny_lm("qwen2")
    model = load_model(path)
    result = fisher(model, sequences(text_file), batch_size=2, variant="sampled", seed=5)
    out = tmp_path / "fisher"
    manifest = save_fisher(result, str(out), path, MAX_LENGTH, shard_size=100_000)
    on_disk = json.loads((out / "fisher.json").read_text())
    assert manifest == on_disk == load_fisher_manifest(str(out))
    expected_sum = sum(float(f.double().square().sum()) for f in result.fisher.values())
    assert on_disk == {"format": "merge_engine.fisher", "version": 1, "model": path, "variant": "sampled",
                       "granularity": "per_batch", "examples": 5, "tokens": result.tokens, "dtype": "float32",
                       "seed": 5, "max_length": MAX_LENGTH, "sum_squares": pytest.approx(expected_sum, rel=1e-12),
                       "tensors": len(result.fisher)}
    ckpt = Checkpoint(str(out))
    params = dict(model.named_parameters())
    assert len(os.listdir(out)) > 2  # sharded, with an index
    assert {n: info.shape for n, info in ckpt.tensors.items()} == {n: tuple(p.shape) for n, p in params.items()}
    for name, f in result.fisher.items():
        assert torch.equal(ckpt.read(name), f)
    ckpt.close()
    with pytest.raises(Exception, match="--overwrite"):
        save_fisher(result, str(out), path, MAX_LENGTH)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(format="other"), "not a Fisher manifest"),
    (lambda m: m.update(version=2), "unsupported version 2"),
    (lambda m: m.pop("sum_squares"), '"sum_squares" is missing'),
    (lambda m: m.update(examples="5"), '"examples" has the wrong type'),
    (lambda m: m.update(variant="true"), '"variant" is \'true\''),
    (lambda m: m.update(tensors=3), "lists 3 tensors but the folder holds"),
])
def test_load_fisher_manifest_errors(tiny_lm, text_file, tmp_path, edit, needle):
    path = tiny_lm("llama")
    out = tmp_path / "fisher"
    save_fisher(fisher(load_model(path), sequences(text_file)[:2]), str(out), path, MAX_LENGTH)
    manifest_path = out / "fisher.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="fisher.json") as e:
        load_fisher_manifest(str(out))
    assert needle in str(e.value)
    manifest_path.unlink()
    with pytest.raises(Exception, match="fisher.json is missing"):
        load_fisher_manifest(str(out))


# ---- the command line ----

def test_cli_fisher_text_and_jsonl(tiny_lm, text_file, tmp_path, capsys):
    path = tiny_lm("llama")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    outs = [tmp_path / "from_txt", tmp_path / "from_jsonl"]
    assert main(["fisher", path, text_file, str(outs[0]), "--batch-size", "2", "--max-length", str(MAX_LENGTH),
                 "--device", "cpu"]) == 0
    assert "over 5 examples" in capsys.readouterr().out
    assert main(["fisher", path, str(jsonl), str(outs[1]), "--batch-size", "2", "--max-length", str(MAX_LENGTH),
                 "-q"]) == 0
    assert capsys.readouterr().out == ""
    from_txt, from_jsonl = (Checkpoint(str(o)) for o in outs)
    for name in from_txt.tensors:
        assert torch.equal(from_txt.read(name), from_jsonl.read(name))
    expected = fisher(load_model(path), sequences(text_file), batch_size=2)
    torch.testing.assert_close(from_txt.read("lm_head.weight"), expected.fisher["lm_head.weight"])


def test_cli_fisher_options(tiny_lm, text_file, tmp_path):
    path = tiny_lm("gpt2")
    out = tmp_path / "out"
    assert main(["fisher", path, text_file, str(out), "--variant", "sampled", "--per-example", "--seed", "2",
                 "--max-examples", "3", "--max-length", "5", "--fisher-dtype", "bfloat16", "--dtype", "float32",
                 "--gradient-checkpointing", "-q"]) == 0
    manifest = load_fisher_manifest(str(out))
    assert (manifest["variant"], manifest["granularity"], manifest["seed"]) == ("sampled", "per_example", 2)
    assert (manifest["examples"], manifest["tokens"], manifest["dtype"]) == (3, 12, "bfloat16")
    assert main(["fisher", path, text_file, str(out), "--max-examples", "1", "-q", "--overwrite"]) == 0
    assert load_fisher_manifest(str(out))["examples"] == 1


@pytest.mark.parametrize("case", ["missing_data", "blank_data", "one_token_examples", "bad_jsonl", "non_empty_out",
                                  "missing_model", "no_tokenizer"])
def test_cli_fisher_bad_input(tiny_lm, model_sets, text_file, tmp_path, capsys, case):
    model, data, out = tiny_lm("llama"), text_file, tmp_path / "out"
    if case == "missing_data":
        data = str(tmp_path / "nope.txt")
    elif case == "blank_data":
        data = str(tmp_path / "blank.txt")
        open(data, "w").write("\n \n")
    elif case == "one_token_examples":
        data = str(tmp_path / "words.txt")
        open(data, "w").write("cat\ndog\n")
    elif case == "bad_jsonl":
        data = str(tmp_path / "bad.jsonl")
        open(data, "w").write('{"text": "the cat"}\nnot json\n')
    elif case == "non_empty_out":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "missing_model":
        model = str(tmp_path / "no_model")
    elif case == "no_tokenizer":
        model = model_sets("llama")[0]
    capsys.readouterr()  # building the models prints progress bars
    code = main(["fisher", model, data, str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("merge-engine: error: ")
    culprit = {"non_empty_out": str(out), "missing_model": model, "no_tokenizer": model}.get(case, data)
    assert culprit in err, err
    if case == "bad_jsonl":
        assert f"{data}:2:" in err
    assert os.listdir(out) == ["mine.txt"] if case == "non_empty_out" else not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_cli_fisher_help_and_merge_dispatch(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fisher", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--variant", "--per-example", "--batch-size", "--max-length", "--max-examples", "--seed", "--device",
                 "--dtype", "--fisher-dtype", "--gradient-checkpointing", "--overwrite"):
        assert flag in help_text
    with pytest.raises(SystemExit):
        main(["fisher", "only_model"])
    assert "merge-engine fisher: error" in capsys.readouterr().err


def test_fisher_folders_feed_a_fisher_merge(tiny_lm, text_file, tmp_path, folder_tensors):
    """Folders written by `merge-engine fisher` are what the `fisher` merge method reads (a model merged
    with itself under two different Fishers is itself)."""
    from merge_engine import MergeOptions, merge, parse_config
    path = tiny_lm("llama")
    folders = [str(tmp_path / v) for v in ("empirical", "sampled")]
    for folder in folders:
        assert main(["fisher", path, text_file, folder, "--variant", os.path.basename(folder), "-q"]) == 0
    config = {"merge_method": "fisher", "parameters": {"normalize_fisher": True},
              "models": [{"model": path, "fisher": f, "parameters": {"weight": 1.0}} for f in folders]}
    merge(parse_config(config), str(tmp_path / "merged"), MergeOptions(quiet=True, copy_tokenizer=False))
    merged, original = folder_tensors(tmp_path / "merged"), folder_tensors(path)
    for name, t in original.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-6, atol=1e-7)


def test_a_file_of_long_examples_only(tmp_path):
    from merge_engine.stats.data import CHARS_PER_TOKEN
    from tests.stats.tiny_text import WORDS
    line = " ".join(WORDS[i % len(WORDS)] for i in range(20 * CHARS_PER_TOKEN))
    path = tmp_path / "long.txt"
    path.write_text(line + "\n" + line + "\n")
    tokenizer = tiny_tokenizer()
    assert load_data(str(path), tokenizer, 4).sequences == [tokenizer(line, truncation=True, max_length=4)["input_ids"]] * 2
