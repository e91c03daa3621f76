"""MergeSession (merge_engine/session.py): the live model equals `merge-engine`'s output bit for bit for every
method (opened on the config, and merged again into it from another config), re-merges touch only the
tensors whose parameters changed, the memory plan refuses what cannot fit, and save() writes the engine's files."""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import math
import os
import pathlib
import sys
import threading

import pytest
import torch

from merge_engine.config import parse_config
from merge_engine.engine import MergeOptions, merge
from merge_engine.errors import ConfigError, MergeEngineError
from merge_engine.plan import build_plan
from merge_engine.session import MemoryPlanError, MergeSession, plan_memory, without_parameters
from tests.conftest import pickled_copy
from tests.methods.test_fisher import write_fisher
from tests.test_parity_mergekit import CASES, FILTERED, GRADIENT, models

OURS = {  # merge_engine's own methods and the random ones (seeded per tensor), beside mergekit's CASES
    "dare_ties": ("llama", lambda b, e: {"merge_method": "dare_ties", "dtype": "float32",
                                         **models(b, e, [{"weight": 0.5, "density": GRADIENT}] * 3)}),
    "dare_linear_bf16": ("llama_bf16_sharded", lambda b, e: {
        "merge_method": "dare_linear", **models(b, e, [{"weight": 0.4, "density": 0.6}, {"weight": FILTERED,
                                                                                          "density": 0.5}])}),
    "della": ("llama", lambda b, e: {"merge_method": "della", "dtype": "float32",
                                     **models(b, e, [{"weight": 0.5, "density": 0.6, "epsilon": 0.1}] * 3)}),
    "della_linear_bf16": ("llama_bf16_sharded", lambda b, e: {
        "merge_method": "della_linear", **models(b, e, [{"weight": 0.5, "density": 0.5, "epsilon": 0.05}] * 2)}),
    "ties_bf16": ("llama_bf16_sharded", lambda b, e: {"merge_method": "ties", "dtype": "bfloat16",
                                                      **models(b, e, [{"weight": GRADIENT, "density": 0.4}] * 3)}),
    "tsv": ("llama", lambda b, e: {"merge_method": "tsv", "dtype": "float32", **models(b, e, [{}] * 3)}),
    "iso_c": ("llama", lambda b, e: {"merge_method": "iso_c", "dtype": "float32", **models(b, e, [{}] * 3)}),
}
ALL = {**CASES, **OURS}


def engine_tensors(config: dict, out, folder_tensors, **options) -> dict[str, torch.Tensor]:
    merge(parse_config(config), str(out), MergeOptions(device="cpu", quiet=True, copy_tokenizer=False, **options))
    return folder_tensors(out)


def differing(live: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    assert set(live) == set(ref)
    return [n for n in ref if live[n].dtype != ref[n].dtype or not torch.equal(live[n], ref[n])]


def shifted(config: dict) -> dict:
    """The same models with every numeric parameter moved (weights, densities, t, lambda...)."""
    def move(x):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return [move(v) for v in x] if isinstance(x, list) else (
                {k: (move(v) if k == "value" else v) for k, v in x.items()} if isinstance(x, dict) else x)
        return x * 0.9 if isinstance(x, float) and 0 < x <= 1 else x
    out = copy.deepcopy(config)
    for scope in [out.get("parameters")] + [m.get("parameters") for m in out.get("models", [])]:
        for key in list(scope or {}):
            scope[key] = move(scope[key])
    return out


@pytest.mark.parametrize("case", sorted(ALL))
def test_session_equals_the_engine_bit_for_bit(case, model_sets, folder_tensors, tmp_path):
    key, build = ALL[case]
    base, *experts = model_sets(key)
    config = build(base, experts)
    session = MergeSession(config, "cpu", progress=False)
    assert not differing(session.state_dict(), engine_tensors(config, tmp_path / "a", folder_tensors))
    # the live model's own tensors are the merge (not copies)
    held = session.model.state_dict()
    assert all(torch.equal(held[n], t) for n, t in session.state_dict().items() if n in held)
    other = shifted(config)
    session.merge(other)  # merged again from other parameters: the same bits as a fresh engine run
    assert not differing(session.state_dict(), engine_tensors(other, tmp_path / "b", folder_tensors))


def test_lora_input_equals_the_engine(model_sets, folder_tensors, tmp_path):
    from tests.lora_adapters import write_adapter
    base, e1, e2, _ = model_sets("llama")
    write_adapter(str(tmp_path / "a1"), e1, seed=1, embedding="model.embed_tokens", r=4, alpha=16)
    config = {"merge_method": "ties", "base_model": base, "dtype": "float32", "models": [
        {"model": f"{e1}+{tmp_path / 'a1'}", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": e2, "parameters": {"weight": GRADIENT, "density": 0.7}}]}
    session = MergeSession(config, "cpu", progress=False)
    assert not differing(session.state_dict(), engine_tensors(config, tmp_path / "a", folder_tensors))


def lora_experts_config(base: str, tmp_path, dtype: str = "bfloat16") -> dict:
    """TIES over two LoRA experts of `base` (one with an embedding update and a replaced tensor, one stored
    fan_in_fan_out-free in bf16) and base itself."""
    from tests.lora_adapters import write_adapter
    write_adapter(str(tmp_path / "a1"), base, seed=1, embedding="model.embed_tokens", r=4, alpha=16,
                  modules_to_save=("model.norm",))
    write_adapter(str(tmp_path / "a2"), base, targets=("k_proj", "o_proj", "up_proj"), seed=2, r=2,
                  dtype=torch.bfloat16)
    return {"merge_method": "ties", "base_model": base, "dtype": dtype, "models": [
        {"model": f"{base}+{tmp_path / 'a1'}", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": f"{base}+{tmp_path / 'a2'}", "parameters": {"weight": GRADIENT, "density": 0.7}}]}


@pytest.mark.parametrize("lora", ["applied", "factored"])
def test_lora_experts_equal_the_engine_applied_or_factored(lora, model_sets, folder_tensors, tmp_path):
    base = model_sets("llama_bf16_sharded")[0]
    config = lora_experts_config(base, tmp_path)
    session = MergeSession(config, "cpu", lora=lora, progress=False)
    assert session.memory.lora == lora
    assert not differing(session.state_dict(), engine_tensors(config, tmp_path / "a", folder_tensors))
    other = shifted(config)
    step = session.merge(other)
    assert step.tensors > 0
    assert not differing(session.state_dict(), engine_tensors(other, tmp_path / "b", folder_tensors))
    # job_inputs (what BMMProblem factorises and keeps): the same values each time; factored experts' tensors
    # applied afresh each time, so that a caller may keep them
    kept, again = ([t for _, tensors in session.job_inputs() for t in tensors] for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(kept, again))
    fresh = [x.data_ptr() != y.data_ptr() for x, y in zip(kept, again)]
    assert any(fresh) == (lora == "factored")


@pytest.mark.parametrize("lora", ["applied", "factored"])
def test_a_lora_merge_dtype_equals_the_engine_with_it(lora, model_sets, folder_tensors, tmp_path):
    """Each LoRA expert read in fp16 (its untouched tensors too: they are not the plain base's bf16 ones)."""
    base = model_sets("llama_bf16_sharded")[0]
    config = lora_experts_config(base, tmp_path, dtype="float32")
    session = MergeSession(config, "cpu", lora=lora, lora_merge_dtype=torch.float16, progress=False)
    assert session.memory.lora == lora
    live = session.state_dict()
    assert not differing(live, engine_tensors(config, tmp_path / "a", folder_tensors, lora_merge_dtype=torch.float16))
    assert differing(live, engine_tensors(config, tmp_path / "b", folder_tensors))  # the option changed the merge
    other = shifted(config)
    session.merge(other)
    assert not differing(session.state_dict(), engine_tensors(other, tmp_path / "c", folder_tensors,
                                                              lora_merge_dtype=torch.float16))


def test_lora_experts_hold_their_base_once(model_sets, tmp_path):
    base = model_sets("llama_bf16_sharded")[0]
    plan = build_plan(parse_config(lora_experts_config(base, tmp_path)))
    base_ckpt = plan.models[base]
    folder = sum(info.nbytes for info in base_ckpt.tensors.values())
    loras = [c for ref, c in plan.models.items() if "+" in ref]
    changed = [sum(base_ckpt.tensors[n].nbytes for n in c.targets) for c in loras]
    adapters = sum(c.adapter_bytes(n) for c in loras for n in c.targets if c.targets[n].a)
    replaced = sum(base_ckpt.tensors[n].nbytes for c in loras for n, t in c.targets.items() if t.a is None)
    roomy = {"host": 100 * folder}
    applied = plan_memory(plan, torch.device("cpu"), free=roomy, lora="applied")
    factored = plan_memory(plan, torch.device("cpu"), free=roomy, lora="factored")
    # applied: the base's tensors once (the experts' unchanged tensors are the base's), a copy of each changed one
    assert applied.input_bytes == folder + sum(changed)
    # factored: the base once, the adapters, and the tensors an adapter only replaces
    assert factored.input_bytes == folder + adapters + replaced < applied.input_bytes
    assert factored.lora_bytes > 0 and "LoRA updates applied at each merge" in factored.summary()
    assert plan_memory(plan, torch.device("cpu"), free=roomy).lora == "applied"  # auto: applied when it fits
    tight = {"host": factored.needs()["host"]}
    assert plan_memory(plan, torch.device("cpu"), free=tight).lora == "factored"
    with pytest.raises(MemoryPlanError, match="lora='factored' would fit"):
        plan_memory(plan, torch.device("cpu"), free=tight, lora="applied")
    cuda = torch.device("cuda")  # on a GPU the bases and adapters stay on the host, where updates are applied
    on_gpu = plan_memory(plan, cuda, "device", free={"cuda": 100 * folder, "host": 100 * folder}, lora="factored")
    assert on_gpu.input_bytes == folder + replaced and on_gpu.lora_bytes >= folder + adapters


def test_fisher_side_inputs_equal_the_engine(model_sets, folder_tensors, tmp_path):
    paths = model_sets("llama")
    fishers = [str(tmp_path / f"f{i}") for i in range(3)]
    for i, (p, f) in enumerate(zip(paths[1:], fishers)):
        write_fisher(f, folder_tensors(p), seed=50 + i)
    config = {"merge_method": "fisher", "parameters": {"normalize_fisher": True},
              "models": [{"model": p, "fisher": f, "parameters": {"weight": w}}
                         for p, f, w in zip(paths[1:], fishers, (0.2, GRADIENT, 0.5))]}
    session = MergeSession(config, "cpu", progress=False)
    assert not differing(session.state_dict(), engine_tensors(config, tmp_path / "a", folder_tensors))
    other = shifted(config)
    session.merge(other)
    assert not differing(session.state_dict(), engine_tensors(other, tmp_path / "b", folder_tensors))


def test_grams_regression_equals_the_engine(model_sets, folder_tensors, tmp_path):
    from tests.stats.tiny_text import write_expert_grams
    paths = model_sets("llama")[:3]
    grams = write_expert_grams(paths[1:], tmp_path)
    for method, params in (("regmean", {}), ("bmm", {"lambda": 0.5})):
        config = {"merge_method": method, "base_model": paths[0], "dtype": "float32", "parameters": params,
                  "models": [{"model": p, "grams": g, "parameters": {"weight": 0.5}} for p, g in zip(paths[1:], grams)]}
        session = MergeSession(config, "cpu", progress=False)
        assert not differing(session.state_dict(), engine_tensors(config, tmp_path / f"{method}a", folder_tensors))
        other = {**config, "parameters": {**params, "lambda": 2.0} if params else {"fallback_weight": 1.0}}
        session.merge(other)
        assert not differing(session.state_dict(), engine_tensors(other, tmp_path / f"{method}b", folder_tensors))


def test_merging_again_recomputes_only_the_tensors_whose_parameters_changed(model_sets):
    base, *experts = model_sets("llama")
    config = {"merge_method": "ties", "base_model": base, "dtype": "float32", "parameters": {"normalize": True},
              "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]}
    session = MergeSession(config, "cpu", progress=False)
    merged = [j.out_name for j in session.plan.jobs if not j.copy_only]
    assert session.merge(config).tensors == 0
    one_model = copy.deepcopy(config)
    one_model["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    step = session.merge(one_model)
    assert step.tensors == sum("mlp" in n for n in merged) > 0
    assert step.bytes_read == sum(j.bytes_in for j in session.plan.jobs if "mlp" in j.out_name)
    shared = {**one_model, "parameters": {"normalize": False}}
    assert session.merge(shared).tensors == len(merged)
    assert session.merge(shared).tensors == 0


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_a_merge_that_fails_part_way_is_merged_again_whole(model_sets, failure, monkeypatch, tmp_path):
    """The tensor being written when a merge failed (Ctrl-C arrives right after a C++ op has written it) is not
    taken for the old config's: merging back, or saving, gives the old config's merge bit for bit."""
    base, *experts = model_sets("llama")
    config = {"merge_method": "ties", "base_model": base, "dtype": "float32",
              "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]}
    session = MergeSession(config, "cpu", progress=False)
    fresh = {k: v.clone() for k, v in session.state_dict().items()}
    other = shifted(config)
    merge_one, calls = MergeSession._merge_one, []

    def fails_after_writing_the_third(self, i, job, cfg):
        merge_one(self, i, job, cfg)
        calls.append(job.out_name)
        if len(calls) == 3:
            raise failure()
    monkeypatch.setattr(MergeSession, "_merge_one", fails_after_writing_the_third)
    with pytest.raises(failure):
        session.merge(other)
    monkeypatch.setattr(MergeSession, "_merge_one", merge_one)
    assert differing(session.state_dict(), fresh) == calls  # written in place, and known to be
    assert session.merge().tensors == len(calls)  # the config is still the old one: those three go back
    assert not differing(session.state_dict(), fresh)
    session.changed_outside([calls[0]])
    session.state_dict()[calls[0]].add_(1)
    saved = session.save(str(tmp_path / "saved"))  # merges the changed tensor back first
    merge(parse_config(config), str(tmp_path / "engine"), MergeOptions(device="cpu", quiet=True))
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == (tmp_path / "engine" / "model.safetensors").read_bytes()
    assert saved == str(tmp_path / "saved")


def test_merges_from_several_threads_run_one_at_a_time(model_sets, folder_tensors, tmp_path):
    import threading
    base, *experts = model_sets("llama")
    config = {"merge_method": "ties", "base_model": base, "dtype": "float32",
              "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]}
    session = MergeSession(config, "cpu", progress=False)
    configs = [shifted(config), shifted(shifted(config))]
    threads = [threading.Thread(target=session.merge, args=(c,)) for c in configs * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = next(c for c in configs if session.config.raw == c)  # whichever ran last, whole
    assert not differing(session.state_dict(), engine_tensors(last, tmp_path / "last", folder_tensors))


def test_parameters_that_would_divide_by_zero_are_refused_before_merging(model_sets):
    base, *experts = model_sets("llama")
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts[:2]]}
    session = MergeSession(config, "cpu", progress=False)
    before = {k: v.clone() for k, v in session.state_dict().items()}
    cancelling = copy.deepcopy(config)
    cancelling["models"][1]["parameters"]["weight"] = -1.0
    with pytest.raises(ConfigError, match=r"the weights \[1.0, -1.0\] sum to 0 and normalize: true"):
        session.merge(cancelling)
    assert not differing(session.state_dict(), before)
    assert session.merge({**cancelling, "parameters": {"normalize": False}}).tensors > 0


def test_live_model_runs_like_the_saved_merge(model_sets, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, *experts = model_sets("llama")
    config = {"merge_method": "dare_ties", "base_model": base, "dtype": "float32",
              "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.6}} for e in experts]}
    session = MergeSession(config, "cpu", progress=False)
    saved = session.save(str(tmp_path / "saved"))
    merge(parse_config(config), str(tmp_path / "engine"), MergeOptions(device="cpu", quiet=True))
    for f in ("model.safetensors", "config.json", "mergekit_config.yml"):  # the same files, byte for byte
        assert (tmp_path / "saved" / f).read_bytes() == (tmp_path / "engine" / f).read_bytes(), f
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        assert torch.equal(session.model(tokens).logits, loaded(tokens).logits)


def test_config_and_output_paths_may_be_path_objects(model_sets, folder_tensors, write_yaml, tmp_path):
    """As `merge()` takes them: a YAML path as a pathlib.Path (it was taken for a config mapping), and an output
    folder as one (save() failed in a regular expression)."""
    base, *experts = model_sets("llama")
    config = {"merge_method": "linear", "dtype": "float32", "models": [{"model": e, "parameters": {"weight": 0.5}}
                                                                        for e in experts]}
    path = pathlib.Path(write_yaml(config))
    session = MergeSession(path, "cpu", progress=False)
    assert session.merge(path).tensors == 0
    session.save(tmp_path / "saved")
    assert not differing(folder_tensors(tmp_path / "saved"), engine_tensors(config, tmp_path / "engine", folder_tensors))


def test_the_session_keeps_its_own_copy_of_a_config_mapping(model_sets, folder_tensors, tmp_path):
    """A config dict edited in place after the session opened (as one edits it between merges) was the session's own:
    another model was taken for the same one, and save() merged and named values no merge() was given."""
    base, *experts = model_sets("llama")
    config = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
              "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts[:2]]}
    opened = copy.deepcopy(config)
    session = MergeSession(config, "cpu", progress=False)
    config["models"][0]["parameters"]["weight"] = 0.9
    session.save(str(tmp_path / "saved"))  # the merge of the config the session was given
    assert not differing(folder_tensors(tmp_path / "saved"), engine_tensors(opened, tmp_path / "a", folder_tensors))
    assert "0.9" not in (tmp_path / "saved" / "mergekit_config.yml").read_text()
    config["models"][1]["model"] = experts[2]
    with pytest.raises(ConfigError, match="differ from its own only in parameters"):
        session.merge(config)


def test_tied_embeddings_model(model_sets, folder_tensors, tmp_path):
    base, *experts = model_sets("qwen2")  # tie_word_embeddings: the output has no lm_head
    config = {"merge_method": "linear", "dtype": "float32", "models": [{"model": e, "parameters": {"weight": 1.0}}
                                                                        for e in experts]}
    session = MergeSession(config, "cpu", progress=False)
    assert not differing(session.state_dict(), engine_tensors(config, tmp_path / "a", folder_tensors))
    assert session.model.lm_head.weight.data_ptr() == session.model.model.embed_tokens.weight.data_ptr()


def test_pickled_inputs_with_tied_heads_equal_the_engine(model_sets, folder_tensors, tmp_path):
    """pytorch_model.bin inputs whose state dicts store the tied head as a second name of the embedding."""
    tie = ("lm_head.weight", "model.embed_tokens.weight")
    base, *experts = [pickled_copy(m, tmp_path / f"m{i}", shards=1 + i % 2, tie=tie)
                      for i, m in enumerate(model_sets("qwen2"))]
    config = {"merge_method": "ties", "base_model": base, "dtype": "float32", "models": [
        {"model": e, "parameters": {"weight": 0.5, "density": 0.6}} for e in experts]}
    session = MergeSession(config, "cpu", progress=False)
    assert not differing(session.state_dict(), engine_tensors(config, tmp_path / "a", folder_tensors))


def test_a_filter_on_the_head_matches_it_for_an_input_whose_tied_embeddings_stand_in(model_sets, folder_tensors,
                                                                                      tmp_path):
    # outside the layers a filter matches the output's name (lm_head), not the tied input's (its embeddings), as the
    # engine resolves it: opened on a config, and merged again into it from another
    from tests.test_parity_mergekit import tied_copy
    base, expert = model_sets("llama")[:2]
    tied = tied_copy(base, str(tmp_path / "tied"))

    def config(head: float) -> dict:
        return {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": tied, "parameters": {"weight": [{"filter": "lm_head", "value": head}, {"value": 0.5}]}},
            {"model": expert, "parameters": {"weight": 0.5}}]}
    session = MergeSession(config(0.2), "cpu", progress=False)
    assert not differing(session.state_dict(), engine_tensors(config(0.2), tmp_path / "a", folder_tensors))
    session.merge(config(0.9))
    assert not differing(session.state_dict(), engine_tensors(config(0.9), tmp_path / "b", folder_tensors))


def test_configs_with_other_models_are_refused(model_sets):
    base, *experts = model_sets("llama")
    config = {"merge_method": "linear", "dtype": "float32", "models": [{"model": e, "parameters": {"weight": 1.0}}
                                                                        for e in experts]}
    session = MergeSession(config, "cpu", progress=False)
    for other in ({**config, "models": config["models"][:2]}, {**config, "merge_method": "task_arithmetic",
                                                               "base_model": base}, {**config, "dtype": "bfloat16"}):
        with pytest.raises(ConfigError, match="only in parameters"):
            session.merge(other)


def test_memory_plan_refuses_what_cannot_fit_and_names_what_would(model_sets):
    base, *experts = model_sets("llama")
    plan = build_plan(parse_config({"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}}
                                                                        for e in experts]}))
    inputs = sum(j.bytes_in for j in plan.jobs)
    cuda = torch.device("cuda")
    roomy = plan_memory(plan, cuda, free={"cuda": 10 * inputs, "host": 10 * inputs})
    assert roomy.placement == "device" and roomy.input_bytes == inputs
    small_gpu = {"cuda": roomy.model_bytes + roomy.work_bytes, "host": 10 * inputs}  # the model fits, not the inputs
    tight = plan_memory(plan, cuda, free=small_gpu)
    assert tight.placement == "host" and tight.needs() == {"cuda": small_gpu["cuda"], "host": inputs}
    with pytest.raises(MemoryPlanError, match="placement='host' would fit"):
        plan_memory(plan, cuda, "device", free=small_gpu)
    with pytest.raises(MemoryPlanError, match=r"needs [\d.]+ GB host.*merge to disk"):
        plan_memory(plan, torch.device("cpu"), free={"host": inputs // 2})
    with pytest.raises(MemoryPlanError, match="placement='host' holds the inputs in host memory beside a GPU's"):
        plan_memory(plan, torch.device("cpu"), "host", free={"host": 10 * inputs})



def test_a_gpu_too_small_for_the_live_model_names_the_cpu_when_host_memory_holds_the_session(model_sets):
    base, *experts = model_sets("llama")
    plan = build_plan(parse_config({"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}}
                                                                        for e in experts]}))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    roomy = plan_memory(plan, cuda, free={"cuda": 10**12, "host": 10**12})
    small_gpu = {"cuda": roomy.model_bytes // 2, "host": plan_memory(plan, cpu, free={"host": 10**12}).needs()["host"]}
    with pytest.raises(MemoryPlanError, match="device='cpu' would fit"):
        plan_memory(plan, cuda, free=small_gpu)
    assert plan_memory(plan, cpu, free={"host": small_gpu["host"]})  # what it names fits
    with pytest.raises(MemoryPlanError, match="merge to disk"):  # and where the host cannot hold it either
        plan_memory(plan, cuda, free={**small_gpu, "host": small_gpu["host"] - 1})

def test_the_memory_plan_keeps_room_for_evaluating_the_live_model(model_sets):
    base, *experts = model_sets("llama")
    plan = build_plan(parse_config({"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}}
                                                                        for e in experts]}))
    inputs = sum(j.bytes_in for j in plan.jobs)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain = plan_memory(plan, cuda, free={"cuda": 10 * inputs, "host": 10 * inputs})
    model, work = plain.model_bytes, plain.work_bytes
    # evaluation memory is taken where the live model is: on the GPU, or in host memory for a CPU session; a trial
    # merges, then evaluates, so the larger of the merge's and the evaluation's work space counts
    for evaluation in (work // 2, 3 * work):
        assert plan_memory(plan, cuda, free={"cuda": 10 * inputs, "host": 10 * inputs},
                           evaluation=evaluation).needs() == {"cuda": inputs + model + max(work, evaluation), "host": 0}
        assert plan_memory(plan, cpu, free={"host": 10 * inputs}, evaluation=evaluation).needs() == {
            "host": inputs + model + max(work, evaluation)}
    evaluation = inputs + work
    # room for the inputs beside the model, not for the evaluation too: the inputs go to host memory
    gpu = {"cuda": plain.needs()["cuda"], "host": 10 * inputs}
    assert plan_memory(plan, cuda, free=gpu).placement == "device"
    moved = plan_memory(plan, cuda, free=gpu, evaluation=evaluation)
    assert moved.placement == "host" and "evaluation" in moved.summary()
    # no room for the evaluation anywhere: refused, saying a smaller evaluation batch would fit
    small_gpu = {"cuda": plain.model_bytes + plain.work_bytes, "host": 10 * inputs}
    with pytest.raises(MemoryPlanError, match=r"evaluation [\d.]+ GB.*a smaller evaluation batch_size would fit"):
        plan_memory(plan, cuda, free=small_gpu, evaluation=evaluation)


def test_a_session_that_cannot_fit_reads_nothing(model_sets, monkeypatch):
    base, *experts = model_sets("llama")
    import merge_engine.session as session_module
    monkeypatch.setattr(session_module, "free_memory", lambda device: 1000)
    read = []
    monkeypatch.setattr(session_module.MergeSession, "_read_inputs", lambda self, progress: read.append(1))
    with pytest.raises(MemoryPlanError, match="does not fit"):
        MergeSession({"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}}
                                                            for e in experts]}, "cpu", progress=False)
    assert not read


def test_a_bad_seed_or_lora_dtype_is_refused_before_anything_is_read(model_sets, monkeypatch):
    base, *experts = model_sets("llama")
    config = {"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts[:2]]}
    monkeypatch.setattr(MergeSession, "_read_inputs", lambda *a: pytest.fail("read"))
    for kwargs, message in [(dict(random_seed=2**70), "random_seed must be an integer"),
                            (dict(random_seed=1.5), "random_seed must be an integer"),
                            (dict(lora_merge_dtype="bf16"), "lora_merge_dtype must be one of")]:
        with pytest.raises(MergeEngineError, match=message):
            MergeSession(config, "cpu", progress=False, **kwargs)


def test_a_model_without_config_json_is_refused_before_reading(model_sets, tmp_path):
    import shutil
    base, *experts = model_sets("llama")
    bare = tmp_path / "bare"
    shutil.copytree(experts[0], bare)
    for m in experts[:1]:
        os.remove(bare / "config.json")
    with pytest.raises(MergeEngineError):
        MergeSession({"merge_method": "linear", "models": [{"model": str(bare), "parameters": {"weight": 1.0}},
                                                           {"model": experts[1], "parameters": {"weight": 1.0}}]},
                     "cpu", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("placement", ["device", "host"])
def test_a_gpu_session_equals_the_gpu_engine(placement, model_sets, folder_tensors, tmp_path):
    base, *experts = model_sets("llama_bf16_sharded")
    config = {"merge_method": "dare_ties", "base_model": base,
              "models": [{"model": e, "parameters": {"weight": 0.5, "density": GRADIENT}} for e in experts]}
    session = MergeSession(config, "cuda", placement=placement, progress=False)
    assert session.memory.placement == placement
    merge(parse_config(config), str(tmp_path / "a"), MergeOptions(device="cuda", quiet=True, copy_tokenizer=False))
    ref = folder_tensors(tmp_path / "a")
    assert not differing({n: t.cpu() for n, t in session.state_dict().items()}, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_session_with_factored_lora_experts_equals_the_gpu_engine(model_sets, folder_tensors, tmp_path):
    base = model_sets("llama_bf16_sharded")[0]
    config = lora_experts_config(base, tmp_path)
    session = MergeSession(config, "cuda", placement="device", lora="factored", progress=False)
    merge(parse_config(config), str(tmp_path / "a"), MergeOptions(device="cuda", quiet=True, copy_tokenizer=False))
    assert not differing({n: t.cpu() for n, t in session.state_dict().items()}, folder_tensors(tmp_path / "a"))


def test_an_input_holding_nan_is_refused_when_the_session_opens(tmp_path):
    """As the command refuses a merge that NaN reaches; Inf (a mask buffer, say) is held as it is."""
    from merge_engine.demo import make_synthetic_llama
    from merge_engine.io.checkpoint import Checkpoint
    shape = dict(layers=1, hidden=16, intermediate=32, vocab=32)
    base = make_synthetic_llama(str(tmp_path / "base"), seed=0, **shape)
    expert = make_synthetic_llama(str(tmp_path / "expert"), seed=1, base=base, **shape)
    config = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (base, expert)]}
    info = Checkpoint(expert).tensors["model.layers.0.mlp.up_proj.weight"]
    for value, refused in ((b"\x80\x7f", False), (b"\xc0\x7f", True)):  # bf16 +Inf, then NaN
        with open(info.file, "r+b") as f:
            f.seek(info.data_start)
            f.write(value * 3)
        if not refused:
            live = MergeSession(config, "cpu", progress=False).state_dict()["model.layers.0.mlp.up_proj.weight"]
            assert int(torch.isinf(live).sum()) == 3
            continue
        with pytest.raises(MergeEngineError, match=f"{expert}: tensor 'model.layers.0.mlp.up_proj.weight' has 3 NaN"):
            MergeSession(config, "cpu", progress=False)


def test_slices_from_models_of_other_vocabulary_sizes_are_refused_naming_why(tmp_path, folder_tensors):
    """A passthrough takes the embeddings from its first slice's model and the head from its last's: of 256 and
    264 rows, which the output's config.json (256) does not fit. `merge-engine` writes it, as mergekit does, but
    from_pretrained cannot load it, and the live model is that model; a tokenizer setting aligns the rows."""
    from tests.vocab_models import make_vocab_models
    vocab = make_vocab_models(str(tmp_path / "models"))
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": vocab["base"], "layer_range": [0, 1]}]},
                         {"sources": [{"model": vocab["padded"], "layer_range": [1, 4]}]}]}
    merge(parse_config(config), str(tmp_path / "out"), MergeOptions(device="cpu", quiet=True))
    with pytest.raises(MergeEngineError, match=rf"'lm_head.weight': the merge gives torch.float32 \[264, 64\] \(from "
                                               rf"{vocab['padded']}\), LlamaForCausalLM has torch.float32 \[256, 64\].*"
                                               rf"built from the output's config.json \(from {vocab['base']}\), which "
                                               r"these tensors do not fit: transformers cannot load the output"):
        MergeSession(config, "cpu", progress=False)
    aligned = {**config, "tokenizer": {"source": "base"}}
    merge(parse_config(aligned), str(tmp_path / "aligned"), MergeOptions(device="cpu", quiet=True))
    live = MergeSession(aligned, "cpu", progress=False).state_dict()
    assert not differing({n: t.cpu() for n, t in live.items()}, folder_tensors(tmp_path / "aligned"))


def test_the_work_space_counts_a_compute_dtype_wider_than_the_inputs(model_sets):
    # bf16 inputs merged in fp32 (dtype: float32) and written as bf16: the fp32 copies of every input, one more
    # for the method's intermediates, and the result in both dtypes, beside the inputs as stored
    from merge_engine.session import work_bytes
    base, *experts = model_sets("llama_bf16_sharded")
    narrow = build_plan(parse_config({"merge_method": "ties", "dtype": "bfloat16",
                                      **models(base, experts, [{"weight": 0.5, "density": 0.5}] * 3)}))
    wide = build_plan(parse_config({"merge_method": "ties", "dtype": "float32", "out_dtype": "bfloat16",
                                    **models(base, experts, [{"weight": 0.5, "density": 0.5}] * 3)}))
    for a, b in zip(narrow.jobs, wide.jobs, strict=True):
        elements = sum(ckpt.tensors[name].numel for ckpt, name in a.inputs)
        out = math.prod(a.shape)
        assert work_bytes(a) == a.bytes_in + 2 * elements + 2 * out
        assert work_bytes(b) == b.bytes_in + 8 * elements + 6 * out


def test_mixtral_session_holds_the_engine_fused_experts(folder_tensors, tmp_path):
    # transformers 5's Mixtral holds each layer's experts fused: the session merges into them, as the engine writes
    pytest.importorskip("transformers")
    from tests.arch_models import make_architecture
    base, *experts = make_architecture(str(tmp_path / "models"), "mixtral")
    config = {"merge_method": "slerp", "base_model": base, "dtype": "float32", "parameters": {"t": [0.0, 0.3, 1.0]},
              "models": [{"model": base}, {"model": experts[0]}]}
    session = MergeSession(config, "cpu", progress=False)
    ref = engine_tensors(config, tmp_path / "out", folder_tensors)
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in ref)
    assert not differing(session.state_dict(), ref)


def loaded_state(folder) -> dict[str, torch.Tensor]:
    """The model transformers loads from a folder (its class from config.json): parameters and buffers."""
    import json
    transformers = pytest.importorskip("transformers")
    arch = json.loads(open(os.path.join(folder, "config.json")).read())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(str(folder)).state_dict()


def test_an_output_of_several_dtypes_is_held_as_written_and_loaded(model_sets, folder_tensors, tmp_path):
    # inputs storing fp16 embeddings and fp32 norms beside bf16: the output keeps each tensor's dtype, config.json
    # says bfloat16; state_dict() holds the written tensors, the live model them cast, as from_pretrained loads them
    from tests.test_parity_mergekit import mixed_dtype_copy
    experts = [mixed_dtype_copy(e, str(tmp_path / f"mixed{i}")) for i, e in enumerate(model_sets("llama")[1:3])]

    def config(weight: float) -> dict:
        return {"merge_method": "linear", "models": [{"model": experts[0], "parameters": {"weight": weight}},
                                                     {"model": experts[1], "parameters": {"weight": 0.5}}]}
    session = MergeSession(config(0.3), "cpu", progress=False)
    ref = engine_tensors(config(0.3), tmp_path / "a", folder_tensors)
    assert {t.dtype for t in ref.values()} == {torch.float16, torch.float32, torch.bfloat16}
    assert not differing(session.state_dict(), ref)
    assert not differing(session.model.state_dict(), loaded_state(tmp_path / "a"))
    session.merge(config(0.8))
    assert not differing(session.state_dict(), engine_tensors(config(0.8), tmp_path / "b", folder_tensors))
    assert not differing(session.model.state_dict(), loaded_state(tmp_path / "b"))


@pytest.mark.parametrize("maker", ["make_qwen2_vl", "make_mistral3"])
def test_checkpoint_names_that_transformers_renames_when_loading(maker, folder_tensors, tmp_path):
    """transformers 5 loads Qwen2-VL's model.layers as model.language_model.layers and Mistral 3's
    language_model.model as model.language_model (its conversion mapping), and saves them back under the
    checkpoint's names: the live model holds each output tensor where loading the engine's output puts it."""
    from tests import stacked_models
    base, e1, e2 = getattr(stacked_models, maker)(str(tmp_path / "models"))
    config = {"merge_method": "ties", "base_model": base, "dtype": "float32", "models": [
        {"model": e1, "parameters": {"weight": 0.6, "density": 0.5}}, {"model": e2, "parameters": {"weight": 0.4}}]}
    session = MergeSession(config, "cpu", progress=False)
    assert not differing(session.state_dict(), engine_tensors(config, tmp_path / "a", folder_tensors))
    assert not differing(session.model.state_dict(), loaded_state(tmp_path / "a"))
    session.save(str(tmp_path / "saved"), MergeOptions(quiet=True, copy_tokenizer=False))
    assert not differing(folder_tensors(tmp_path / "saved"), folder_tensors(tmp_path / "a"))


def test_a_config_json_with_infinite_floats(folder_tensors, tmp_path):
    """transformers 5 writes GraniteMoeHybrid's time_step_limit (0, inf) as [0.0, {"__float__": "Infinity"}]: the
    live model's config reads it as loading the output does."""
    from tests.arch_models import make_architecture
    base, e1, e2 = make_architecture(str(tmp_path / "models"), "granitemoehybrid")
    assert "__float__" in open(os.path.join(base, "config.json")).read()
    config = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
              "models": [{"model": e, "parameters": {"weight": 0.5}} for e in (e1, e2)]}
    session = MergeSession(config, "cpu", progress=False)
    assert tuple(session.model.config.time_step_limit) == (0.0, math.inf)
    assert not differing(session.state_dict(), engine_tensors(config, tmp_path / "a", folder_tensors))
    assert not differing(session.model.state_dict(), loaded_state(tmp_path / "a"))


def test_a_config_transformers_cannot_build_is_refused_naming_the_command(model_sets, tmp_path):
    import json
    import shutil
    base, *experts = model_sets("llama")
    donor = tmp_path / "donor"
    shutil.copytree(experts[0], donor)
    settings = json.loads((donor / "config.json").read_text())
    (donor / "config.json").write_text(json.dumps({**settings, "num_attention_heads": "four"}))
    config = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(donor), "parameters": {"weight": 1.0}}, {"model": experts[1], "parameters": {"weight": 1.0}}]}
    with pytest.raises(MergeEngineError, match=r"(?s)cannot build the output's config .*num_attention_heads.*"
                                               r"`merge-engine CONFIG OUT` writes the merge"):
        MergeSession(config, "cpu", progress=False)


def test_modules_transformers_keeps_in_float32_are_held_so(folder_tensors, tmp_path):
    """T5 keeps its feed-forward output (wo) in float32 in a float16 model (_keep_in_fp32_modules), as loading the
    output does: the live model computes as the loaded output, and save() writes the float16 merge."""
    transformers = pytest.importorskip("transformers")
    from tests.stacked_models import make_t5
    base, e1, e2 = make_t5(str(tmp_path / "models"))
    config = {"merge_method": "ties", "base_model": base, "dtype": "float16", "models": [
        {"model": e1, "parameters": {"weight": 0.6, "density": 0.5}}, {"model": e2, "parameters": {"weight": 0.4}}]}
    session = MergeSession(config, "cpu", progress=False)
    engine = engine_tensors(config, tmp_path / "a", folder_tensors)
    live = session.state_dict()
    kept = [n for n, t in live.items() if t.dtype == torch.float32]
    assert kept and all(".wo." in n for n in kept)
    assert session.memory.model_bytes == sum(t.nbytes for t in session._targets.values())  # wo planned in float32
    assert not differing({n: t.to(engine[n].dtype) for n, t in live.items()}, engine)
    assert not differing(session.model.state_dict(), loaded_state(tmp_path / "a"))
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "a")).eval()
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(session.model(input_ids=tokens, decoder_input_ids=tokens).logits,
                           loaded(input_ids=tokens, decoder_input_ids=tokens).logits)
    other = shifted(config)
    session.merge(other)
    session.save(str(tmp_path / "saved"), MergeOptions(quiet=True, copy_tokenizer=False))
    assert not differing(folder_tensors(tmp_path / "saved"), engine_tensors(other, tmp_path / "b", folder_tensors))


def test_lora_experts_of_a_moe_model_hold_their_base_once(tmp_path):
    # a MoE LoRA expert's tensors its adapter leaves as they are (fused or not) are its base's, held once
    from tests.io.test_experts import mixtral_tensors, write_model
    from tests.lora_adapters import write_adapter
    base = write_model(tmp_path / "m", mixtral_tensors())
    write_adapter(str(tmp_path / "a"), base, targets=("w1",))
    plan = build_plan(parse_config({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": base, "parameters": {"weight": 0.5}},
        {"model": f"{base}+{tmp_path / 'a'}", "parameters": {"weight": 0.5}}]}))
    base_ckpt = plan.models[base]
    folder = sum(info.nbytes for info in base_ckpt.tensors.values())
    changed = sum(info.nbytes for name, info in base_ckpt.tensors.items() if name.endswith("experts.gate_up_proj"))
    applied = plan_memory(plan, torch.device("cpu"), free={"host": 100 * folder})
    assert applied.input_bytes == folder + changed  # the base's tensors once, a copy of each changed (w1's) one


def test_lora_scratch_of_a_moe_lora_expert_is_planned(tmp_path):
    # its updates are applied expert by expert in the adapter's fp32 scratch (product and widened weight)
    from merge_engine.session import lora_scratch_bytes
    from tests.io.test_experts import HIDDEN, INNER, mixtral_tensors, write_model
    from tests.lora_adapters import write_adapter
    base = write_model(tmp_path / "m", {n: t.bfloat16() for n, t in mixtral_tensors().items()})
    write_adapter(str(tmp_path / "a"), base, targets=("w1",))
    plan = build_plan(parse_config({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": base, "parameters": {"weight": 0.5}},
        {"model": f"{base}+{tmp_path / 'a'}", "parameters": {"weight": 0.5}}]}))
    assert lora_scratch_bytes(plan.jobs, factored=False) == 2 * INNER * HIDDEN * 4


def test_an_input_rewritten_while_the_session_reads_it_is_named(model_sets, tmp_path, monkeypatch):
    # before, the session held tensors of the file's two versions, merged them and saved them without a word
    import shutil

    from merge_engine.errors import CheckpointError
    from merge_engine.io.checkpoint import Checkpoint
    from tests.conftest import rewrite_in_place
    base, expert = (shutil.copytree(m, tmp_path / name) for m, name in zip(model_sets("llama"), ["base", "expert"]))
    shard = next(p for p in sorted(os.listdir(expert)) if p.endswith(".safetensors"))
    read_pooled, rewritten = Checkpoint.read_pooled, []

    def read_then_rewrite(self, *args, **kwargs):
        tensor = read_pooled(self, *args, **kwargs)
        if self.path == str(expert) and not rewritten:
            rewrite_in_place(expert / shard)
            rewritten.append(True)
        return tensor
    monkeypatch.setattr(Checkpoint, "read_pooled", read_then_rewrite)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                         {"model": str(expert), "parameters": {"weight": 0.5}}]}
    with pytest.raises(CheckpointError, match=f"{shard}: the file changed while it was being read"):
        MergeSession(config, "cpu", progress=False)


def test_save_checks_its_options_as_merge_does(model_sets, folder_tensors, tmp_path):
    base, *experts = model_sets("llama")
    config = {"merge_method": "linear", "dtype": "float32", "models": [{"model": e, "parameters": {"weight": 0.5}}
                                                                        for e in experts]}
    session = MergeSession(config, "cpu", progress=False)
    for field, value, message in [("out_shard_size", -5, "out_shard_size must be a number of bytes"),
                                  ("out_shard_size", "1B", "out_shard_size must be a number of bytes"),
                                  ("direct_io", "bogus", "direct_io must be one of auto, on, off"),
                                  ("overwrite", "no", "overwrite must be True or False")]:
        with pytest.raises(MergeEngineError, match=message):
            session.save(tmp_path / "refused", MergeOptions(quiet=True, **{field: value}))
    assert not (tmp_path / "refused").exists()
    with pytest.raises(TypeError, match="options must be a MergeOptions, got a dict"):
        session.save(tmp_path / "refused", {})
    session.save(tmp_path / "saved", MergeOptions(quiet=True, out_shard_size=2e9))  # an integral float, as merge()
    assert not differing(folder_tensors(tmp_path / "saved"), engine_tensors(config, tmp_path / "engine", folder_tensors))


@pytest.mark.parametrize("argument, value, message", [
    ("allow_crimes", "x", "allow_crimes must be True or False, got 'x'"),
    ("progress", None, "progress must be True or False, got None"),
    ("evaluation_bytes", -1, r"evaluation_bytes must be a number of bytes \(0 or more\), got -1"),
    ("evaluation_bytes", "1G", "evaluation_bytes must be a number of bytes"),
])
def test_session_arguments_are_refused_by_name_before_anything_is_read(model_sets, monkeypatch, argument, value,
                                                                       message):
    base, *experts = model_sets("llama")
    config = {"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts]}
    monkeypatch.setattr("merge_engine.session.build_plan", lambda *a, **k: pytest.fail("read the inputs"))
    with pytest.raises(MergeEngineError, match=message):
        MergeSession(config, "cpu", **{argument: value})


def test_what_configs_must_share_drops_parameters_only_where_the_schema_has_them():
    """session.merge takes configs that differ only in parameters: the top level's, each model's, each slice's
    and each source's. A token named "parameters" in tokenizer.tokens is a token, whose source must not change."""
    def config(p, source):
        return {"merge_method": "ties", "parameters": {"normalize": p}, "models": [{"model": "a", "parameters": {"w": p}}],
                "slices": [{"parameters": {"w": p}, "sources": [{"model": "a", "layer_range": [0, 2],
                                                                   "parameters": {"w": p}}]}],
                "tokenizer": {"source": "union", "tokens": {"parameters": {"source": source}}}}
    assert without_parameters(config(1, "a")) == without_parameters(config(2, "a"))
    assert without_parameters(config(1, "a")) != without_parameters(config(1, "b"))



def test_a_session_keeps_no_input_file_open(model_sets, tmp_path):
    """Every input is held once read, so none of their files stays open for the session's life (a deleted input's
    space would not be freed until the session ended)."""
    from tests.lora_adapters import write_adapter
    base, e1, e2, _ = model_sets("llama")
    write_adapter(str(tmp_path / "a1"), e1, seed=1)
    config = {"merge_method": "ties", "base_model": base, "dtype": "float32", "models": [
        {"model": f"{e1}+{tmp_path / 'a1'}", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": e2, "parameters": {"weight": 0.4, "density": 0.7}}]}
    folders = tuple(os.path.realpath(p) for p in (base, e1, e2, tmp_path / "a1"))

    def open_inputs() -> list[str]:
        fds = [os.path.join("/proc/self/fd", fd) for fd in os.listdir("/proc/self/fd")]
        return [t for t in (os.path.realpath(fd) for fd in fds if os.path.islink(fd)) if t.startswith(folders)]
    for lora in ("applied", "factored"):
        session = MergeSession(config, "cpu", lora=lora, progress=False)
        assert open_inputs() == [], lora
        session.merge()
        assert open_inputs() == [], lora


def test_sessions_opened_at_once_in_two_threads_leave_torch_as_it_was(model_sets, monkeypatch):
    # before, the two threads built their live models at once: transformers sets torch's default dtype to the model's
    # and replaces torch.nn.init's functions by no-ops for the time it builds one, then puts back what it found, so the
    # thread that entered second put back what the first had set: a bfloat16 default dtype and no weight
    # initialisation, for the rest of the process
    import merge_engine.session as session_module
    base, *experts = model_sets("llama")
    config = {"merge_method": "task_arithmetic", "dtype": "bfloat16", **models(base, experts, [{"weight": 0.5}] * 3)}
    real_no_init, real_init = session_module._no_init_weights, torch.nn.init.kaiming_uniform_
    both_inside, first_out, count = threading.Barrier(2), threading.Event(), threading.Lock()
    entered, inside, most = [0], [0], [0]

    @contextlib.contextmanager
    def overlapping(transformers):
        """transformers' no_init_weights, each thread waiting (a while) for the other to enter, the first out first."""
        with real_no_init(transformers):
            with count:
                order, entered[0], inside[0] = entered[0], entered[0] + 1, inside[0] + 1
                most[0] = max(most[0], inside[0])
            with contextlib.suppress(threading.BrokenBarrierError):
                both_inside.wait(timeout=2)
            if order:
                first_out.wait(timeout=2)
            yield
            with count:
                inside[0] -= 1
        first_out.set()
    monkeypatch.setattr(session_module, "_no_init_weights", overlapping)
    with torch_modules_restored(), concurrent.futures.ThreadPoolExecutor(2) as pool:
        sessions = list(pool.map(lambda _: MergeSession(config, device="cpu", progress=False), range(2)))
        assert torch.get_default_dtype() == torch.float32 and torch.nn.init.kaiming_uniform_ is real_init
    assert most[0] == 1  # one model built at a time
    assert not differing(sessions[0].state_dict(), sessions[1].state_dict())


@contextlib.contextmanager
def torch_modules_restored():
    """torch's default dtype, the functions of torch.nn's modules and transformers' init_weights put back as they were
    after the block (a failing test must not leave the rest of the run without weight initialisation)."""
    from transformers.modeling_utils import PreTrainedModel
    modules = {name: dict(vars(module)) for name, module in list(sys.modules.items()) if name.startswith("torch.nn")}
    init_weights = PreTrainedModel.init_weights
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)
        for name, attributes in modules.items():
            vars(sys.modules[name]).update(attributes)
        PreTrainedModel.init_weights = init_weights
