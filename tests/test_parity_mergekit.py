"""Parity with mergekit 0.1.5: the same config on the same inputs gives bit-identical tensors for
every deterministic method. Skipped, with the reason, when no mergekit install is found (see
conftest.find_mergekit; tools/test.sh installs one into .venv-mergekit when it can)."""
import json
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.dtypes import DTYPES
from tests.arch_models import ARCHITECTURES, make_architecture
from tests.conftest import pickled_copy

pytestmark = [pytest.mark.mergekit, pytest.mark.slow]


def models(base, experts, params, **top):
    return {"base_model": base, **top,
            "models": [{"model": e, "parameters": p} for e, p in zip(experts, params)]}


GRADIENT = [0.2, 0.9, 0.4]
FILTERED = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.6}]

# name -> (model set, config builder(base, experts))
CASES = {
    "linear": ("llama", lambda b, e: {"merge_method": "linear", "dtype": "float32",
                                      "models": [{"model": m, "parameters": {"weight": w}}
                                                 for m, w in zip([b, *e], (1.0, GRADIENT, 0.5, FILTERED))]}),
    "task_arithmetic": ("llama", lambda b, e: {"merge_method": "task_arithmetic", "dtype": "float32",
                                               "parameters": {"lambda": 0.8},
                                               **models(b, e, [{"weight": 0.5}, {"weight": GRADIENT},
                                                               {"weight": FILTERED}])}),
    "ties": ("llama", lambda b, e: {"merge_method": "ties", "dtype": "float32", "parameters": {"normalize": True},
                                    **models(b, e, [{"weight": 0.6, "density": 0.5},
                                                    {"weight": GRADIENT, "density": 0.3},
                                                    {"weight": 0.4, "density": FILTERED}])}),
    "ties_gqa_tied": ("qwen2", lambda b, e: {"merge_method": "ties", "dtype": "float32",
                                             **models(b, e, [{"weight": 1.0, "density": 0.7}] * 3)}),
    "ties_gpt2": ("gpt2", lambda b, e: {"merge_method": "ties", "dtype": "float32",
                                        "parameters": {"lambda": 1.2, "normalize": False},
                                        **models(b, e, [{"weight": 0.3, "density": 0.2}] * 3)}),
    # rescale on a cut-off mode: the L1 factor from torch's sums, as mergekit takes it
    "ties_rescale": ("llama", lambda b, e: {"merge_method": "ties", "dtype": "float32",
                                            "parameters": {"rescale": True, "normalize": False, "lambda": 0.9},
                                            **models(b, e, [{"weight": 0.6, "density": 0.4},
                                                            {"weight": GRADIENT, "density": 0.7},
                                                            {"weight": 0.3, "density": FILTERED}])}),
    "breadcrumbs_ties_rescale": ("llama", lambda b, e: {
        "merge_method": "breadcrumbs_ties", "dtype": "float32", "parameters": {"rescale": True},
        **models(b, e, [{"weight": 0.5, "density": 0.7, "gamma": 0.05}] * 2)}),
    "breadcrumbs": ("llama", lambda b, e: {"merge_method": "breadcrumbs", "dtype": "float32",
                                           **models(b, e, [{"weight": 0.5, "density": 0.8, "gamma": 0.02},
                                                           {"weight": 0.5, "density": 0.6, "gamma": 0.1}])}),
    "breadcrumbs_ties": ("llama", lambda b, e: {"merge_method": "breadcrumbs_ties", "dtype": "float32",
                                                **models(b, e, [{"weight": 0.7, "density": 0.9, "gamma": 0.05}] * 3)}),
    # densities and gammas outside [0, 1], which mergekit takes unchecked (merge_engine warns): a whole or a
    # dropped task vector; breadcrumbs' window as a Python slice (density < 0 and gamma > 1: its end counts back)
    "ties_density_outside": ("llama", lambda b, e: {"merge_method": "ties", "dtype": "float32",
                                                    **models(b, e, [{"weight": 0.5, "density": 1.5},
                                                                    {"weight": 0.3, "density": -0.2},
                                                                    {"weight": 0.2, "density": 0.4}])}),
    "breadcrumbs_outside": ("llama", lambda b, e: {"merge_method": "breadcrumbs", "dtype": "float32",
                                                   **models(b, e, [{"weight": 0.5, "density": -0.2, "gamma": 1.5},
                                                                   {"weight": 0.3, "density": 0.6, "gamma": -0.1},
                                                                   {"weight": 0.2, "density": 0.5, "gamma": 1.5}])}),
    # values as pydantic's lax validation takes them in mergekit: true is the number 1 (merge_engine warns),
    # numbers in strings, 1 and "yes" are true, a whole float is an int
    "lax_values": ("llama", lambda b, e: {"merge_method": "ties", "dtype": "float32",
                                          "parameters": {"normalize": "yes", "int8_mask": 1},
                                          **models(b, e, [{"weight": True, "density": "0.5"},
                                                          {"weight": [True, "0.2", 0.4], "density": 0.3},
                                                          {"weight": "1e-1", "density": True}])}),
    "lax_karcher": ("llama", lambda b, e: {"merge_method": "karcher", "dtype": "float32",
                                           "parameters": {"max_iter": 3.0, "tol": "1e-7"},
                                           **models(b, e, [{}] * 3)}),
    "slerp_slices": ("llama", lambda b, e: {"merge_method": "slerp", "base_model": b, "dtype": "float32",
                                            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                                                 {"value": 0.5}]},
                                            "slices": [{"sources": [{"model": b, "layer_range": [0, 4]},
                                                                    {"model": e[0], "layer_range": [0, 4]}]}]}),
    # the sources of one slice from different layers of their models: a filter matches each input's own tensor names
    # (layers.1. of that source), a per-model filter without a fallback falls through to the global weight, and a
    # boolean gradient picks by layer position (from a differential fuzz against mergekit)
    "ties_sources_from_other_layers": ("llama", lambda b, e: {
        "merge_method": "ties", "base_model": b, "dtype": "float32",
        "parameters": {"weight": 0.4, "normalize": [True, False, True],
                       "density": [{"filter": "layers.1.", "value": 0.3}, {"value": [0.5, 0.9]}]},
        "slices": [{"sources": [{"model": b, "layer_range": [0, 2]},
                                {"model": e[0], "layer_range": [2, 4],
                                 "parameters": {"weight": [{"filter": "mlp", "value": 0.8}]}},
                                {"model": e[1], "layer_range": [1, 3]}]},
                   {"sources": [{"model": b, "layer_range": [3, 4]}, {"model": e[0], "layer_range": [0, 1]},
                                {"model": e[1], "layer_range": [3, 4]}], "parameters": {"lambda": 1.3}}]}),
    "nuslerp": ("llama", lambda b, e: {"merge_method": "nuslerp", "dtype": "float32",
                                       "parameters": {"nuslerp_row_wise": True, "nuslerp_flatten": False},
                                       **models(b, e[:2], [{"weight": 0.3}, {"weight": 0.7}])}),
    "model_stock": ("llama", lambda b, e: {"merge_method": "model_stock", "dtype": "float32",
                                           **models(b, e, [{}] * 3)}),
    "passthrough_frankenmerge": ("llama", lambda b, e: {
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [{"sources": [{"model": b, "layer_range": [0, 3]}]},
                   {"sources": [{"model": e[1], "layer_range": [1, 4]}]}]}),
    # keys of a filter entry other than filter and value are dropped by mergekit's schema: a misspelt filter
    # matches every tensor (a warning)
    "linear_misspelt_filter": ("llama", lambda b, e: {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": b, "parameters": {"weight": [{"fitler": "mlp", "value": 0.2}, {"value": 0.7}]}},
                   {"model": e[0], "parameters": {"weight": [{"filter": "self_attn", "value": 0.4, "note": "x"},
                                                                {"value": 0.6}]}},
                   {"model": e[1], "parameters": {"weight": 0.5}}]}),
    # an empty dtype is no dtype to mergekit (its dtype_from_name returns None for any false name)
    "linear_empty_dtypes": ("llama_bf16_sharded", lambda b, e: {
        "merge_method": "linear", "dtype": "", "out_dtype": "",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(e, (0.2, 0.3, 0.5))]}),
    # layer numbers as mergekit's schema takes them (whole floats, integer strings)
    "passthrough_lax_layer_range": ("llama", lambda b, e: {
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [{"sources": [{"model": b, "layer_range": [0.0, "2"]}]},
                   {"sources": [{"model": e[0], "layer_range": ["1", 4.0]}]}]}),
    "linear_bf16_sharded": ("llama_bf16_sharded", lambda b, e: {
        "merge_method": "linear", "dtype": "bfloat16",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(e, (0.2, 0.3, 0.5))]}),
    "task_arithmetic_bf16_to_fp32": ("llama_bf16_sharded", lambda b, e: {
        "merge_method": "task_arithmetic", "out_dtype": "float32",
        **models(b, e, [{"weight": 0.3}, {"weight": 0.3}, {"weight": GRADIENT}])}),
    "slerp_bf16": ("llama_bf16_sharded", lambda b, e: {
        "merge_method": "slerp", "base_model": b, "dtype": "bfloat16", "parameters": {"t": GRADIENT},
        "models": [{"model": b}, {"model": e[2]}]}),
    "multislerp": ("llama", lambda b, e: {"merge_method": "multislerp", "dtype": "float32",
                                          "parameters": {"eps": 1e-6},
                                          **models(b, e, [{"weight": 0.5}, {"weight": GRADIENT},
                                                          {"weight": FILTERED}])}),
    "multislerp_no_base_bf16": ("llama_bf16_sharded", lambda b, e: {
        "merge_method": "multislerp", "dtype": "bfloat16", "parameters": {"normalize_weights": False},
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(e, (0.2, 0.3, 0.6))]}),
    # the base is one more input with weight 1/N, and the per-model weights are ignored (a warning)
    "karcher": ("llama", lambda b, e: {"merge_method": "karcher", "dtype": "float32",
                                       "parameters": {"max_iter": 20, "tol": 1e-7},
                                       **models(b, e, [{"weight": 0.9}, {"weight": 0.1}, {}])}),
    "nearswap": ("llama", lambda b, e: {"merge_method": "nearswap", "dtype": "float32",
                                        "parameters": {"t": [0.005, 0.03]}, **models(b, e[:1], [{}])}),
    # per-model weights are ignored by sce (a warning)
    "sce": ("llama", lambda b, e: {"merge_method": "sce", "dtype": "float32",
                                   "parameters": {"select_topk": 0.4, "int8_mask": True},
                                   **models(b, e, [{"weight": 0.2}, {}, {"weight": 3.0}])}),
    "ram": ("llama", lambda b, e: {"merge_method": "ram", "dtype": "float32", "parameters": {"epsilon": 0.02},
                                   **models(b, e, [{}] * 3)}),
    "ramplus_tl": ("llama", lambda b, e: {"merge_method": "ramplus_tl", "dtype": "float32",
                                          "parameters": {"r": 0.4, "alpha": 0.5, "epsilon": 0.015},
                                          **models(b, e, [{}] * 3)}),
    "ramplus_tl_bf16_gives_fp32": ("llama_bf16_sharded", lambda b, e: {
        "merge_method": "ramplus_tl", "dtype": "bfloat16", "parameters": {"epsilon": 0.02},
        **models(b, e, [{}] * 3)}),
    "arcee_fusion": ("llama", lambda b, e: {"merge_method": "arcee_fusion", "dtype": "float32",
                                            **models(b, e[1:2], [{}])}),
    "arcee_fusion_bf16_gives_fp32": ("llama_bf16_sharded", lambda b, e: {
        "merge_method": "arcee_fusion", "dtype": "bfloat16", **models(b, e[:1], [{}])}),
}


def run_mergekit(mergekit, config_path, out, *args):
    mergekit(config_path, out, "--no-copy-tokenizer", *args)


@pytest.mark.parametrize("case", sorted(CASES))
def test_identical_to_mergekit(case, model_sets, mergekit, write_yaml, folder_tensors, tmp_path):
    key, build = CASES[case]
    base, *experts = model_sets(key)
    config = build(base, experts)
    path = write_yaml(config)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    merge(parse_config(config), str(ours), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, path, str(theirs))
    a, b = folder_tensors(ours), folder_tensors(theirs)
    assert set(a) == set(b)
    different = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}: max abs diff " \
        f"{max(float((a[n].double() - b[n].double()).abs().max()) for n in different[:3])}"


def test_fp16_normalized_weights_summing_to_zero_as_mergekit(model_sets, mergekit, write_yaml, folder_tensors,
                                                           tmp_path):
    # mergekit compares the fp16 sum of the weights with 1e-8 in fp16, where 1e-8 is 0: a zero sum is kept and
    # divided by (Inf where the deltas differ, NaN where they cancel); the compiled kernels do the same
    base, *experts = model_sets("llama")
    config = {"merge_method": "task_arithmetic", "dtype": "float16", "base_model": base,
              "parameters": {"normalize": True}, **models(base, experts[:2], [{"weight": 0.5}, {"weight": -0.5}])}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    merge(parse_config(config), str(ours), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(theirs))
    a, b = folder_tensors(ours), folder_tensors(theirs)
    assert set(a) == set(b) and any(not torch.isfinite(t).all() for t in b.values())
    nan = {n: b[n].isnan() for n in b}
    different = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n].isnan(), nan[n])
                 or not torch.equal(a[n][~nan[n]], b[n][~nan[n]])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_bf16_ties_identical_except_at_magnitude_ties(model_sets, mergekit, write_yaml, folder_tensors,
                                                     tmp_path):
    # In bf16 many deltas share a magnitude; where the k-th largest is tied, mergekit's unstable argsort
    # picks an arbitrary member and we pick the lowest index (documented). Everything else is identical:
    # each differing element must sit in a tensor whose trim cut-off is tied.
    base, *experts = model_sets("llama_bf16_sharded")
    config = {"merge_method": "ties", "dtype": "bfloat16",
              **models(base, experts, [{"weight": 0.5, "density": 0.4}] * 3)}
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(tmp_path / "theirs"))
    a, b = folder_tensors(tmp_path / "ours"), folder_tensors(tmp_path / "theirs")
    base_t = folder_tensors(base)
    expert_t = [folder_tensors(e) for e in experts]
    for name in a:
        if torch.equal(a[name], b[name]):
            continue
        tied = False
        for e in expert_t:
            mags = (e[name] - base_t[name]).abs().flatten()
            k = max(1, int(0.4 * mags.numel()))
            kth = mags.sort(descending=True).values[k - 1]
            tied |= bool((mags == kth).sum() > 1)
        assert tied, f"{name} differs from mergekit without a tie at the trim cut-off"


# Vocabulary alignment (tests/vocab_models.py). mergekit numbers a union's new tokens in an order that
# changes from run to run (hash order), so rows are compared token by token.
VOCAB_CASES = {
    "union_linear": lambda m: {"merge_method": "linear", "tokenizer_source": "union", "models": [
        {"model": m[k], "parameters": {"weight": w}} for k, w in (("base", 1.0), ("extra", 0.5), ("other", 0.3),
                                                                   ("padded", 0.7))]},
    "base_ties": lambda m: {"merge_method": "ties", "base_model": m["base"], "tokenizer_source": "base", "models": [
        {"model": m[k], "parameters": {"weight": 0.5, "density": 0.6}} for k in ("extra", "other", "padded")]},
    "model_source_task_arithmetic": lambda m: {
        "merge_method": "task_arithmetic", "base_model": m["base"], "tokenizer_source": m["other"],
        "models": [{"model": m[k], "parameters": {"weight": 0.4}} for k in ("extra", "other")]},
    "tokens_padded_bf16": lambda m: {
        "merge_method": "task_arithmetic", "base_model": m["base"], "dtype": "bfloat16",
        "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
            "<|im_start|>": {"source": {"kind": "model_token", "model": m["base"], "token": "<eos>"}},
            "w0": {"source": m["extra"], "force": True},
            "w9": {"source": {"kind": "zero"}, "force": True},
            "brand_new": {"source": {"kind": "model_token", "model": m["other"], "token_id": 3}}}},
        "models": [{"model": m[k], "parameters": {"weight": 0.5}} for k in ("extra", "other")]},
    # numbers and booleans as mergekit's schema takes them ("16", "yes", 3.0), unknown keys ignored
    "tokens_lax_values": lambda m: {
        "merge_method": "task_arithmetic", "base_model": m["base"], "dtype": "float32",
        "tokenizer": {"source": "union", "pad_to_multiple_of": "16", "tokens": {
            "w0": {"source": m["extra"], "force": "yes"},
            "brand_new": {"source": {"kind": "model_token", "model": m["other"], "token_id": 3.0}, "force": 1},
            "w9": {"source": {"kind": "zero", "note": "unknown keys are ignored"}, "forced": True}}, "note": 1},
        "models": [{"model": m[k], "parameters": {"weight": 0.5}} for k in ("extra", "other")]},
    # references in mergekit's mapping form: a token's source, the tokenizer's
    "tokens_mapping_form_sources": lambda m: {
        "merge_method": "task_arithmetic", "base_model": {"model": m["base"]}, "dtype": "float32",
        "tokenizer": {"source": {"model": {"path": m["other"]}}, "tokens": {
            "w9": {"source": {"model": m["extra"]}, "force": True},
            "w10": {"source": {"kind": "model_token", "model": {"model": m["base"]}, "token": "w11"}, "force": True}}},
        "models": [{"model": m[k], "parameters": {"weight": 0.5}} for k in ("extra", "other")]},
    # byte-level BPE tokenizers learnt from different text; the base's 2 tokens past its rows are trimmed
    "bpe_union_trimmed_base": lambda m: {"merge_method": "linear", "base_model": m["bpe_base"],
                                         "tokenizer_source": "union", "models": [
        {"model": m[k], "parameters": {"weight": w}} for k, w in (("bpe_base", 0.4), ("bpe_other", 0.6))]},
    "bpe_base_ties": lambda m: {"merge_method": "ties", "base_model": m["bpe_base"], "tokenizer_source": "base",
                                "models": [{"model": m["bpe_other"], "parameters": {"weight": 1.0, "density": 0.5}}]},
}


@pytest.mark.parametrize("case", sorted(VOCAB_CASES))
def test_vocabulary_alignment_identical_to_mergekit(case, vocab_models, bpe_models, mergekit, write_yaml,
                                                    folder_tensors, tmp_path):
    config = VOCAB_CASES[case]({**vocab_models, **bpe_models})
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    merge(parse_config(config), str(ours), MergeOptions(quiet=True))
    run_mergekit(mergekit, write_yaml(config), str(theirs))
    a, b = folder_tensors(ours), folder_tensors(theirs)
    va, vb = (transformers.AutoTokenizer.from_pretrained(p).get_vocab() for p in (ours, theirs))
    assert set(va) == set(vb) and set(a) == set(b)
    tokens = list(va)
    rows_a, rows_b = torch.tensor([va[t] for t in tokens]), torch.tensor([vb[t] for t in tokens])
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(a[name][rows_a], b[name][rows_b]), name
            # padding rows: the mean token row, summed (in fp32) in each tool's token order; at most one
            # bf16 rounding apart, and bit-identical where the orders agree
            pads = a[name][len(tokens):], b[name][len(tokens):]
            if va == vb:
                assert torch.equal(*pads), name
            else:
                torch.testing.assert_close(*pads, rtol=2**-7, atol=1e-6)
        else:
            assert torch.equal(a[name], b[name]), name
    assert (json.loads((ours / "config.json").read_text())["vocab_size"]
            == json.loads((theirs / "config.json").read_text())["vocab_size"])


# --unsafe-truncate-embeddings: without a tokenizer setting, vocabulary tensors of different vocab_size keep the
# rows every input has (tests/vocab_models.py: extra has 258 rows, padded 264, base 256)
TRUNCATION_CASES = {
    "linear": lambda m: {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": m[k], "parameters": {"weight": w}} for k, w in (("extra", 0.3), ("base", 0.5), ("padded", 0.4))]},
    "ties_largest_base": lambda m: {"merge_method": "ties", "dtype": "float32", "base_model": m["padded"], "models": [
        {"model": m[k], "parameters": {"weight": 0.5, "density": 0.6}} for k in ("extra", "base")]},
}


@pytest.mark.parametrize("case", sorted(TRUNCATION_CASES))
def test_unsafe_embedding_truncation_identical_to_mergekit(case, vocab_models, mergekit, write_yaml, folder_tensors,
                                                           tmp_path):
    config = TRUNCATION_CASES[case](vocab_models)
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True, unsafe_truncate_embeddings=True))
    run_mergekit(mergekit, write_yaml(config), str(tmp_path / "theirs"), "--unsafe-truncate-embeddings")
    a, b = folder_tensors(tmp_path / "ours"), folder_tensors(tmp_path / "theirs")
    assert a.keys() == b.keys() and a["model.embed_tokens.weight"].shape[0] == 256
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, different
    # config.json says the rows written (mergekit leaves the donor's vocab_size, 264 for padded)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 256
    donors = [config["base_model"]] if "base_model" in config else [m["model"] for m in config["models"]]  # (a set's)
    assert json.loads((tmp_path / "theirs" / "config.json").read_text())["vocab_size"] in \
        [json.loads(open(os.path.join(d, "config.json")).read())["vocab_size"] for d in donors]


# LoRA references (BASE+ADAPTER): mergekit merges each adapter with peft into a cached copy of its base;
# merge_engine applies it while reading. Adapters from tests/lora_adapters.py, in peft's format. With
# --lora-merge-dtype mergekit loads each adapted base in that dtype first (every tensor of the model).
LORA_CASES = {  # name -> (model set, adapter options, adapter dtype, --lora-merge-dtype)
    "lora_llama": ("llama", dict(embedding="model.embed_tokens", modules_to_save=("lm_head",), r=4, alpha=16,
                                 use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}),
                   torch.float32, None),
    "lora_llama_bf16": ("llama_bf16_sharded", dict(embedding="model.embed_tokens", targets=("q_proj", "up_proj")),
                        torch.bfloat16, None),
    "lora_gpt2_conv1d": ("gpt2", dict(targets=("c_attn", "c_fc"), fan_in_fan_out=True), torch.float32, None),
    "lora_merge_dtype_bf16_in_float32": ("llama_bf16_sharded", dict(embedding="model.embed_tokens",
                                                                    modules_to_save=("lm_head",)),
                                         torch.bfloat16, "float32"),
    "lora_merge_dtype_fp32_in_bfloat16": ("llama", dict(embedding="model.embed_tokens", modules_to_save=("lm_head",)),
                                          torch.float32, "bfloat16"),
    "lora_merge_dtype_bf16_in_float16": ("gpt2", dict(targets=("c_attn", "c_fc"), fan_in_fan_out=True),
                                         torch.bfloat16, "torch.float16"),
    # adapter tensors for modules the config does not target (peft loads none of them)
    "lora_untargeted_tensors": ("llama", dict(target_modules=["q_proj", "down_proj"], exclude_modules=["layers.1.mlp.down_proj"],
                                              layers_to_transform=[0, 1], layers_pattern="layers", modules_to_save=["lm_head"]),
                                torch.float32, None),
    "lora_untargeted_tensors_regex": ("gpt2", dict(targets=("c_attn", "c_fc"), fan_in_fan_out=True,
                                                   target_modules=r".*\.h\.0\..*c_attn"), torch.float32, None),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_references_identical_to_mergekit(case, model_sets, mergekit, write_yaml, folder_tensors,
                                               tmp_path):
    from tests.lora_adapters import write_adapter
    key, options, dtype, merge_dtype = LORA_CASES[case]
    base, e1, e2, _ = model_sets(key)
    write_adapter(str(tmp_path / "a1"), e1, seed=1, dtype=dtype, **options)
    write_adapter(str(tmp_path / "a2"), base, seed=2, dtype=dtype, **options)
    config = {"merge_method": "task_arithmetic", "base_model": base, "models": [
        {"model": f"{e1}+{tmp_path / 'a1'}", "parameters": {"weight": 0.6}},
        {"model": f"{base}+{tmp_path / 'a2'}", "parameters": {"weight": 0.3}},
        {"model": e2, "parameters": {"weight": 0.2}}]}
    flags = ["--lora-merge-dtype", merge_dtype] if merge_dtype else []
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(
        quiet=True, copy_tokenizer=False, lora_merge_dtype=merge_dtype and DTYPES[merge_dtype.removeprefix("torch.")]))
    run_mergekit(mergekit, write_yaml(config), str(tmp_path / "theirs"), "--lora-merge-cache",
                 str(tmp_path / "cache"), *flags)
    a, b = folder_tensors(tmp_path / "ours"), folder_tensors(tmp_path / "theirs")
    assert set(a) == set(b)
    assert [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])] == []


def test_model_references_in_mergekits_mapping_form_identical_to_mergekit(model_sets, mergekit, write_yaml,
                                                                          folder_tensors, tmp_path):
    # mergekit's schema also takes a reference as {model: PATH, lora: PATH}, each PATH a string or {path: ...}
    from tests.lora_adapters import write_adapter
    base, e1, e2, _ = model_sets("llama")
    write_adapter(str(tmp_path / "a1"), base, seed=1)
    write_adapter(str(tmp_path / "a2"), e1, seed=2)
    config = {"merge_method": "task_arithmetic", "dtype": "float32",
              "base_model": {"model": base, "lora": str(tmp_path / "a1")}, "models": [
                  {"model": {"model": {"path": e1}, "lora": {"path": str(tmp_path / "a2")}}, "parameters": {"weight": 0.6}},
                  {"model": {"model": {"path": e2}}, "parameters": {"weight": 0.3}}]}
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(tmp_path / "theirs"), "--lora-merge-cache", str(tmp_path / "cache"))
    a, b = folder_tensors(tmp_path / "ours"), folder_tensors(tmp_path / "theirs")
    assert set(a) == set(b)
    assert [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])] == []


# Models with several layer stacks, each stack with its own gradient t: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Mistral 3
# (mergekit's multi-module architectures) and T5 (3 encoder, 2 decoder blocks). Qwen2-VL's and Qwen2.5-VL's projector MLP differs:
# mergekit's architecture file makes it a two-layer module without layer numbers, so each of those
# tensors is merged at t=0 and again at t=1 and the second write wins; merge_engine merges it once, at
# t=0, like every other weight outside the layers (README).
PROJECTOR = [f"visual.merger.mlp.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
STACKED = {"qwen2_vl": ("make_qwen2_vl", PROJECTOR), "qwen2_5_vl": ("make_qwen2_5_vl", PROJECTOR),
           "qwen3_vl": ("make_qwen3_vl", []), "mistral3": ("make_mistral3", []), "t5": ("make_t5", [])}


@pytest.mark.parametrize("arch", sorted(STACKED))
def test_layer_stacks_identical_to_mergekit(arch, mergekit, write_yaml, folder_tensors, tmp_path):
    import tests.stacked_models
    maker, expected_differences = STACKED[arch]
    base, e1, e2 = getattr(tests.stacked_models, maker)(str(tmp_path / "models"))
    config = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32", "models": [
        {"model": e1, "parameters": {"weight": [0.1, 0.9]}}, {"model": e2, "parameters": {"weight": 0.5}}]}
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(tmp_path / "theirs"))
    a, b = folder_tensors(tmp_path / "ours"), folder_tensors(tmp_path / "theirs")
    assert set(a) == set(b)
    assert sorted(n for n in a if not torch.equal(a[n], b[n])) == expected_differences



def module_slices(*slices, parameters=None) -> dict:
    """A module of a modules: config: slices given as [(model, (start, end), parameters), ...] per slice."""
    out = {"slices": [{"sources": [{"model": m, "layer_range": list(r), **({"parameters": p} if p else {})}
                                   for m, r, p in sources]} for sources in slices]}
    return {**out, "parameters": parameters} if parameters else out


def module_models(*entries, parameters=None) -> dict:
    out = {"models": [{"model": m, **({"parameters": p} if p else {})} for m, p in entries]}
    return {**out, "parameters": parameters} if parameters else out


# modules: configs (mergekit's syntax for multi-module architectures): each module from its own models or slices, with
# its own parameters between the slices' and the config's. -> (maker, config builder(base, e1, e2), the config.json
# keys that differ from mergekit's: a sliced Qwen2-VL language model's count is set in text_config too, where
# transformers reads it, and its layer_types rebuilt; mergekit sets only the top-level count, and transformers then
# loads the merge with the layers beyond text_config's count dropped)
MODULE_CASES = {
    "qwen2_vl_sliced_text": ("make_qwen2_vl", lambda b, e1, e2: {
        "merge_method": "task_arithmetic", "base_model": b, "dtype": "float32", "modules": {
            "text_decoder": module_slices([(b, (0, 2), None), (e1, (1, 3), {"weight": 0.7})],
                                          [(b, (1, 3), None), (e2, (0, 2), {"weight": [0.2, 0.8]})],
                                          parameters={"weight": 0.3}),
            "vision_tower": module_models((e1, {"weight": [0.5, 1.0]})),
            "multi_modal_projector": module_models((e2, None), parameters={"weight": 0.25})}},
        ["text_config.layer_types", "text_config.num_hidden_layers"]),
    "mistral3_ties_sliced_vision": ("make_mistral3", lambda b, e1, e2: {
        "merge_method": "ties", "base_model": b, "dtype": "float32", "parameters": {"density": 0.6}, "modules": {
            "text_decoder": module_slices([(b, (0, 3), None), (e1, (0, 3), {"weight": [0.2, 0.9], "density": 0.4}),
                                           (e2, (0, 3), {"weight": 0.5})]),
            "vision_tower": module_slices([(b, (0, 2), None), (e1, (0, 2), {"weight": 1.0})],
                                          [(b, (1, 2), None), (e2, (0, 1), {"weight": 1.0})]),
            "multi_modal_projector": module_models((e2, {"weight": 0.5}), parameters={"density": 0.9})}}, []),
    "qwen3_vl_deepstack_gradient": ("make_qwen3_vl", lambda b, e1, e2: {
        "merge_method": "task_arithmetic", "base_model": b, "dtype": "float32", "modules": {
            "text_decoder": module_slices([(b, (0, 2), None), (e1, (1, 3), {"weight": [0.1, 0.9]})]),
            "vision_tower": module_models((e1, {"weight": 0.5}), (e2, {"weight": 0.2})),
            "multi_modal_projector": module_models((e1, {"weight": [0, 1]}))}}, []),
    "t5_slerp": ("make_t5", lambda b, e1, e2: {
        "merge_method": "slerp", "base_model": b, "dtype": "float32", "parameters": {"t": 0.3}, "modules": {
            "encoder": {"slices": [{"sources": [{"model": b, "layer_range": [0, 2]}, {"model": e1, "layer_range": [0, 2]}],
                                    "parameters": {"t": [0, 1]}},
                                   {"sources": [{"model": b, "layer_range": [2, 3]}, {"model": e1, "layer_range": [2, 3]}]}]},
            "decoder": module_models((b, None), (e2, None), parameters={"t": 0.8}),
            "shared": module_models((b, None), (e1, None))}}, []),
    "gemma3_sliced_text": ("make_gemma3", lambda b, e1, e2: {
        "merge_method": "linear", "dtype": "float32", "modules": {
            "text_decoder": module_slices([(b, (0, 2), {"weight": 1.0}), (e1, (0, 2), {"weight": 2.0})],
                                          [(e2, (1, 2), {"weight": 1.0})]),
            "multi_modal_projector": module_models((e1, {"weight": 1.0}), (e2, {"weight": 3.0}))}},
        ["text_config.layer_types"]),  # (mergekit 0.1.5 fails on Gemma 3's vision tower as transformers 5 saves it)
    "llama4_every_module": ("make_llama4", lambda b, e1, e2: {
        "merge_method": "ties", "base_model": b, "dtype": "float32", "parameters": {"weight": 0.5}, "modules": {
            "text_decoder": module_models((e1, {"density": 0.4}), (e2, {"density": 0.8})),
            "vision_model": module_models((e1, None), parameters={"density": 0.6}),
            "multi_modal_projector": module_models((e2, None))}}, []),
    "whisper_encoder": ("make_whisper", lambda b, e1, e2: {  # (mergekit 0.1.5's decoder definition lacks a '.')
        "merge_method": "slerp", "base_model": b, "dtype": "float32", "parameters": {"t": [0.2, 0.7]},
        "modules": {"encoder": module_models((b, None), (e1, None))}}, []),
    # a module left out is not written, as mergekit writes only the modules a modules: config names
    "qwen2_vl_text_only": ("make_qwen2_vl", lambda b, e1, e2: {
        "merge_method": "linear", "dtype": "float32", "modules": {
            "text_decoder": module_models((b, {"weight": 0.5}), (e1, {"weight": 0.5}))}}, []),
}


@pytest.mark.parametrize("case", sorted(MODULE_CASES))
def test_modules_configs_identical_to_mergekit(case, mergekit, write_yaml, folder_tensors, tmp_path):
    import tests.stacked_models
    maker, build, config_differences = MODULE_CASES[case]
    config = build(*getattr(tests.stacked_models, maker)(str(tmp_path / "models")))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    merge(parse_config(config), str(ours), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(theirs))
    a, b = folder_tensors(ours), folder_tensors(theirs)
    assert set(a) == set(b)
    assert [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])] == []
    ours_config, theirs_config = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    assert sorted(differing_keys(ours_config, theirs_config)) == config_differences


def differing_keys(a: dict, b: dict, at: str = "") -> list[str]:
    """The dotted keys whose values differ between two config.json mappings."""
    keys = []
    for key in {**a, **b}:
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += differing_keys(a[key], b[key], f"{at}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(f"{at}{key}")
    return keys


def test_a_modules_config_of_a_one_module_architecture_names_it_default_as_mergekit(model_sets, mergekit, write_yaml,
                                                                                  folder_tensors, tmp_path):
    base, e1, e2, _ = model_sets("llama")
    config = {"merge_method": "linear", "dtype": "float32", "modules": {"default": module_slices(
        [(base, (0, 2), {"weight": 0.3}), (e1, (1, 3), {"weight": 0.7})], [(e2, (0, 3), None)],
        parameters={"weight": [1, 2]})}}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    merge(parse_config(config), str(ours), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(theirs))
    identical_outputs(ours, theirs, folder_tensors)

def test_the_config_file_is_kept_as_written_as_mergekit_keeps_it(model_sets, mergekit, tmp_path):
    # mergekit_config.yml is the config file's text (comments, layout), which model cards and hubs show
    base, e1, _, _ = model_sets("llama")
    config = tmp_path / "merge.yml"
    config.write_text(f"# blend of two fine-tunes\nmerge_method: linear\nmodels:\n"
                      f"  - {{model: {base}, parameters: {{weight: 0.3}}}}  # the base\n"
                      f"  - {{model: {e1}, parameters: {{weight: 0.7}}}}\ndtype: float32\n")
    merge(str(config), str(tmp_path / "ours"), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, str(config), str(tmp_path / "theirs"))
    written = (tmp_path / "ours" / "mergekit_config.yml").read_text()
    assert written == (tmp_path / "theirs" / "mergekit_config.yml").read_text() == config.read_text()


def transformers4_copy(folder, out) -> str:
    """A copy of a Llama folder whose config.json is as transformers 4 wrote it: torch_dtype, rope_theta."""
    shutil.copytree(folder, out)
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    config.pop("dtype", None)
    rope = config.pop("rope_parameters")
    config.update(torch_dtype="float32", rope_theta=rope["rope_theta"], transformers_version="4.44.0")
    json.dump(config, open(path, "w"))
    return out


def test_config_json_keeps_the_donors_keys_and_loads_as_mergekits(model_sets, mergekit, write_yaml, tmp_path):
    base, e1, _, _ = model_sets("llama")
    old = [transformers4_copy(m, str(tmp_path / f"old{i}")) for i, m in enumerate((base, e1))]
    config = {"merge_method": "linear", "base_model": old[0], "dtype": "bfloat16",
              "models": [{"model": m, "parameters": {"weight": 0.5}} for m in old]}
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(tmp_path / "theirs"))
    ours, theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "theirs"))
    assert ours["dtype"] == ours["torch_dtype"] == theirs["dtype"] == "bfloat16" and "torch_dtype" not in theirs
    assert ours["transformers_version"] == "4.44.0" and ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"]
    loaded = {}
    for d in ("ours", "theirs"):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / d), output_loading_info=True)
        assert not any(info.values()), (d, info)
        loaded[d] = model.config.to_diff_dict()
    assert {k: v for k, v in loaded["ours"].items() if k != "transformers_version"} == \
        {k: v for k, v in loaded["theirs"].items() if k != "transformers_version"}


def test_donor_tokenizer_with_a_chat_template_saved_as_mergekit_saves_it(vocab_models, mergekit, write_yaml, tmp_path):
    # both load the donor's tokenizer, set the template and save it: the same files (transformers 5 writes the
    # template as chat_template.jinja), the same settings in tokenizer_config.json
    twin = shutil.copytree(vocab_models["extra"], tmp_path / "twin")
    config = {"merge_method": "linear", "base_model": vocab_models["extra"], "dtype": "float32", "chat_template": "chatml",
              "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (vocab_models["extra"], str(twin))]}
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True))
    mergekit(write_yaml(config), str(tmp_path / "theirs"), "--no-write-model-card")
    files = {p.name for p in (tmp_path / "theirs").iterdir() if "model" not in p.name}
    assert files == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"}
    assert files <= {p.name for p in (tmp_path / "ours").iterdir()}
    ours, theirs = ({name: json.loads((tmp_path / d / name).read_text()) for name in ("tokenizer.json", "tokenizer_config.json")}
                    for d in ("ours", "theirs"))
    assert "local_files_only" not in ours["tokenizer_config.json"]  # how it was loaded here, not a setting to keep
    theirs["tokenizer_config.json"].pop("local_files_only")  # (mergekit's: False, as it may download)
    assert ours == theirs


def test_a_donor_without_a_tokenizer_gives_none_where_mergekit_saves_an_empty_one(mergekit, write_yaml, tmp_path):
    base, e1 = make_architecture(str(tmp_path / "models"), "gemma2", 2)
    config = {"merge_method": "linear", "base_model": base, "dtype": "float32",
              "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (base, e1)]}
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True))
    mergekit(write_yaml(config), str(tmp_path / "theirs"))
    assert not [p.name for p in (tmp_path / "ours").iterdir() if p.name.startswith("tokenizer")]
    assert len(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "theirs"))) < 10  # special tokens only


# The image and video processors' settings, which mergekit copies from the donor for its multimodal architectures
# (tagalong files: Qwen2-VL's preprocessor_config.json, Mistral 3's processor_config.json too), with or without the
# tokenizer. merge_engine copies each whenever the donor has it (README).
PROCESSOR_FILES = {"preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14},
                   "processor_config.json": {"processor_class": "PixtralProcessor", "image_token": "[IMG]"}}


@pytest.mark.parametrize("arch", ["qwen2_vl", "mistral3"])
def test_processor_files_copied_as_mergekit_copies_them(arch, mergekit, write_yaml, tmp_path):
    import tests.stacked_models
    base, e1, _ = getattr(tests.stacked_models, STACKED[arch][0])(str(tmp_path / "models"))
    for name, content in PROCESSOR_FILES.items():
        with open(os.path.join(base, name), "w") as f:
            json.dump(content, f)
    config = {"merge_method": "linear", "base_model": base, "dtype": "float32",
              "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (base, e1)]}
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(tmp_path / "theirs"))
    theirs = [n for n in PROCESSOR_FILES if (tmp_path / "theirs" / n).exists()]
    assert theirs, "mergekit copied no processor file"
    for name in theirs:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name


def tied_copy(folder, out) -> str:
    """A copy of a Llama folder whose head is tied to its embeddings: no lm_head.weight, tie_word_embeddings."""
    from safetensors.torch import load_file, save_file
    os.makedirs(out)
    for f in os.listdir(folder):
        src, dst = os.path.join(folder, f), os.path.join(out, f)
        if f.endswith(".safetensors"):
            tensors = load_file(src)
            tensors.pop("lm_head.weight", None)
            save_file(tensors, dst, metadata={"format": "pt"})
        elif f == "config.json":
            config = json.load(open(src))
            json.dump({**config, "tie_word_embeddings": True}, open(dst, "w"))
        elif f == "model.safetensors.index.json":
            index = json.load(open(src))
            index["weight_map"].pop("lm_head.weight", None)
            json.dump(index, open(dst, "w"))
        elif os.path.isfile(src):
            shutil.copy(src, dst)
    return out


# Tied and untied heads mixed: mergekit plans lm_head when any input has it, and an input without one merges its
# embeddings in its place (its architectures' tied names); a filter on lm_head still matches that input.
TIED_CASES = {
    "untied_base_tied_first": lambda b, tb, e, te: {
        "merge_method": "ties", "dtype": "float32", "base_model": b,
        "models": [{"model": te[1], "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": e[0], "parameters": {"weight": 0.5, "density": 0.5}}]},
    "tied_base_untied_first": lambda b, tb, e, te: {
        "merge_method": "task_arithmetic", "dtype": "float32", "base_model": tb,
        "models": [{"model": e[0], "parameters": {"weight": 0.4}}, {"model": te[1], "parameters": {"weight": 0.6}}]},
    "linear_filter_on_the_head": lambda b, tb, e, te: {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": tb, "parameters": {"weight": [{"filter": "lm_head", "value": 0.2}, {"value": 0.5}]}},
                   {"model": e[1], "parameters": {"weight": 0.5}}]},
}


@pytest.mark.parametrize("case", sorted(TIED_CASES))
def test_tied_and_untied_heads_identical_to_mergekit(case, model_sets, mergekit, write_yaml, folder_tensors,
                                                     tmp_path):
    base, *experts = model_sets("llama")
    tied = [tied_copy(m, str(tmp_path / f"tied{i}")) for i, m in enumerate([base, *experts])]
    config = TIED_CASES[case](base, tied[0], experts, tied[1:])
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    merge(parse_config(config), str(ours), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(theirs))
    a, b = folder_tensors(ours), folder_tensors(theirs)
    assert "lm_head.weight" in a and set(a) == set(b)
    assert all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)
    # where the donor ties its head, the output's own head is untied (mergekit keeps the donor's true)
    donor = json.loads((ours / "config.json").read_text())
    assert donor["tie_word_embeddings"] is False


# Architectures of mergekit's definitions beyond the model sets above (tests/arch_models.py), each merged three ways:
# a gradient weight, a gradient t, and slices that stack and renumber layers. Their config.json is mergekit's too.
ARCHITECTURE_CONFIGS = {
    "task_arithmetic": lambda b, e1, e2: {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
                                          **models(b, [e1, e2], [{"weight": [0.1, 0.9]}, {"weight": 0.5}])},
    "slerp": lambda b, e1, e2: {"merge_method": "slerp", "base_model": b, "dtype": "float32",
                                "parameters": {"t": [0.0, 0.3, 1.0]}, "models": [{"model": b}, {"model": e1}]},
    "slices": lambda b, e1, e2: {"merge_method": "passthrough", "dtype": "float32",
                                 "slices": [{"sources": [{"model": b, "layer_range": [0, 2]}]},
                                            {"sources": [{"model": e1, "layer_range": [1, 3]}]}]},
}
MOE = ("mixtral", "qwen3_moe", "olmoe", "phimoe", "qwen2_moe")
UNDEFINED_IN_MERGEKIT = ("gpt_neo",)  # merged as README says mergekit merges architectures it has no definition of


def identical_outputs(ours, theirs, folder_tensors) -> None:
    a, b = folder_tensors(ours), folder_tensors(theirs)
    assert set(a) == set(b)
    different = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - set(MOE) - set(UNDEFINED_IN_MERGEKIT)))
def test_architectures_identical_to_mergekit(arch, mergekit, write_yaml, folder_tensors, tmp_path):
    paths = make_architecture(str(tmp_path / "models"), arch)
    donor = json.loads(open(os.path.join(paths[0], "config.json")).read())
    for kind, build in ARCHITECTURE_CONFIGS.items():
        if kind == "slices" and "layer_types" in donor:
            continue  # mergekit keeps the donor's list, which transformers then refuses (README)
        config = build(*paths)
        ours, theirs = tmp_path / f"ours-{kind}", tmp_path / f"theirs-{kind}"
        merge(parse_config(config), str(ours), MergeOptions(quiet=True, copy_tokenizer=False))
        run_mergekit(mergekit, write_yaml(config, f"{kind}.yml"), str(theirs))
        identical_outputs(ours, theirs, folder_tensors)


MOE_CONFIGS = {
    **ARCHITECTURE_CONFIGS,
    "ties": lambda b, e1, e2: {"merge_method": "ties", "dtype": "float32", **models(
        b, [e1, e2], [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}],
        parameters={"rescale": True})},
    "model_stock": lambda b, e1, e2: {"merge_method": "model_stock", "dtype": "float32",
                                      **models(b, [e1, e2], [{}, {}])},
}


@pytest.mark.parametrize("arch", MOE)
def test_moe_experts_fused_as_mergekit(arch, mergekit, write_yaml, folder_tensors, tmp_path):
    # mergekit 0.1.5 reads experts through transformers 5's conversion mapping and merges and writes them fused,
    # one gate_up_proj and one down_proj per layer: whole-tensor methods (slerp, model_stock, TIES's cut-off and its
    # L1 rescale) see all of a layer's experts at once, as here
    paths = make_architecture(str(tmp_path / "models"), arch)
    for kind, build in MOE_CONFIGS.items():
        if kind == "slices" and arch not in ("mixtral", "qwen3_moe"):  # no mergekit definition: slices differ (README)
            continue
        config = build(*paths)
        ours, theirs = tmp_path / f"ours-{kind}", tmp_path / f"theirs-{kind}"
        merge(parse_config(config), str(ours), MergeOptions(quiet=True, copy_tokenizer=False))
        run_mergekit(mergekit, write_yaml(config, f"{kind}.yml"), str(theirs))
        assert any(n.endswith(".experts.gate_up_proj") for n in folder_tensors(ours))
        identical_outputs(ours, theirs, folder_tensors)


@pytest.mark.parametrize("arch", MOE)
def test_moe_checkpoint_layout_keeps_one_tensor_per_expert(arch, folder_tensors, tmp_path):
    # --expert-layout checkpoint: the checkpoints' names, each expert's projection merged on its own; for an
    # elementwise merge, the same values as the fused output's
    paths = make_architecture(str(tmp_path / "models"), arch)
    config = parse_config(ARCHITECTURE_CONFIGS["task_arithmetic"](*paths))
    merge(config, str(tmp_path / "fused"), MergeOptions(quiet=True, copy_tokenizer=False))
    merge(config, str(tmp_path / "kept"), MergeOptions(quiet=True, copy_tokenizer=False, expert_layout="checkpoint"))
    kept, fused, stored = (folder_tensors(tmp_path / d) for d in ("kept", "fused", "models/" + f"{arch}-0"))
    assert set(kept) == set(stored)
    for name, t in fused.items():
        if name.endswith("experts.down_proj"):
            layer = name.removesuffix(".mlp.experts.down_proj")
            down = sorted((n for n in kept if n.startswith(layer + ".") and ".experts." in n
                           and (n.endswith(".w2.weight") or n.endswith(".down_proj.weight"))),
                          key=lambda n: int(n.split(".experts.")[1].split(".")[0]))
            assert torch.equal(t, torch.stack([kept[n] for n in down]))


def test_a_last_slice_of_tied_heads_under_an_untied_donor_gets_its_head(model_sets, mergekit, write_yaml,
                                                                       folder_tensors, tmp_path):
    # README, Differences: mergekit writes no lm_head here and keeps tie_word_embeddings false (an untrained head
    # once loaded); merge_engine merges the head from the last slice's embeddings
    base, expert = model_sets("llama")[:2]
    tied = tied_copy(expert, str(tmp_path / "tied"))
    # the donor named: without base_model, mergekit takes its config.json from a set's first model, in hash order
    config = {"merge_method": "passthrough", "dtype": "float32", "base_model": base, "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}]}, {"sources": [{"model": tied, "layer_range": [2, 4]}]}]}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    merge(parse_config(config), str(ours), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(theirs))
    a, b = folder_tensors(ours), folder_tensors(theirs)
    assert set(a) - set(b) == {"lm_head.weight"} and set(b) <= set(a)
    assert all(torch.equal(a[n], b[n]) for n in b)
    assert torch.equal(a["lm_head.weight"], folder_tensors(tied)["model.embed_tokens.weight"])
    assert json.loads((theirs / "config.json").read_text()).get("tie_word_embeddings") is False


def mixed_dtype_copy(folder, out) -> str:
    """A copy of a Llama folder stored in several dtypes, as some checkpoints are: fp16 embeddings (the first tensor),
    fp32 norms, bf16 for the rest; its config.json says bfloat16."""
    from safetensors.torch import save_file

    from tests.conftest import _folder_tensors
    os.makedirs(out)
    tensors = {n: t.half() if "embed" in n else t.float() if "norm" in n else t.bfloat16()
               for n, t in _folder_tensors(folder).items()}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(folder, "config.json")))
    json.dump({**config, "dtype": "bfloat16"}, open(os.path.join(out, "config.json"), "w"))
    return out


@pytest.mark.parametrize("method", ["passthrough", "linear"])
def test_a_checkpoint_of_several_dtypes_keeps_the_dtype_most_of_it_has(method, model_sets, mergekit, write_yaml,
                                                                         folder_tensors, tmp_path):
    # each tensor merges in its own dtype, as in mergekit; config.json says the dtype most of the output is
    # written in (the donor's here, as mergekit keeps it), not the first tensor's (the embeddings' fp16)
    base, expert = model_sets("llama")[:2]
    mixed = [mixed_dtype_copy(m, str(tmp_path / f"mixed{i}")) for i, m in enumerate((base, expert))]
    config = {"merge_method": method, "models": [{"model": m, "parameters": {"weight": 0.5}} for m in mixed]}
    if method == "passthrough":
        config["models"] = [{"model": mixed[0]}]
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    merge(parse_config(config), str(ours), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(theirs))
    a, b = folder_tensors(ours), folder_tensors(theirs)
    assert a["model.embed_tokens.weight"].dtype == torch.float16 and set(a) == set(b)
    assert all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)
    assert json.loads((ours / "config.json").read_text())["dtype"] == \
        json.loads((theirs / "config.json").read_text())["dtype"] == "bfloat16"


# Pickled checkpoints (pytorch_model.bin, its shards with their index; tied heads stored as a second name of the
# embedding's storage, as transformers 4 saved them) and a pickled LoRA adapter (adapter_model.bin, peft's older
# format), beside safetensors ones: mergekit unpickles them with torch.load, merge_engine reads them in place.
PICKLED_CASES = {
    "task_arithmetic_bf16": ("llama_bf16_sharded", lambda b, e: {  # (TIES differs at tied cut-offs: README)
        "merge_method": "task_arithmetic", "dtype": "bfloat16", "base_model": b,
        **models(b, e, [{"weight": 0.5}, {"weight": 0.3}, {"weight": [0.2, 0.9]}])}),
    "slerp_gpt2": ("gpt2", lambda b, e: {"merge_method": "slerp", "base_model": b, "dtype": "float32",
                                         "parameters": {"t": [0.1, 0.8]}, "models": [{"model": b}, {"model": e[0]}]}),
}


@pytest.mark.parametrize("case", sorted(PICKLED_CASES))
def test_pickled_checkpoints_identical_to_mergekit(case, model_sets, mergekit, write_yaml, folder_tensors, tmp_path):
    key, build = PICKLED_CASES[case]
    base, *experts = model_sets(key)
    pickled = [pickled_copy(base, tmp_path / "base"), pickled_copy(experts[0], tmp_path / "e0", shards=3)]
    config = build(pickled[0], pickled[1:] + experts[1:])
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(tmp_path / "theirs"))
    identical_outputs(tmp_path / "ours", tmp_path / "theirs", folder_tensors)
    # the same merge of the safetensors folders writes the same tensors
    merge(parse_config(build(base, experts)), str(tmp_path / "safetensors"), MergeOptions(quiet=True, copy_tokenizer=False))
    identical_outputs(tmp_path / "ours", tmp_path / "safetensors", folder_tensors)


def test_pickled_tied_heads_and_adapters_identical_to_mergekit(model_sets, mergekit, write_yaml, folder_tensors,
                                                               tmp_path):
    from tests.lora_adapters import write_adapter
    base, e1, e2, _ = model_sets("llama")
    tie = ("lm_head.weight", "model.embed_tokens.weight")
    tied = [pickled_copy(tied_copy(m, str(tmp_path / f"t{i}")), tmp_path / f"tied{i}", tie=tie)
            for i, m in enumerate([base, e1])]
    write_adapter(str(tmp_path / "adapter"), e2, seed=3, embedding="model.embed_tokens")
    adapter = tmp_path / "adapter"
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(weights, adapter / "adapter_model.bin")
    config = {"merge_method": "task_arithmetic", "base_model": tied[0], "dtype": "float32", "models": [
        {"model": tied[1], "parameters": {"weight": 0.6}}, {"model": f"{e2}+{adapter}", "parameters": {"weight": 0.3}}]}
    merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(tmp_path / "theirs"), "--lora-merge-cache", str(tmp_path / "cache"))
    a, b = folder_tensors(tmp_path / "ours"), folder_tensors(tmp_path / "theirs")
    assert "lm_head.weight" in a and set(a) == set(b)
    assert [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])] == []


def test_pickled_checkpoints_with_entries_that_are_not_tensors_identical_to_mergekit(model_sets, mergekit, write_yaml,
                                                                                    folder_tensors, tmp_path):
    """A training step and a config dict saved beside the weights: mergekit never asks for them and merges."""
    base, expert, *_ = model_sets("llama")
    pickled = pickled_copy(base, tmp_path / "base")
    weights = torch.load(os.path.join(pickled, "pytorch_model.bin"), weights_only=True)
    torch.save({**weights, "step": 3, "config": {"lr": 0.1}}, os.path.join(pickled, "pytorch_model.bin"))
    config = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": pickled, "parameters": {"weight": 0.4}}, {"model": expert, "parameters": {"weight": 0.6}}]}
    with pytest.warns(UserWarning, match="passes over 2 entries that are not tensors"):
        merge(parse_config(config), str(tmp_path / "ours"), MergeOptions(quiet=True, copy_tokenizer=False))
    run_mergekit(mergekit, write_yaml(config), str(tmp_path / "theirs"))
    identical_outputs(tmp_path / "ours", tmp_path / "theirs", folder_tensors)


def test_multi_stage_merges_identical_to_mergekit_multi(model_sets, mergekit_yaml, folder_tensors, tmp_path):
    """mergekit-multi's YAML: a named linear merge read by the final slerp (a plain reference) and by another named
    merge (mergekit's mapping form); every output identical."""
    import subprocess

    import yaml
    base, e1, e2, _ = model_sets("llama")
    documents = [
        {"name": "blend", "merge_method": "linear", "dtype": "float32",
         "models": [{"model": e1, "parameters": {"weight": 0.6}}, {"model": e2, "parameters": {"weight": 0.4}}]},
        {"merge_method": "slerp", "base_model": base, "dtype": "float32", "parameters": {"t": [0.2, 0.8]},
         "models": [{"model": base}, {"model": "blend"}]},
        {"name": "ta", "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
         "models": [{"model": {"model": {"path": "blend"}}, "parameters": {"weight": 0.5}}]}]
    config = tmp_path / "multi.yml"
    config.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    multi = os.path.join(os.path.dirname(mergekit_yaml), "mergekit-multi")
    subprocess.run([multi, str(config), "-I", str(tmp_path / "theirs"), "--out-path", str(tmp_path / "theirs-final"),
                    "--no-copy-tokenizer"], check=True, capture_output=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
    from merge_engine.cli import main
    assert main(["multi", str(config), "-I", str(tmp_path / "ours"), "--out-path", str(tmp_path / "ours-final"),
                 "--no-copy-tokenizer", "-q"]) == 0
    for ours, theirs in (("ours/blend", "theirs/blend"), ("ours/ta", "theirs/ta"), ("ours-final", "theirs-final")):
        identical_outputs(tmp_path / ours, tmp_path / theirs, folder_tensors)
