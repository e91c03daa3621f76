"""Gram collection (merge_engine/stats/gram.py): the saved Grams against a hand-computed fp64 Gram of
the captured linear inputs, sharing between modules that read one input, bounded-memory passes,
storage options, causal LMs (Llama, GPT-2's transposed Conv1D) and encoders, the manifest, and the
`merge-engine stats` command.

Tolerance against the fp64 Gram: the accumulation is fp32 over T <= 64 tokens per batch and a few
batches, so each entry is within (T + 1) u (|X|^T |X|) of the exact sum (ops/gram.py); 1e-5 relative to
|X|^T |X| covers T + 1 <= 160 (u = 6e-8), and a missed or padded token changes entries by O(1).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from merge_engine.cli import main
from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.grams import as_matrix, load_gram_folder
from merge_engine.stats.data import load_data
from merge_engine.stats.gram import (
    GramGroup,
    GramModule,
    GramOptions,
    collect_grams,
    linear_modules,
    split_into_passes,
)
from merge_engine.stats.models import load_model
from tests.stats.tiny_text import tiny_tokenizer

MAX_LENGTH = 16


def collect(path, text_file, out, **kw):
    options = GramOptions(batch_size=kw.pop("batch_size", 2), max_length=MAX_LENGTH, quiet=True, device="cpu",
                          tokenizer=tiny_tokenizer(), **kw)
    return collect_grams(path, text_file, str(out), options)


def captured_grams(path, text_file, auto_class="AutoModelForCausalLM", batch_size=2):
    """fp64 X^T X of every linear module's inputs at real tokens, captured with plain forward hooks."""
    model = load_model(path, None, torch.device("cpu"), auto_class).eval()
    data = load_data(text_file, tiny_tokenizer(), MAX_LENGTH)
    grams, state = {}, {}

    def hook(name):
        def capture(module, args):
            x = args[0].detach().double()
            x = x[state["mask"]] if x.dim() == 3 else x  # a pooler reads one row per example
            grams[name] = grams.get(name, 0) + x.T @ x
            abs_x = x.abs()
            state.setdefault("abs", {})[name] = state.get("abs", {}).get(name, 0) + abs_x.T @ abs_x
        return capture
    for m in linear_modules(model):
        m.module.register_forward_pre_hook(hook(m.name))
    with torch.no_grad():
        for batch in data.batches(batch_size):
            state["mask"] = batch["attention_mask"].bool()
            model(**batch)
    return grams, state["abs"], sum(len(s) for s in data.sequences)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_grams_equal_the_captured_inputs_gram(tiny_lm, text_file, tmp_path, arch):
    path = tiny_lm(arch)
    manifest = collect(path, text_file, tmp_path / "grams")
    expected, magnitude, tokens = captured_grams(path, text_file)
    assert manifest["tokens"] == tokens and manifest["examples"] == 6
    folder = load_gram_folder(str(tmp_path / "grams"))
    ckpt = Checkpoint(str(tmp_path / "grams"))
    assert set(manifest["modules"]) == set(expected)
    weights = Checkpoint(path).tensors
    for module, entry in manifest["modules"].items():
        gram = ckpt.read(entry["gram"]).double()
        assert torch.equal(gram, gram.T), module
        excess = (gram - expected[module]).abs() - 1e-5 * magnitude[module]
        assert float(excess.max()) <= 0, f"{module}: off by {float(excess.max())} beyond the bound"
        w = weights[f"{module}.weight"].shape
        assert entry["in_features"] == (w[0] if entry["transposed"] else w[1])
        assert entry["transposed"] == (arch == "gpt2")
        assert folder.module_of(f"{module}.weight") == entry
        assert f"{module}.weight" in weights  # named as the checkpoint's weights, so a merge finds it


def test_modules_reading_one_input_share_one_gram(tiny_lm, text_file, tmp_path):
    manifest = collect(tiny_lm("llama"), text_file, tmp_path / "grams")
    grams = {m: e["gram"] for m, e in manifest["modules"].items()}
    for layer in (0, 1):
        p = f"model.layers.{layer}."
        assert grams[p + "self_attn.q_proj"] == grams[p + "self_attn.k_proj"] == grams[p + "self_attn.v_proj"]
        assert grams[p + "mlp.gate_proj"] == grams[p + "mlp.up_proj"]
        distinct = {grams[p + s] for s in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
        assert len(distinct) == 4
    assert len(Checkpoint(str(tmp_path / "grams")).tensors) == len(set(grams.values()))


def test_memory_budget_splits_into_passes_with_identical_results(tiny_lm, text_file, tmp_path):
    path = tiny_lm("llama")
    collect(path, text_file, tmp_path / "one")
    collect(path, text_file, tmp_path / "many", max_gram_bytes=1)  # one Gram per pass
    one, many = Checkpoint(str(tmp_path / "one")), Checkpoint(str(tmp_path / "many"))
    assert set(one.tensors) == set(many.tensors)
    for name in one.tensors:
        assert torch.equal(one.read(name), many.read(name)), name


def test_the_docs_7b_example_of_passes():
    """docs/data-aware.md: a 7B Llama's Grams (q/k/v, o, gate/up at 4096 inputs, down at 11008, per layer, and
    the head) with the default budget. Pass k forwards the layers up to its last module, so the data's forwards
    add up the passes' depths."""
    groups = [GramGroup([GramModule(f"model.layers.{i}.{name}", None, d, False)]) for i in range(32)
              for name, d in (("self_attn.q_proj", 4096), ("self_attn.o_proj", 4096), ("mlp.gate_proj", 4096),
                              ("mlp.down_proj", 11008))] + [GramGroup([GramModule("lm_head", None, 4096, False)])]
    passes = split_into_passes(groups, GramOptions().max_gram_bytes)
    depth = [(groups.index(p[-1]) // 4 + 1) / 32 for p in passes]  # the head is in layer 31's forward
    gigabytes = sum(g.d * g.d * 4 for g in groups) / 1e9
    assert len(passes) == 3
    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "data-aware.md")).read()
    assert " ".join(docs.split()).count(f"A 7B Llama's Grams (about {gigabytes:.0f} GB in fp32) with the default "
                                        f"8 GB budget take three passes, about {sum(depth):.1f} forwards "
                                        "of the data in all") == 1


def test_packed_and_bfloat16_storage(tiny_lm, text_file, tmp_path):
    path = tiny_lm("llama")
    collect(path, text_file, tmp_path / "full")
    packed = collect(path, text_file, tmp_path / "packed", packed=True)
    collect(path, text_file, tmp_path / "bf16", gram_dtype="bfloat16")
    full, p, b = (Checkpoint(str(tmp_path / n)) for n in ("full", "packed", "bf16"))
    for module, entry in packed["modules"].items():
        d = entry["in_features"]
        reference = full.read(entry["gram"])
        stored = p.read(entry["gram"])
        assert stored.shape == (d * (d + 1) // 2,)
        assert torch.equal(as_matrix(stored, d), reference)
        assert torch.equal(b.read(entry["gram"]), reference.to(torch.bfloat16))
    assert load_gram_folder(str(tmp_path / "packed")).manifest["packed"] is True


def test_exclude_and_padding(tiny_lm, text_file, tmp_path):
    path = tiny_lm("llama")
    small = collect(path, text_file, tmp_path / "a", exclude="lm_head|mlp", batch_size=6)
    assert all("mlp" not in m and "lm_head" not in m for m in small["modules"])
    big = collect(path, text_file, tmp_path / "b", batch_size=1)  # no padding at all
    a, b = Checkpoint(str(tmp_path / "a")), Checkpoint(str(tmp_path / "b"))
    for entry in small["modules"].values():  # padding excluded: same Gram whatever the batching
        assert torch.allclose(a.read(entry["gram"]), b.read(entry["gram"]), rtol=1e-5, atol=1e-5)
    assert small["tokens"] == big["tokens"]


@pytest.mark.parametrize("architecture", ["BertModel", "BertForSequenceClassification"])
def test_encoder_model(tmp_path, text_file, architecture):
    """A bare encoder and one with a classification head: modules are named as the checkpoint's weights
    (bert.encoder... under the head class), the head's Gram is over examples."""
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    path = str(tmp_path / "bert")
    getattr(transformers, architecture)(config).save_pretrained(path)
    manifest = collect(path, text_file, tmp_path / "grams")
    expected, magnitude, _ = captured_grams(path, text_file, architecture)
    ckpt = Checkpoint(str(tmp_path / "grams"))
    modules = manifest["modules"]
    prefix = "bert." if architecture != "BertModel" else ""
    assert modules[prefix + "encoder.layer.0.attention.self.query"]["rows"] == manifest["tokens"]
    assert modules[prefix + "pooler.dense"]["rows"] == manifest["examples"]  # one [CLS] vector per example
    if prefix:
        assert modules["classifier"]["rows"] == manifest["examples"]
    weights = Checkpoint(path).tensors
    assert all(f"{m}.weight" in weights for m in modules)
    for module, entry in manifest["modules"].items():
        assert float(((ckpt.read(entry["gram"]).double() - expected[module]).abs() - 1e-5 * magnitude[module]).max()) <= 0


def test_manifest_problems_name_the_file(tiny_lm, text_file, tmp_path):
    out = tmp_path / "grams"
    collect(tiny_lm("llama"), text_file, out)
    manifest_file = out / "grams.json"
    manifest = json.loads(manifest_file.read_text())
    first = next(iter(manifest["modules"]))
    manifest["modules"][first]["in_features"] += 1
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"grams\.json.*expected"):
        load_gram_folder(str(out))
    manifest_file.unlink()
    with pytest.raises(CheckpointError, match="not a Grams folder"):
        load_gram_folder(str(out))


def test_cli_stats(tiny_lm, text_file, tmp_path, capsys):
    path = tiny_lm("llama")
    out = tmp_path / "grams"
    assert main(["stats", path, text_file, str(out), "--batch-size", "3", "--max-length", str(MAX_LENGTH),
                 "--packed", "--gram-dtype", "bfloat16", "--max-gram-memory", "20K", "--device", "cpu"]) == 0
    assert "Grams for 15 linear modules over 6 examples" in capsys.readouterr().out
    manifest = load_gram_folder(str(out)).manifest
    assert manifest["packed"] and manifest["dtype"] == "bfloat16"
    assert main(["stats", path, text_file, str(out), "-q"]) == 2  # refuses a non-empty folder
    assert "not empty" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "nowhere"), text_file, str(tmp_path / "x"), "-q"]) == 2
    assert not os.path.exists(tmp_path / "x")


def test_grams_are_named_as_the_checkpoint_names_its_weights(gpt2_without_prefix, tiny_lm, text_file, tmp_path):
    """A merge looks a weight's Gram up by the checkpoint's tensor name, which may lack the model's prefix."""
    manifest = collect(gpt2_without_prefix, text_file, tmp_path / "grams")
    stored = Checkpoint(gpt2_without_prefix).tensors
    assert manifest["modules"] and all(f"{module}.weight" in stored for module in manifest["modules"])
    prefixed = collect(tiny_lm("gpt2"), text_file, tmp_path / "prefixed")
    assert {f"transformer.{m}": e["in_features"] for m, e in manifest["modules"].items()} == \
        {m: e["in_features"] for m, e in prefixed["modules"].items()}


@pytest.mark.parametrize(("model_type", "renamed"), [("gpt_neox", "embed_out"),
                                                     ("qwen2_vl", "model.layers.0.self_attn.q_proj")])
def test_grams_are_named_as_the_checkpoint_names_the_weights_transformers_renames(renamed_on_load, model_type,
                                                                                 renamed, text_file, tmp_path):
    """transformers 5 renames these checkpoints' tensors as it loads them (GPT-NeoX's embed_out is lm_head,
    Qwen2-VL's model.layers are model.language_model.layers); a merge looks the Grams up by the stored names."""
    path = renamed_on_load(model_type)
    manifest = collect(path, text_file, tmp_path / "grams", exclude="visual")  # the vision tower reads no text
    stored = Checkpoint(path).tensors
    assert renamed in manifest["modules"] and all(f"{module}.weight" in stored for module in manifest["modules"])
