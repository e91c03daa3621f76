"""Fisher-weighted merging and the keep-by-Fisher variants of task arithmetic and TIES, run through the
engine on tiny Llama checkpoints with Fisher folders written beside them."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from merge_engine.config import parse_config
from merge_engine.engine import MergeOptions, merge
from merge_engine.errors import ConfigError, MergeEngineError
from merge_engine.ops.fisher import fisher_merge_reference

OPTIONS = MergeOptions(device="cpu", quiet=True)


def write_fisher(folder, model_tensors, seed, transform=None, manifest=True, skip=()):
    """A Fisher folder for a model: random positive tensors under the model's tensor names."""
    g = torch.Generator().manual_seed(seed)
    fisher = {}
    for name, t in model_tensors.items():
        if name in skip:
            continue
        f = torch.rand(t.shape, generator=g) ** 2 + 1e-3
        fisher[name] = (transform(name, f) if transform else f).contiguous()
    os.makedirs(folder, exist_ok=True)
    save_file(fisher, os.path.join(folder, "model.safetensors"))
    if manifest:
        sum_squares = sum(float(f.double().square().sum()) for f in fisher.values())
        with open(os.path.join(folder, "fisher.json"), "w") as fh:
            json.dump({"format": "merge_engine.fisher", "version": 1, "model": folder, "variant": "empirical",
                       "granularity": "per_batch", "examples": 1, "tokens": 1, "dtype": "float32", "seed": 0,
                       "max_length": None, "sum_squares": sum_squares, "tensors": len(fisher)}, fh)
    return fisher


@pytest.fixture
def llama(model_sets, folder_tensors, tmp_path):
    """(model folders, their tensors, a function writing Fisher folders for them)."""
    paths = model_sets("llama")
    tensors = [folder_tensors(p) for p in paths]

    def fishers(prefix="fisher", **kw):
        out = []
        for i, t in enumerate(tensors):
            folder = str(tmp_path / f"{prefix}{i}")
            out.append((folder, write_fisher(folder, t, seed=50 + i, **{k: v[i] if isinstance(v, list) else v
                                                                      for k, v in kw.items()})))
        return out
    return paths, tensors, fishers


def run(cfg, out):
    merge(parse_config(cfg), str(out), OPTIONS)


def test_fisher_merge_equals_the_op_on_every_tensor(llama, tmp_path, folder_tensors):
    paths, tensors, fishers = llama
    f = fishers()
    weights = [1.0, 0.5, 2.0, 1.0]
    cfg = {"merge_method": "fisher", "models": [{"model": p, "fisher": fo, "parameters": {"weight": w}}
                                                for p, (fo, _), w in zip(paths, f, weights)]}
    run(cfg, tmp_path / "out")
    out = folder_tensors(tmp_path / "out")
    assert set(out) == set(tensors[0])
    for name, merged in out.items():
        want = fisher_merge_reference([t[name] for t in tensors], [fi[name] for _, fi in f], weights,
                                      [1e-6, 0.0, 0.0, 0.0])
        assert torch.equal(merged, want), name


def test_a_donor_with_zero_fisher_is_ignored(llama, tmp_path, folder_tensors):
    paths, tensors, fishers = llama
    f = fishers(transform=[None, None, None, lambda n, x: torch.zeros_like(x)])
    models = [{"model": p, "fisher": fo} for p, (fo, _) in zip(paths, f)]
    run({"merge_method": "fisher", "models": models}, tmp_path / "all")
    run({"merge_method": "fisher", "models": models[:3]}, tmp_path / "three")
    a, b = folder_tensors(tmp_path / "all"), folder_tensors(tmp_path / "three")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_normalize_fisher_removes_each_models_scale(llama, tmp_path, folder_tensors):
    paths, _, fishers = llama
    plain = fishers()
    scaled = fishers("scaled", transform=[lambda n, x, s=s: x * s for s in (1.0, 1e3, 1e-2, 7.0)],
                     manifest=[True, False, True, False])  # norms from the manifest, or read from the folder
    outs = []
    for name, f in (("plain", plain), ("scaled", scaled)):
        cfg = {"merge_method": "fisher", "parameters": {"normalize_fisher": True, "fisher_floor": 0.0},
               "models": [{"model": p, "fisher": fo} for p, (fo, _) in zip(paths, f)]}
        run(cfg, tmp_path / name)
        outs.append(folder_tensors(tmp_path / name))
    for n in outs[0]:  # same weights up to the rounding of the normalised coefficients
        torch.testing.assert_close(outs[0][n], outs[1][n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("manifest", [True, False], ids=["norm from the manifest", "norm read from the folder"])
def test_a_fisher_rewritten_in_the_same_process_is_read_again(llama, tmp_path, folder_tensors, manifest):
    """A Fisher folder rewritten (`fisher --overwrite`) after a merge of this process read it: the next merge
    normalises by the new Fisher's norm, so scaling one model's Fisher by 1e3 changes nothing."""
    paths, _, fishers = llama
    cfg = {"merge_method": "fisher", "parameters": {"normalize_fisher": True, "fisher_floor": 0.0},
           "models": [{"model": p, "fisher": fo} for p, (fo, _) in zip(paths, fishers(manifest=manifest))]}
    run(cfg, tmp_path / "before")
    fishers(transform=[None, lambda n, x: x * 1e3, None, None], manifest=manifest)
    run(cfg, tmp_path / "after")
    before, after = folder_tensors(tmp_path / "before"), folder_tensors(tmp_path / "after")
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=1e-5, atol=1e-6)


def test_an_invalid_fisher_manifest_is_refused_before_merging(llama, tmp_path):
    paths, _, fishers = llama
    f = fishers()
    manifest = os.path.join(f[1][0], "fisher.json")
    with open(manifest) as fh:
        broken = {k: v for k, v in json.load(fh).items() if k != "tensors"}
    with open(manifest, "w") as fh:
        json.dump(broken, fh)
    cfg = {"merge_method": "fisher", "parameters": {"normalize_fisher": True},
           "models": [{"model": p, "fisher": fo} for p, (fo, _) in zip(paths, f)]}
    with pytest.raises(ConfigError, match='fisher.json: field "tensors" is missing'):
        run(cfg, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_an_integer_fisher_is_refused_before_merging(llama, tmp_path):
    paths, _, fishers = llama
    f = fishers(transform=[None, lambda n, x: (x * 100).to(torch.int32), None, None], manifest=False)
    cfg = {"merge_method": "fisher", "models": [{"model": p, "fisher": fo} for p, (fo, _) in zip(paths, f)]}
    with pytest.raises(ConfigError, match=r"fisher1/model\.safetensors: Fisher tensor '.*' is int32, not floating"):
        run(cfg, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_missing_fisher_tensor_falls_back_to_the_average_or_is_refused(llama, tmp_path, folder_tensors):
    paths, tensors, fishers = llama
    f = fishers(skip=[(), ("model.norm.weight",), (), ()])
    models = [{"model": p, "fisher": fo} for p, (fo, _) in zip(paths, f)]
    run({"merge_method": "fisher", "models": models}, tmp_path / "out")
    out = folder_tensors(tmp_path / "out")
    average = sum(t["model.norm.weight"] for t in tensors) / 4
    torch.testing.assert_close(out["model.norm.weight"], average, rtol=1e-6, atol=1e-7)
    cfg = {"merge_method": "fisher", "parameters": {"missing_fisher": "error"}, "models": models}
    with pytest.raises(ConfigError, match="no fisher tensor 'model.norm.weight'"):
        run(cfg, tmp_path / "refused")
    assert not os.path.exists(tmp_path / "refused")


def test_a_fisher_folder_of_another_model_is_refused(llama, tmp_path, caplog):
    """A Fisher folder sharing no tensor name with its model (computed for another architecture) is refused, as
    a Grams folder of another model is, rather than every tensor falling back to the plain average; no warning
    says its tensors are merged without it."""
    paths, tensors, fishers = llama
    f = fishers()
    other = str(tmp_path / "other-fisher")
    write_fisher(other, {f"transformer.{name}": t for name, t in tensors[1].items()}, seed=9)
    models = [{"model": p, "fisher": fo} for p, (fo, _) in zip(paths, f)]
    models[1]["fisher"] = other
    with pytest.raises(ConfigError, match=f"{other}: holds the Fisher of no tensor of this merge"):
        run({"merge_method": "fisher", "models": models}, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    assert "merged without it" not in caplog.text


def test_config_problems_are_reported_before_reading(llama, tmp_path):
    paths, tensors, fishers = llama
    f = fishers(transform=[None, lambda n, x: x.reshape(-1)[:5] if n == "model.norm.weight" else x, None, None])
    models = [{"model": p, "fisher": fo} for p, (fo, _) in zip(paths, f)]
    models[2]["fisher"] = str(tmp_path / "nowhere")
    del models[3]["fisher"]
    with pytest.raises(ConfigError) as e:
        run({"merge_method": "fisher", "models": models}, tmp_path / "out")
    text = str(e.value)
    assert f"[{paths[3]}]: merge method 'fisher' needs 'fisher: PATH' for this model (the folder written by " \
        "`merge-engine fisher`)" in text
    models[3]["fisher"] = f[3][0]
    with pytest.raises(ConfigError) as e:
        run({"merge_method": "fisher", "models": models}, tmp_path / "out")
    text = str(e.value)
    assert "nowhere: model path does not exist" in text
    assert "fisher tensor 'model.norm.weight' has shape [5]" not in text  # opening failed first
    models[2]["fisher"] = f[2][0]
    with pytest.raises(ConfigError, match=r"fisher tensor 'model.norm.weight' has shape \[5\]"):
        run({"merge_method": "fisher", "models": models}, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_all_zero_weights_are_refused_by_tensor_before_reading(llama, tmp_path):
    paths, tensors, fishers = llama
    f = fishers()
    models = [{"model": p, "fisher": fo, "parameters": {"weight": 0.0}} for p, (fo, _) in zip(paths, f)]
    models[1]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.5}, {"value": 0.0}]  # mlp: merged
    with pytest.raises(ConfigError) as e:
        run({"merge_method": "fisher", "models": models}, tmp_path / "out")
    named = [p for p in e.value.problems if "fisher needs at least one model with a weight > 0" in p]
    assert named == e.value.problems and all("mlp" not in p for p in named)
    assert any("(tensor 'model.embed_tokens.weight')" in p for p in named)
    assert not os.path.exists(tmp_path / "out")


def test_invalid_fisher_values_fail_the_merge_and_leave_nothing(llama, tmp_path):
    paths, _, fishers = llama
    def poison(n, x):
        if n == "model.layers.1.mlp.up_proj.weight":
            x[0, 0] = -1.0
        return x
    f = fishers(transform=[None, poison, None, None])
    cfg = {"merge_method": "fisher", "models": [{"model": p, "fisher": fo} for p, (fo, _) in zip(paths, f)]}
    with pytest.raises(MergeEngineError, match="model.layers.1.mlp.up_proj.weight.*Fisher of model 1 has 1 negative"):
        run(cfg, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_fisher_ties_with_magnitude_as_fisher_is_ties(llama, tmp_path, folder_tensors):
    paths, tensors, fishers = llama
    base = tensors[0]
    f = fishers(transform=[None] + [lambda n, x, t=t: (t[n] - base[n]).abs() for t in tensors[1:]])
    experts = [{"model": p, "fisher": fo, "parameters": {"weight": w, "density": d}}
               for p, (fo, _), w, d in zip(paths[1:], f[1:], (1.0, 0.6, 0.3), (0.3, 0.5, 0.2))]
    run({"merge_method": "fisher_ties", "base_model": paths[0], "models": experts}, tmp_path / "fties")
    plain = [{k: v for k, v in e.items() if k != "fisher"} for e in experts]
    run({"merge_method": "ties", "base_model": paths[0], "models": plain}, tmp_path / "ties")
    a, b = folder_tensors(tmp_path / "fties"), folder_tensors(tmp_path / "ties")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_fisher_task_arithmetic_keeps_the_highest_importance(llama, tmp_path, folder_tensors):
    paths, tensors, fishers = llama
    f = fishers()
    name = "model.layers.0.mlp.down_proj.weight"
    for importance in ("fisher", "saliency"):
        experts = [{"model": paths[1], "fisher": f[1][0], "parameters": {"weight": 1.0, "density": 0.25}}]
        cfg = {"merge_method": "fisher_task_arithmetic", "base_model": paths[0], "models": experts,
               "parameters": {"importance": importance}}
        run(cfg, tmp_path / importance)
        merged, base, expert = folder_tensors(tmp_path / importance)[name], tensors[0][name], tensors[1][name]
        kept = merged != base
        fisher = f[1][1][name]
        score = fisher if importance == "fisher" else fisher * (expert - base) ** 2
        assert int(kept.sum()) == int(0.25 * base.numel())
        assert torch.equal(merged[kept], expert[kept])
        assert score[kept].min() >= score[~kept].max()


def test_fisher_task_arithmetic_at_full_density_is_task_arithmetic(llama, tmp_path, folder_tensors):
    paths, _, fishers = llama
    f = fishers()
    experts = [{"model": p, "fisher": fo, "parameters": {"weight": w}} for p, (fo, _), w in
               zip(paths[1:], f[1:], (0.5, 0.3, 0.2))]
    run({"merge_method": "fisher_task_arithmetic", "base_model": paths[0], "models": experts}, tmp_path / "f")
    plain = [{k: v for k, v in e.items() if k != "fisher"} for e in experts]
    run({"merge_method": "task_arithmetic", "base_model": paths[0], "models": plain}, tmp_path / "t")
    a, b = folder_tensors(tmp_path / "f"), folder_tensors(tmp_path / "t")
    assert all(torch.equal(a[n], b[n]) for n in a)
