"""Benchmark: seconds per trial of a merge search, in memory (MergeSession) against the disk round trips users
do today, on the ~1.1B-parameter bf16 benchmark models (base + three experts, bench_merge.py's) with a small
multiple-choice validation file.

Each approach runs the same TIES trials (per-expert weights and densities changed every trial, so every
tensor is merged again) and scores the merge with the same evaluator (merge_engine.evaluation.MultipleChoice):
    (a) session      MergeSession opened once (every input read once); per trial session.merge + evaluate
    (b) round trip   `merge-engine` API to disk + AutoModelForCausalLM.from_pretrained + evaluate
    (c) mergekit     mergekit-yaml to disk (a subprocess) + from_pretrained + evaluate
Measured in the same run: the machine's memory read bandwidth (a streaming reduction over 2 GiB) and copy
bandwidth; the floor of a session trial's merge is reading the changed tensors' inputs once from memory at that
read bandwidth. Then a real `merge_engine.search` within --budget seconds counts the trials it completes; for
(b) and (c), budget / seconds per trial is their projection (marked as such). Then the memory plan of an 8B
search on a 48 GB GPU, from the plan of sparse 8B-shaped checkpoints (headers only; nothing is read).

    python bench/bench_search.py                      # 1.1B models, 3 trials each, a 300 s search
    python bench/bench_search.py --small --trials 2 --budget 120 --skip-mergekit
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (the engine's process settings, before torch allocates)
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from bench_merge import MERGEKIT, SHAPE, SMALL, generate_models_apart, write_lora  # noqa: E402

from merge_engine import MergeOptions, merge, parse_config  # noqa: E402
from merge_engine.demo import save_word_tokenizer, write_questions  # noqa: E402
from merge_engine.evaluation import MultipleChoice  # noqa: E402
from merge_engine.evaluation.memory import scoring_bytes  # noqa: E402
from merge_engine.extras import MissingExtraError, require  # noqa: E402
from merge_engine.search import SearchOptions, search  # noqa: E402
from merge_engine.session import MemoryPlanError, MergeSession, live_model, plan_memory  # noqa: E402

GB = 1e9


def trial_configs(paths: list[str], n: int) -> list[dict]:
    rng = random.Random(1)
    return [{"merge_method": "ties", "base_model": paths[0], "dtype": "bfloat16", "parameters": {"normalize": True},
             "models": [{"model": p, "parameters": {"weight": round(rng.uniform(0.2, 1.0), 3),
                                                    "density": round(rng.uniform(0.3, 0.9), 3)}} for p in paths[1:]]}
            for _ in range(n)]


def read_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 3) -> float:
    """GB/s of a streaming read on the device: an integer sum over nbytes (memory-bound on any CPU or GPU)."""
    x = torch.ones(nbytes // 8, dtype=torch.int64, device=device)
    return nbytes / common.best_time(x.sum, device, repeats) / GB


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def session_trials(configs, objective, device: str) -> tuple[float, list[tuple[float, float, int]]]:
    began = time.perf_counter()
    session = MergeSession(configs[0], device, progress=False)
    opened = time.perf_counter() - began
    rows = []
    for cfg in configs[1:] + configs[:1]:  # the first config last: the opening merged it already
        step = session.merge(cfg)
        rows.append((step.seconds, _timed(lambda model=session.model: objective(model)), step.bytes_read))
    return opened, rows


def disk_trials(configs, objective, out: str, mergekit: str | None, device: str) -> list[tuple[float, float, float]]:
    rows = []
    for i, cfg in enumerate(configs):
        if mergekit:
            path = os.path.join(os.path.dirname(out), f"trial{i}.yml")
            with open(path, "w") as f:
                yaml.safe_dump(cfg, f)
            shutil.rmtree(out, ignore_errors=True)
            merged = _timed(lambda: subprocess.run([mergekit, path, out, "--out-shard-size", "5B"], check=True,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        else:
            merged = _timed(lambda: merge(parse_config(cfg), out, MergeOptions(device=device, quiet=True, overwrite=True)))
        began = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device).eval()
        loaded = time.perf_counter() - began
        rows.append((merged, loaded, _timed(lambda model=model: objective(model))))
    return rows


LLAMA3_8B_LINEAR = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
                    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
                    "mlp.down_proj": (4096, 14336)}


def write_sparse_safetensors(path: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """A bf16 safetensors file with these tensors' header and no data written (a sparse file)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)


LLAMA3_8B_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32,
                    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                    "rope_theta": 500000.0, "torch_dtype": "bfloat16"}
FIVE_SHOT = "200 questions after one 600-token 5-shot block, letters A-D, batch 16"


def evaluation_memory(model) -> dict[str, int]:
    """evaluation.memory's estimate for two validation shapes on a model (built on the meta device): an MMLU-like
    5-shot multiple choice (a 600-token block of examples, a 60-200-token question, four one-token letters) and
    perplexity windows of 2048 tokens, 4 a batch."""
    rng = random.Random(0)
    shots = [rng.randrange(1000, 100000) for _ in range(600)]
    sequences, first = [], []
    for _ in range(200):
        prompt = shots + [rng.randrange(1000, 100000) for _ in range(rng.randrange(60, 200))]
        for letter in range(4):
            sequences.append(prompt + [32 + letter])
            first.append(len(prompt))
    windows = [[rng.randrange(1000, 100000) for _ in range(2048)] for _ in range(8)]
    return {FIVE_SHOT: scoring_bytes(model, sequences, first, 16),
            "perplexity, 2048-token windows, batch 4": scoring_bytes(model, windows, [1] * len(windows), 4)}


def plan_8b(root: str) -> str:
    """The memory plans of a base + 3 experts of Llama-3-8B's shapes on a 48 GB GPU, full experts and rank-16 LoRA
    experts on all seven linear weights (sparse files: headers only)."""
    shapes = {"model.embed_tokens.weight": (128256, 4096), "lm_head.weight": (128256, 4096), "model.norm.weight": (4096,)}
    for i in range(32):
        p = f"model.layers.{i}."
        shapes.update({p + m + ".weight": shape for m, shape in LLAMA3_8B_LINEAR.items()})
        shapes.update({p + "input_layernorm.weight": (4096,), p + "post_attention_layernorm.weight": (4096,)})
    paths = []
    for m in range(4):
        folder = os.path.join(root, f"sparse8b-{m}")
        os.makedirs(folder, exist_ok=True)
        write_sparse_safetensors(os.path.join(folder, "model.safetensors"), shapes)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(LLAMA3_8B_CONFIG, f)
        paths.append(folder)
    adapters = []
    for m in range(1, 4):
        folder = os.path.join(root, f"sparse8b-lora{m}")
        os.makedirs(folder, exist_ok=True)
        write_sparse_safetensors(os.path.join(folder, "adapter_model.safetensors"), {
            f"base_model.model.model.layers.{i}.{mod}.lora_{ab}.weight": (16, cols) if ab == "A" else (rows, 16)
            for i in range(32) for mod, (rows, cols) in LLAMA3_8B_LINEAR.items() for ab in "AB"})
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                       "target_modules": [m.split(".")[1] for m in LLAMA3_8B_LINEAR]}, f)
        adapters.append(f"{paths[0]}+{folder}")
    from merge_engine.plan import build_plan
    rows = []
    for what, experts, hosts in (("three full experts", paths[1:], (128, 256)),
                                 ("three rank-16 LoRA experts of the base", adapters, (32, 64, 128))):
        plan = build_plan(parse_config(trial_configs(paths[:1] + experts, 1)[0]))
        if not rows:
            evaluations = evaluation_memory(live_model(plan, torch.device("meta")))
            rows += [f"- evaluation memory ({name}): {n / GB:.2f} GB" for name, n in evaluations.items()]
        for host in hosts:
            try:
                mp = plan_memory(plan, torch.device("cuda"), free={"cuda": int(46 * GB), "host": int(host * GB)},
                                 evaluation=evaluations[FIVE_SHOT])
                rows.append(f"- {what}, {host} GB host RAM, 46 GB free on the 48 GB GPU: {mp.describe()}: {mp.summary()}")
            except MemoryPlanError as e:  # the refusal is the answer
                rows.append(f"- {what}, {host} GB host RAM, 46 GB free on the 48 GB GPU: refused: {e}")
    for p in paths + [a.split("+")[1] for a in adapters]:
        shutil.rmtree(p)
    return "\n".join(rows)


def print_trials(a, objective, read_gbps, copy_gbps, opened, session_rows, rounds, theirs) -> list[float]:
    """The table of seconds per trial; returns the seconds of a trial through (b) and (c)."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    s_merge, s_eval = mean([r[0] for r in session_rows]), mean([r[1] for r in session_rows])
    floor = mean([r[2] for r in session_rows]) / (read_gbps * GB)
    r_merge, r_load, r_eval = (mean([r[i] for r in rounds]) for i in range(3))
    print(f"## Merge search: seconds per trial, TIES over a llama-L{a.layers}-H{a.hidden}-I{a.intermediate}-V{a.vocab} "
          f"(bf16) base + 3 experts, {a.device}\n")
    print(common.machine(torch.device(a.device)))
    print(f"- {a.device} memory read bandwidth (int64 sum over 2 GiB): {read_gbps:.1f} GB/s; copy bandwidth (read + write): "
          f"{copy_gbps:.1f} GB/s")
    print(f"- validation: {a.questions} questions x {a.choices} choices, {objective.tokens()} tokens per evaluation; "
          f"{a.trials} trials per approach, every tensor merged again each trial")
    print(f"- session opened (plan, every input read once, first merge) in {opened:.1f} s\n")
    print("| approach | merge s | load s | evaluate s | trial s | merge x session's | merge x memory-read floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| (a) MergeSession | {s_merge:.2f} | 0 | {s_eval:.2f} | {s_merge + s_eval:.2f} | 1.00 | {s_merge / floor:.2f} |")
    print(f"| (b) merge-engine to disk + load | {r_merge:.2f} | {r_load:.2f} | {r_eval:.2f} | {r_merge + r_load + r_eval:.2f} "
          f"| {(r_merge + r_load) / s_merge:.1f} | - |")
    if theirs:
        k_merge, k_load, k_eval = (mean([r[i] for r in theirs]) for i in range(3))
        print(f"| (c) mergekit-yaml to disk + load | {k_merge:.2f} | {k_load:.2f} | {k_eval:.2f} | "
              f"{k_merge + k_load + k_eval:.2f} | {(k_merge + k_load) / s_merge:.1f} | - |")
    print(f"\nmemory-read floor of a session trial's merge: its inputs ({mean([r[2] for r in session_rows]) / GB:.2f} GB) "
          f"at {read_gbps:.1f} GB/s = {floor:.2f} s. 'merge x session's' of (b) and (c) counts their merge and load.\n",
          flush=True)
    return [r_merge + r_load + r_eval] + ([k_merge + k_load + k_eval] if theirs else [])


def lora_sessions(base: str, trials: int, device: str) -> str:
    """Sessions over three rank-16 LoRA experts of the base (every linear weight of every layer), their updates
    applied once or factored: memory held and seconds per merge (every tensor merged again)."""
    adapters = [write_lora(base, os.path.join(os.path.dirname(base), f"lora16-base-{i}"), seed=i) for i in (1, 2, 3)]
    configs = trial_configs([base] + [f"{base}+{a}" for a in adapters], trials + 1)
    lines = ["| LoRA inputs | inputs held GB | more on the host GB | opened in s | merge s per trial |", "|---|---:|---:|---:|---:|"]
    for lora in ("applied", "factored"):
        began = time.perf_counter()
        session = MergeSession(configs[0], device, lora=lora, progress=False)
        opened = time.perf_counter() - began
        merges = [session.merge(cfg).seconds for cfg in configs[1:]]
        lines.append(f"| {lora} | {session.memory.input_bytes / GB:.2f} | {session.memory.lora_bytes / GB:.2f} | "
                     f"{opened:.1f} | {sum(merges) / len(merges):.2f} |")
        del session
    return "\n".join(lines)


def optuna_missing() -> str:
    """Why the real search cannot run ('' where it can): a GPU image may lack optuna (the tune extra)."""
    try:
        require("optuna", "tune", "the real search")
    except MissingExtraError as e:
        return str(e)
    return ""


def real_search(a, paths: list[str], root: str, val: str) -> str:
    """merge_engine.search over the trials' spaces within --budget: the trials it completes."""
    search_out = os.path.join(root, "search_out")
    shutil.rmtree(search_out, ignore_errors=True)
    shutil.rmtree(os.path.join(root, ".search_out.search"), ignore_errors=True)
    spaces = {"merge_method": "ties", "base_model": paths[0], "dtype": "bfloat16", "parameters": {"normalize": True},
              "models": [{"model": p, "parameters": {"weight": {"search": [0.2, 1.0]}, "density": {"search": [0.3, 0.9]}}}
                         for p in paths[1:]], "search": {"objective": {"kind": "multiple_choice", "data": val}}}
    began = time.perf_counter()
    result = search(spaces, search_out, SearchOptions(budget=a.budget, device=a.device, progress=False))
    searched = time.perf_counter() - began
    shutil.rmtree(search_out, ignore_errors=True)
    return (f"Search with a budget of {a.budget:.0f} s (merge_engine.search, TPE, 6 parameters): "
            f"{result.trials_this_run} trials completed, best accuracy {result.score:.3f}, {searched:.1f} s wall "
            "including the final write.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/merge_engine_bench")
    for name, default in SHAPE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--small", action="store_true", help=f"the small model: {SMALL}")
    p.add_argument("--trials", type=int, default=3, help="trials timed per approach")
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--choices", type=int, default=3)
    p.add_argument("--budget", type=float, default=300, help="seconds of the real search")
    p.add_argument("--mergekit-trials", type=int, default=1, help="trials timed through mergekit (each a full merge)")
    p.add_argument("--mergekit", default=MERGEKIT)
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--device", default="cpu", help="where sessions merge and models are evaluated (cpu, cuda)")
    a = p.parse_args()
    missing = optuna_missing()
    if missing:  # said now, not after the timed parts
        print(f"{missing}: the timed trials run, the real search does not", file=sys.stderr)
    if a.small:
        vars(a).update(SMALL)
    root = os.path.join(os.path.abspath(a.work), f"llama-L{a.layers}-H{a.hidden}-I{a.intermediate}-V{a.vocab}")
    paths = generate_models_apart(a, root)
    save_word_tokenizer(paths[0])
    val = write_questions(os.path.join(root, "val.jsonl"), a.questions, a.choices)
    objective = MultipleChoice(val, transformers.AutoTokenizer.from_pretrained(paths[0]))
    configs = trial_configs(paths, a.trials)
    # on the device that merges: a GPU session holds the small model's inputs in the GPU's memory
    device = torch.device(a.device)
    read_gbps, copy_gbps = read_bandwidth(device), common.copy_bandwidth(device, 3)

    opened, session_rows = session_trials(configs, objective, a.device)
    out = os.path.join(root, "search_trial_out")
    rounds = disk_trials(configs, objective, out, None, a.device)
    mergekit = None if a.skip_mergekit or not os.path.exists(a.mergekit) else a.mergekit
    theirs = disk_trials(configs[:a.mergekit_trials], objective, out, mergekit, a.device) if mergekit else []
    shutil.rmtree(out, ignore_errors=True)
    per_trial = print_trials(a, objective, read_gbps, copy_gbps, opened, session_rows, rounds, theirs)
    print(f"### LoRA experts: a session over base + three rank-16 LoRA experts of it, {a.device}\n")
    print(lora_sessions(paths[0], a.trials, a.device) + "\n", flush=True)
    print("### Memory plan of an 8B search on a 48 GB GPU (base + 3 experts, Llama-3-8B shapes, bf16; evaluation: "
          f"{FIVE_SHOT})\n")
    print(plan_8b(root) + "\n", flush=True)

    print(f"Search not run: {missing}." if missing else real_search(a, paths, root, val))
    print("Projected trials in the same budget (budget / seconds per trial, not run): "
          + ", ".join(f"{name} {int(a.budget // t)}" for name, t in zip(("(b)", "(c)"), per_trial)))


if __name__ == "__main__":
    main()
