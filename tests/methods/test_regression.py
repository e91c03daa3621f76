"""RegMean and Bayesian Model Merging through the engine (merge_engine/methods/regression.py), on tiny
Llama and GPT-2 checkpoints with Grams collected from text by merge_engine.stats.gram.

Each merged linear weight must equal the closed form (ops/regression.py) applied to that tensor's
inputs, and every other tensor the wrapped method's output. Both sides compute in float64 from the same
fp32 inputs and round to fp32 at the end, so they agree to within an fp32 rounding or two: compared
with rtol 1e-5, atol 1e-7 (the weights are ~1e-2). The limits (lambda -> inf gives the anchor merge,
alpha = 1 with one shared Gram gives the average) hold to a few fp32 ulps as well.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine.config import parse_config
from merge_engine.engine import MergeOptions, merge
from merge_engine.errors import ConfigError, MergeEngineError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.grams import as_matrix, load_gram_folder
from merge_engine.methods.base import TensorGroup
from merge_engine.methods.regression import _bmm as bmm_merge
from merge_engine.ops import regression
from merge_engine.stats.gram import GramOptions, collect_grams
from tests.stats.tiny_text import SENTENCES, tiny_tokenizer

OPTIONS = MergeOptions(device="cpu", quiet=True)


@pytest.fixture(scope="module")
def setup(model_sets, tmp_path_factory):
    """arch -> (model folders [base, e1, e2, e3], Gram folders of e1..e3 from different sentences)."""
    root = tmp_path_factory.mktemp("regression")
    cache = {}

    def get(arch):
        if arch not in cache:
            paths = model_sets(arch)
            grams = []
            for i, path in enumerate(paths[1:]):
                data = root / f"{arch}-data{i}.txt"
                data.write_text("\n".join(SENTENCES[i::2] + SENTENCES[:2]) + "\n")
                out = str(root / f"{arch}-grams{i}")
                collect_grams(path, str(data), out, GramOptions(batch_size=2, max_length=16, quiet=True, device="cpu",
                                                                tokenizer=tiny_tokenizer()))
                grams.append(out)
            cache[arch] = (paths, grams)
        return cache[arch]
    return get


def config(method, paths, grams, **params):
    return {"merge_method": method, "base_model": paths[0], "dtype": "float32",
            "models": [{"model": p, "grams": g} for p, g in zip(paths[1:], grams)], "parameters": params}


def run(cfg, out) -> Checkpoint:
    merge(parse_config(cfg), str(out), OPTIONS)
    return Checkpoint(str(out))


def gram(folder, weight_name, scale):
    f = load_gram_folder(folder)
    entry = f.module_of(weight_name)
    g = as_matrix(Checkpoint(folder).read(entry["gram"]), entry["in_features"]).double()
    if scale == "tokens":
        return g / entry["rows"], entry["transposed"]
    return g * (g.shape[0] / torch.trace(g)), entry["transposed"]


def close(a, b):
    return torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_regmean_equals_the_closed_form_on_every_linear_weight(setup, tmp_path, arch):
    paths, grams = setup(arch)
    out = run(config("regmean", paths, grams), tmp_path / "out")
    models = [Checkpoint(p) for p in paths[1:]]
    folder = load_gram_folder(grams[0])
    regressed = 0
    for name in out.tensors:
        inputs = [m.read(name) for m in models]
        if folder.module_of(name) is None:  # fallback: the simple average
            assert close(out.read(name), sum(inputs) / len(inputs)), name
            continue
        gs = [gram(g, name, "tokens") for g in grams]
        transposed = gs[0][1]
        ws = [w.T if transposed else w for w in inputs]
        expected = regression.regmean(ws, [g for g, _ in gs], 0.9)
        assert close(out.read(name), expected.T if transposed else expected), name
        regressed += 1
    assert regressed == len(folder.manifest["modules"])


def test_regmean_with_one_shared_gram_is_the_average(setup, tmp_path):
    """(sum_t W_t G)(3 G)^-1 = mean(W) for an invertible G. With these few tokens the raw Grams are
    singular (alpha = 1 is checked on invertible ones in tests/ops/test_regression.py); the shrunk
    G~ = 0.9 G + 0.1 diag(G) is invertible as no input feature is constant zero."""
    paths, grams = setup("llama")
    out = run(config("regmean", paths, [grams[0]] * 3), tmp_path / "out")
    models = [Checkpoint(p) for p in paths[1:]]
    for name in out.tensors:
        assert close(out.read(name), sum(m.read(name) for m in models) / 3), name


def test_regmean_fallback_method_and_its_parameters(setup, tmp_path):
    paths, grams = setup("llama")
    cfg = config("regmean", paths, grams, fallback="linear")
    cfg["models"][0]["parameters"] = {"weight": 2.0}
    out = run(cfg, tmp_path / "out")
    models = [Checkpoint(p) for p in paths[1:]]
    name = "model.norm.weight"
    expected = (2 * models[0].read(name) + models[1].read(name) + models[2].read(name)) / 4
    assert close(out.read(name), expected)


def test_regmean_weights_reach_the_fallback_only(setup, tmp_path):
    """As docs/data-aware.md says (unlike the authors' code, which scales each Gram by its model's
    coefficient): a model's weight changes the fallback's tensors and leaves the regressed ones as they are."""
    paths, grams = setup("llama")
    weighted = config("regmean", paths, grams)
    weighted["models"][0]["parameters"] = {"weight": 5.0}
    plain, heavy = run(config("regmean", paths, grams), tmp_path / "plain"), run(weighted, tmp_path / "weighted")
    regressed = load_gram_folder(grams[0])
    for name in plain.tensors:
        same = torch.equal(plain.read(name), heavy.read(name))
        assert same == (regressed.module_of(name) is not None), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_regmean_with_slices_that_renumber_layers_takes_each_input_layers_gram(setup, tmp_path, arch):
    """Two slices of every layer: output layer L + layers comes from input layer L, so its Grams are
    those of input layer L (found by the input's name, not the output's)."""
    paths, grams = setup(arch)
    models = [Checkpoint(p) for p in paths[1:]]
    layers = 1 + max(int(n.split(".")[n.split(".").index("h" if arch == "gpt2" else "layers") + 1])
                     for n in models[0].tensors if ".h." in n or ".layers." in n)
    sources = [{"model": p, "grams": g, "layer_range": [0, layers]} for p, g in zip(paths[1:], grams)]
    out = run({"merge_method": "regmean", "dtype": "float32", "slices": [{"sources": sources}] * 2}, tmp_path / "out")
    folder = load_gram_folder(grams[0])
    marker = ".h." if arch == "gpt2" else ".layers."
    checked = 0
    for name in (n for n in models[0].tensors if folder.module_of(n) is not None and marker in n):
        prefix, rest = name.split(marker)
        layer, tail = rest.split(".", 1)
        gs = [gram(g, name, "tokens") for g in grams]
        transposed = gs[0][1]
        expected = regression.regmean([m.read(name).T if transposed else m.read(name) for m in models],
                                      [g for g, _ in gs], 0.9)
        renumbered = f"{prefix}{marker}{int(layer) + layers}.{tail}"
        for out_name in (name, renumbered):
            assert close(out.read(out_name), expected.T if transposed else expected), out_name
        checked += 1
    assert checked == sum(marker in m for m in folder.manifest["modules"]) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bmm_equals_the_closed_form_around_the_anchor(setup, tmp_path, arch):
    paths, grams = setup(arch)
    anchor = run({"merge_method": "task_arithmetic", "base_model": paths[0], "dtype": "float32",
                  "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths[1:]]}, tmp_path / "ta")
    cfg = config("bmm", paths, grams, **{"lambda": 0.3, "weight": 0.5})
    out = run(cfg, tmp_path / "bmm")
    models = [Checkpoint(p) for p in paths[1:]]
    folder = load_gram_folder(grams[0])
    for name in out.tensors:
        if folder.module_of(name) is None:
            assert torch.equal(out.read(name), anchor.read(name)), name
            continue
        gs = [gram(g, name, "trace") for g in grams]
        transposed = gs[0][1]
        ws = [m.read(name).T if transposed else m.read(name) for m in models]
        prior = anchor.read(name).T if transposed else anchor.read(name)
        expected = regression.bmm(ws, [g for g, _ in gs], prior, 0.3)
        assert close(out.read(name), expected.T if transposed else expected), name
    huge = run(config("bmm", paths, grams, **{"lambda": 1e12, "weight": 0.5}), tmp_path / "huge")
    for name in huge.tensors:
        assert close(huge.read(name), anchor.read(name)), name


def test_bmm_with_a_ties_anchor_takes_its_parameters(setup, tmp_path):
    paths, grams = setup("llama")
    ties = run({"merge_method": "ties", "base_model": paths[0], "dtype": "float32",
                "models": [{"model": p} for p in paths[1:]], "parameters": {"weight": 1.0, "density": 0.4, "lambda": 0.8}},
               tmp_path / "ties")
    out = run(config("bmm", paths, grams, anchor="ties", density=0.4, anchor_lambda=0.8, **{"lambda": 1e12}),
              tmp_path / "bmm")
    for name in out.tensors:
        assert close(out.read(name), ties.read(name)), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bmm_data_free_estimates_grams_from_task_vectors(setup, tmp_path, arch):
    """Each expert's Gram is U^T U of its task vector U [out, in]: for GPT-2's Conv1D weights, stored [in, out],
    the transposed ones (the Gram is over the layer's inputs), the solve's result turned back."""
    paths, _ = setup(arch)
    cfg = {"merge_method": "bmm", "base_model": paths[0], "dtype": "float32",
           "models": [{"model": p} for p in paths[1:]], "parameters": {"data_free": True, "lambda": 2.0}}
    out = run(cfg, tmp_path / "bmm")
    base, models = Checkpoint(paths[0]), [Checkpoint(p) for p in paths[1:]]
    linear = 0
    for name in out.tensors:
        b = base.read(name)
        task_vectors = [m.read(name) - b for m in models]
        anchor = b + sum(task_vectors)  # task arithmetic, weight 1, lambda 1
        if b.dim() != 2 or not name.endswith(".weight") or any(k in name for k in ("embed", "wte", "wpe", "lm_head")):
            assert close(out.read(name), anchor), name
            continue
        turned = (lambda w: w.T) if arch == "gpt2" else (lambda w: w)
        ws = [turned(m.read(name)) for m in models]
        expected = regression.bmm(ws, [regression.task_vector_gram(w, turned(b)) for w in ws], turned(anchor), 2.0)
        assert close(out.read(name), turned(expected)), name
        linear += 1
    assert linear == {"llama": 7, "gpt2": 4}[arch] * base.num_layers  # Llama: q k v o gate up down; GPT-2: c_attn c_proj c_fc c_proj


@pytest.mark.parametrize("method, params, message", [
    ("bmm", {"anchor": "fisher"}, "not a weight-only merge method"),
    ("bmm", {"anchor": "nope"}, "not a weight-only merge method"),
    ("regmean", {"fallback": "bmm"}, "not a weight-only merge method"),
    ("regmean", {"alpha": 1.5}, "'alpha' must be in"),
    ("bmm", {"lambda": -1}, "'lambda' must be"),
    ("bmm", {"gram_scale": "sum"}, "'gram_scale' must be one of"),
    ("bmm", {"density": "dense"}, "'density' must be float"),  # the anchor's parameters are checked too
])
def test_bad_parameters_are_refused(setup, method, params, message):
    paths, grams = setup("llama")
    with pytest.raises(ConfigError, match=message):
        parse_config(config(method, paths, grams, **{"anchor": "ties", **params}))


def wrapping(method, models, base=None, **params):
    """A config of folder names alone (parse_config reads no folder); bmm data-free, regmean with Grams."""
    if method == "bmm":
        return {"merge_method": method, "base_model": base, "models": [{"model": m} for m in models],
                "parameters": {"data_free": True, **params}}
    cfg = {"merge_method": method, "models": [{"model": m, "grams": f"{m}-grams"} for m in models], "parameters": params}
    return {**cfg, "base_model": base} if base else cfg


@pytest.mark.parametrize("cfg, message", [
    (wrapping("regmean", ["e1", "e2"], fallback="ties"), r"\(regmean wrapping ties\): merge method 'ties' requires a "
                                                         "base_model"),
    (wrapping("bmm", ["e1", "e2"], "base", anchor="slerp", t=0.5), "merge method 'slerp' needs exactly 2 inputs, got 3"),
    (wrapping("bmm", ["e1", "e2", "e3"], "base", anchor="nuslerp"), "'nuslerp' needs exactly 2 non-base inputs, got 3"),
])
def test_the_wrapped_methods_inputs_are_checked_with_the_config(cfg, message):
    """The fallback or anchor merges the same inputs (less the base where it takes none): a config it cannot merge
    is refused when read, not mid-merge (ties without a base) or merged wrong (slerp leaving out an expert)."""
    with pytest.raises(ConfigError, match=message):
        parse_config(cfg)


@pytest.mark.parametrize("cfg", [
    wrapping("regmean", ["e1", "e2", "e3"], "base", fallback="linear"),  # linear averages the experts alone
    wrapping("regmean", ["e1", "e2"], fallback="linear"),
    wrapping("bmm", ["e1"], "base", anchor="slerp", t=0.5),
])
def test_the_wrapped_methods_inputs_it_can_merge_are_taken(cfg):
    parse_config(cfg)


def test_the_wrapped_methods_tensor_problems_are_found_when_planning(setup, tmp_path):
    """Parameters that would make the fallback or anchor fail on a tensor are refused before any output, as for the
    method on its own; the weights a linear fallback averages are the experts' alone (its input, less the base)."""
    paths, grams = setup("llama")
    della = {"merge_method": "bmm", "base_model": paths[0], "models": [{"model": p} for p in paths[1:]],
             "parameters": {"data_free": True, "anchor": "della", "density": 0.9}}
    cancelling = config("regmean", paths[:3], grams[:2], fallback="linear")
    cancelling["models"][1]["parameters"] = {"weight": -1.0}
    for cfg, message in ((della, "della needs 0 < density - epsilon"), (cancelling, r"the weights \[1.0, -1.0\] sum to 0")):
        with pytest.raises(ConfigError, match=message):
            merge(parse_config(cfg), str(tmp_path / "out"), OPTIONS)
        assert not (tmp_path / "out").exists()
    cancelling["models"].append({"model": paths[0], "parameters": {"weight": -2.0}})  # the base's: not averaged
    cancelling["models"][0]["parameters"] = {"weight": 3.0}
    run(cancelling, tmp_path / "out")


def test_missing_or_mismatched_grams_are_refused_before_any_output(setup, tmp_path):
    paths, grams = setup("llama")
    cfg = config("regmean", paths, grams)
    del cfg["models"][1]["grams"]
    with pytest.raises(ConfigError, match=r"needs 'grams: PATH' for this model \(the folder written by "
                                          r"`merge-engine stats`\)"):
        parse_config(cfg)
    _, gpt2_grams = setup("gpt2")
    cfg = config("regmean", paths, [grams[0], gpt2_grams[0], grams[2]])
    with pytest.raises(ConfigError, match=f"{gpt2_grams[0]}: holds the Gram of no weight of this merge"):
        merge(parse_config(cfg), str(tmp_path / "out"), OPTIONS)
    assert not (tmp_path / "out").exists()


def test_gram_folders_named_relative_to_the_working_folder_merge(setup, tmp_path, monkeypatch):
    """Configs name folders as docs/data-aware.md does (`grams: math-grams/`, relative): each one that holds a
    weight's Gram counts as used, whatever the form of the path it was opened by."""
    paths, grams = setup("llama")
    monkeypatch.chdir(tmp_path)
    for i, g in enumerate(grams):
        shutil.copytree(g, tmp_path / f"grams{i}")
    relative = [f"grams{i}/" for i in range(len(grams))]
    out = run(config("regmean", paths, relative), tmp_path / "relative")
    expected = run(config("regmean", paths, grams), tmp_path / "absolute")
    assert all(torch.equal(out.read(n), expected.read(n)) for n in expected.tensors)


def test_a_gram_that_is_not_symmetric_is_refused_naming_its_folder(setup, tmp_path):
    """A Cholesky solve reads one triangle of the system: an asymmetric stored Gram would merge silently."""
    paths, grams = setup("llama")
    bad = tmp_path / "bad-grams"
    shutil.copytree(grams[1], bad)
    folder = load_gram_folder(str(bad))
    entry = next(iter(folder.manifest["modules"].values()))
    shard = Checkpoint(str(bad)).tensors[entry["gram"]].file
    tensors = load_file(shard)
    tensors[entry["gram"]][0, -1] += float(tensors[entry["gram"]].abs().max())
    save_file(tensors, shard)
    # the first tensor that reads it may be another module sharing the Gram (q, k and v read one input)
    with pytest.raises(MergeEngineError, match=f"{bad}: the Gram '{entry['gram']}' of '[^']+' is not symmetric"):
        run(config("regmean", paths, [grams[0], str(bad), grams[2]]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_weight_one_models_grams_lack_is_merged_without_regression_with_a_warning(setup, tmp_path, caplog):
    """One expert's manifest lacks q_proj (the others' cover it): q_proj falls back to the wrapped method (the
    average), named in a warning; the weights every manifest covers are still regressed."""
    paths, grams = setup("llama")
    partial = tmp_path / "partial-grams"
    shutil.copytree(grams[1], partial)
    manifest = json.loads((partial / "grams.json").read_text())
    del manifest["modules"]["model.layers.0.self_attn.q_proj"]
    (partial / "grams.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="merge_engine"):
        out = run(config("regmean", paths, [grams[0], str(partial), grams[2]]), tmp_path / "out")
    assert (f"{partial} has no Gram for 1 weight(s) that other models' Grams cover "
            "(model.layers.0.self_attn.q_proj.weight)") in caplog.text
    models = [Checkpoint(p) for p in paths[1:]]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert close(out.read(name), sum(m.read(name) for m in models) / 3)


@pytest.mark.parametrize("name, regressed", [
    ("model.layers.0.mlp.shared_expert.gate_proj.weight", True),  # Qwen2-MoE's shared expert: a linear layer
    ("model.layers.0.mlp.shared_experts.down_proj.weight", True),  # DeepSeek's
    ("model.layers.0.mlp.shared_expert_gate.weight", True),
    ("shared.weight", False),  # T5's shared embedding
    ("model.shared.weight", False),  # BART's
])
def test_data_free_bmm_regresses_shared_experts_but_not_shared_embeddings(name, regressed):
    """Data-free BMM against its formula in fp64: W* = (sum_t W_t G_t + lam A)(sum_t G_t + lam I)^-1 with
    G_t = U_t^T U_t scaled to trace d (U_t = W_t - W_base) and A the task-arithmetic anchor; an embedding
    gets the anchor. Both sides are fp64 solves of one well-conditioned 6 x 6 system: within 1e-10."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    experts = [base + torch.randn(4, 6, dtype=torch.float64, generator=gen) for _ in range(2)]
    anchor = base + sum(w - base for w in experts)
    group = TensorGroup(name, [base, *experts], 0, {"data_free": True, "lambda": 0.5, "solve_dtype": "float64"},
                        [{}] * 3)
    merged = bmm_merge(group, lambda g: anchor)
    if not regressed:
        assert torch.equal(merged, anchor)
        return
    grams = [(w - base).T @ (w - base) for w in experts]
    grams = [g * (6 / torch.trace(g)) for g in grams]
    expected = torch.linalg.solve(sum(grams) + 0.5 * torch.eye(6, dtype=torch.float64),
                                  sum(g @ w.T for g, w in zip(grams, experts)) + 0.5 * anchor.T).T
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-10)
    assert not torch.allclose(merged, anchor)


def test_grams_rewritten_in_the_same_process_are_read_again(setup, tmp_path):
    """`stats --overwrite` (collect_grams with overwrite) into a folder a merge of this process has already
    read: the next merge scales each Gram by the rows its new manifest says, not the old one's."""
    paths, grams = setup("llama")
    mine = [str(shutil.copytree(g, tmp_path / f"grams{i}")) for i, g in enumerate(grams)]
    run(config("regmean", paths, mine), tmp_path / "before")
    data = tmp_path / "fewer.txt"
    data.write_text(SENTENCES[0] + "\n")
    collect_grams(paths[1], str(data), mine[0], GramOptions(batch_size=2, max_length=16, quiet=True, device="cpu",
                                                                 tokenizer=tiny_tokenizer(), overwrite=True))
    out = run(config("regmean", paths, mine), tmp_path / "after")
    models = [Checkpoint(p) for p in paths[1:]]
    name = "model.layers.0.self_attn.q_proj.weight"
    gs = [gram(g, name, "tokens")[0] for g in mine]
    assert close(out.read(name), regression.regmean([m.read(name) for m in models], gs, 0.9))
