"""Benchmark: merge_engine vs mergekit on a ~1.1B-parameter Llama-shaped TIES merge (bf16, CPU).

Generates a random bf16 base model and three experts (base + seeded noise) as Hugging Face
safetensors folders (reused when already present in --work), writes a mergekit TIES config, measures
the I/O floor (read every input byte; write + fsync the output size) and the memory-copy bandwidth,
then runs in subprocesses, measuring wall time and peak RSS: `python -m merge_engine` (compiled kernels
when they load), the same with MERGE_ENGINE_KERNELS=0 (PyTorch reference ops) and mergekit-yaml;
"other load" is the CPU time other processes used meanwhile, in cores (the machine may be shared).
Prints a markdown table and a tensor-by-tensor comparison of the outputs. The page cache is dropped
before each timed run when /proc/sys/vm/drop_caches is writable (root).

    python bench/bench_merge.py                                  # TinyLlama-1.1B shape, with mergekit
    python bench/bench_merge.py --layers 2 --hidden 256 --intermediate 704 --vocab 4096   # quick check
    python bench/bench_merge.py --methods linear,ties,della,slerp   # merge_engine only, several methods
                                                                    # (linear_lora: linear over BASE+ADAPTER inputs)

With --methods, each method's merge_engine run is compared with the I/O floor of the inputs that
method reads, measured just before it (the disk's speed drifts), with a cold page cache (O_DIRECT floor)
and with the inputs already in the cache (plain-read floor), and with --mergekit-ratio mergekit-yaml
runs each config too (cold):

    python bench/bench_merge.py --methods ties,della,slerp --cache cold,warm --mergekit-ratio
    python bench/bench_merge.py --small --experts 2 --methods ties --mergekit-ratio   # 162M, two experts
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import math
import mmap
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time

import torch
import transformers
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

EXPERTS = 3
LAYERS_PER_SHARD = 4
NOISE = 0.002  # expert = base + NOISE * N(0, 1); base weights ~ N(0, 0.02)
TIES = {"weight": (0.5, 0.3, 0.2), "density": (0.5, 0.6, 0.7)}
SHAPE = {"layers": 22, "hidden": 2048, "intermediate": 5632, "vocab": 32000, "heads": 32, "kv_heads": 4}  # TinyLlama
SMALL = {"layers": 12, "hidden": 768, "intermediate": 3072, "vocab": 32000, "heads": 12, "kv_heads": 12}  # 162M
MERGEKIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-mergekit", "bin",
                        "mergekit-yaml")  # tools/test.sh installs it
CHUNK = 64 << 20


def tensor_shapes(a, layers: range, first: bool, last: bool) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names and shapes of one shard (embeddings in the first, norm and head in the last)."""
    h, i, kv = a.hidden, a.intermediate, a.kv_heads * (a.hidden // a.heads)
    shapes = {"model.embed_tokens.weight": (a.vocab, h)} if first else {}
    for n in layers:
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    if last:
        shapes.update({"model.norm.weight": (h,), "lm_head.weight": (a.vocab, h)})
    return shapes


def generate_models_apart(a, root: str) -> list[str]:
    """generate_models in a child process. Linux carries a process's peak RSS into the children it forks (the
    copied memory's high-water mark survives exec), so a parent that had held the generated tensors made every
    timed child report its own peak RSS as at least the parent's (2.48 GB instead of 1.54 for TIES)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(generate_models, a, root).result()


def generate_models(a, root: str) -> list[str]:
    """Write base + experts shard by shard (memory: two shards); reuse folders whose index exists."""
    paths = [os.path.join(root, "base")] + [os.path.join(root, f"expert{e}") for e in range(1, EXPERTS + 1)]
    index = "model.safetensors.index.json"
    if all(os.path.exists(os.path.join(p, index)) for p in paths):
        return paths
    config = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, tie_word_embeddings=False, dtype="bfloat16",
        architectures=["LlamaForCausalLM"])
    for p in paths:
        config.save_pretrained(p)
    starts, weight_maps, total, gen = range(0, a.layers, LAYERS_PER_SHARD), [{} for _ in paths], 0, torch.Generator()
    for s, start in enumerate(starts):
        shapes = tensor_shapes(a, range(start, min(start + LAYERS_PER_SHARD, a.layers)), s == 0, s == len(starts) - 1)
        fname = f"model-{s + 1:05d}-of-{len(starts):05d}.safetensors"
        gen.manual_seed(s)
        base = {n: (torch.ones(sh) if len(sh) == 1 else 0.02 * torch.randn(sh, generator=gen)).bfloat16()
                for n, sh in shapes.items()}
        total += sum(t.nbytes for t in base.values())
        for m, path in enumerate(paths):
            gen.manual_seed(1000 * m + s)
            tensors = base if m == 0 else {
                n: (t.float() + NOISE * torch.randn(t.shape, generator=gen)).bfloat16() for n, t in base.items()}
            save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
            weight_maps[m].update(dict.fromkeys(tensors, fname))
    for path, weight_map in zip(paths, weight_maps):  # written last: marks a complete folder
        with open(os.path.join(path, index), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return paths


def write_config(paths: list[str], path: str) -> str:
    models = [{"model": p, "parameters": {"weight": w, "density": d}}
              for p, w, d in zip(paths[1:], TIES["weight"], TIES["density"])]
    config = {"merge_method": "ties", "base_model": paths[0], "models": models,
              "parameters": {"normalize": True}, "dtype": "bfloat16"}
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def method_config(method: str, paths: list[str]) -> tuple[dict, list[str]]:
    """A bf16 config of one method on the generated models, and the model folders it reads."""
    weights, densities = TIES["weight"], TIES["density"]
    weighted = [{"weight": w} for w in weights]
    trimmed = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    per = {"linear": weighted, "task_arithmetic": weighted, "ties": trimmed, "dare_ties": trimmed,
           "breadcrumbs_ties": [{**q, "density": 0.8, "gamma": 0.01} for q in weighted],
           "della": [{**q, "epsilon": 0.1} for q in trimmed], "model_stock": [{} for _ in weights]}
    if method == "slerp":
        return ({"merge_method": "slerp", "base_model": paths[0], "models": [{"model": paths[0]}, {"model": paths[1]}],
                 "parameters": {"t": 0.3}, "dtype": "bfloat16"}, paths[:2])
    if method == "linear_lora":  # linear over the experts, each read with a rank-16 LoRA on every linear layer
        adapters = [write_lora(m, os.path.join(os.path.dirname(m), f"lora16-{os.path.basename(m)}")) for m in paths[1:]]
        return ({"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": f"{m}+{a}", "parameters": q} for m, a, q in zip(paths[1:], adapters, weighted)]}, paths[1:])
    if method not in per:
        sys.exit(f"--methods: no benchmark config for {method!r}; choose from "
                 f"{', '.join([*per, 'slerp', 'linear_lora'])}")
    config = {"merge_method": method, "models": [{"model": m, "parameters": q} for m, q in zip(paths[1:], per[method])],
              "dtype": "bfloat16"}
    if method == "linear":
        return config, paths[1:]
    return {**config, "base_model": paths[0], "parameters": {"normalize": True}}, paths


def write_lora(model: str, folder: str, r: int = 16, seed: int = 1) -> str:
    """A peft-format LoRA adapter (random A and B, bf16) on every 2-D weight inside the layers of `model`."""
    if os.path.exists(os.path.join(folder, "adapter_model.safetensors")):
        return folder
    gen = torch.Generator().manual_seed(seed)
    tensors, targets = {}, set()
    for f in safetensors_files(model):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                if ".layers." in name and name.endswith(".weight") and len(shape) == 2:
                    module = name.removesuffix(".weight")
                    targets.add(module.rsplit(".", 1)[-1])
                    for ab, dims in (("A", (r, shape[1])), ("B", (shape[0], r))):
                        tensors[f"base_model.model.{module}.lora_{ab}.weight"] = (
                            0.01 * torch.randn(dims, generator=gen)).to(torch.bfloat16)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": sorted(targets)}, f)
    return folder


def methods_table(methods: list[str], paths: list[str], root: str, a) -> None:
    """merge_engine on each method against the I/O floor of that method's inputs, with a cold page cache
    and with the inputs in it; mergekit-yaml on the same configs (cold) when asked."""
    out_bytes = folder_bytes(paths[0])
    modes = a.cache.split(",")
    run_mergekit = a.mergekit_ratio and os.path.exists(a.mergekit)
    print(f"## merge_engine per method, {os.path.basename(root)} (bf16), {a.experts} experts, against each "
          "method's I/O floor\n")
    print(machine(drop_caches()))
    print(engine_info())
    print("- cold: page cache dropped before each floor and before the run; floor = O_DIRECT read of the "
          "method's input files, then write + fsync of the output size, plainly or with O_DIRECT (as "
          "merge_engine writes)")
    print("- warm: inputs read once beforehand (in the page cache); floor = plain read of the input files "
          "(from the cache), then write + fsync of the output size, plainly or with O_DIRECT")
    print("- CPU s: user + system time of the merge process")
    if run_mergekit:
        engine_mode = "cold" if "cold" in modes else modes[0]  # the run mergekit's cold wall is set against
        print(f"- mergekit: {a.mergekit}, cold page cache; `x engine` = mergekit wall / merge_engine wall ({engine_mode})")
    print()
    head = ["method", "models read"]
    for mode in modes:
        head += [f"{mode} floor s (plain write)", f"{mode} floor s (direct write)", f"{mode} wall s",
                 f"{mode} x floor (plain)", f"{mode} x floor (direct)", f"{mode} CPU s", f"{mode} peak RSS GB"]
    head += ["mergekit s", "x engine"] if run_mergekit else []
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for method in methods:
        config, folders = method_config(method, paths[:a.experts + 1])
        path = os.path.join(root, f"{method}-{a.experts}.yml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        inputs = [f for folder in folders for f in safetensors_files(folder)]
        out = os.path.join(root, f"out_{method}")
        cells, walls = [method, str(len(folders))], {}
        for mode in modes:
            warm = mode == "warm"
            drop_caches()
            if warm:
                read_files(inputs)
            scratch = os.path.join(root, "scratch.bin")
            plain_floor = io_floor(inputs, out_bytes, scratch, direct=not warm, direct_write=False)
            if not warm:
                drop_caches()
            floor = io_floor(inputs, out_bytes, scratch, direct=not warm)
            wall, rss, cpu, other = run_merge([sys.executable, "-m", "merge_engine", path, out, "--overwrite", "-q"],
                                              out, os.path.join(root, f"{method}.log"), warm=warm)
            walls[mode] = wall
            cells += [f"{plain_floor:.2f}", f"{floor:.2f}", f"{wall:.2f}", f"{wall / plain_floor:.2f}",
                      f"{wall / floor:.2f}", f"{cpu:.1f}", f"{rss / 1e9:.2f}"]
            if other > 0.1:
                cells[-5] += f" (other load {other:.1f} cores)"
        if run_mergekit:
            mk_out, lora_cache = os.path.join(root, f"out_mergekit_{method}"), os.path.join(root, "mergekit_lora_cache")
            shutil.rmtree(lora_cache, ignore_errors=True)  # mergekit reuses merged adapters: each run pays its own
            # mergekit refuses BASE+ADAPTER inputs without a folder for the models it merges them into
            wall, *_ = run_merge([a.mergekit, path, mk_out, "--out-shard-size", "5B", "--lora-merge-cache", lora_cache],
                                 mk_out, os.path.join(root, f"mergekit_{method}.log"))
            cells += [f"{wall:.1f}", f"{wall / walls[engine_mode]:.1f}"]
            shutil.rmtree(mk_out, ignore_errors=True)
            shutil.rmtree(lora_cache, ignore_errors=True)
        print("| " + " | ".join(cells) + " |", flush=True)
        shutil.rmtree(out, ignore_errors=True)


def read_files(paths: list[str]) -> None:
    """Read files once (into the page cache)."""
    buf = bytearray(CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def safetensors_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def folder_bytes(folder: str) -> int:
    return sum(map(os.path.getsize, safetensors_files(folder)))


def io_floor(inputs: list[str], out_bytes: int, scratch: str, direct: bool = False, direct_write: bool = True) -> float:
    """Seconds to read every input file sequentially (through the page cache, or with O_DIRECT as
    merge_engine reads a cold cache) plus write out_bytes (with O_DIRECT as merge_engine writes, or
    through the page cache) and fsync (then delete)."""
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    start = time.perf_counter()
    for path in inputs:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            offset = 0
            while n := os.preadv(fd, [buf], offset):
                offset += n
        finally:
            os.close(fd)
    buf.seek(0)
    buf.write(os.urandom(CHUNK))
    data = memoryview(buf)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct_write else 0), 0o644)
    try:
        for off in range(0, out_bytes, CHUNK):  # a direct write's length rounded up to whole blocks
            n = min(CHUNK, out_bytes - off)
            os.pwrite(fd, data[:-(-n // 4096) * 4096 if direct_write else n], off)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    os.remove(scratch)
    return seconds


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best memory-copy rate of a large torch tensor, in GB/s counting bytes read + bytes written."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def busy_cpu_seconds() -> float:
    """CPU time used by every process on the machine since boot (/proc/stat, all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def run_merge(cmd: list[str], out_dir: str, log: str, warm: bool = False, **env: str) -> tuple[float, int, float, float]:
    """Run a merge command on a cold page cache (or as it is, warm=True); return wall seconds, the child's
    peak RSS bytes and CPU seconds, and the average number of cores other processes kept busy meanwhile."""
    shutil.rmtree(out_dir, ignore_errors=True)
    if warm:
        os.sync()
    else:
        drop_caches()
    with open(log, "w") as f:
        start, busy = time.perf_counter(), busy_cpu_seconds()
        env = dict(os.environ, HF_HUB_OFFLINE="1", **env)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall, busy = time.perf_counter() - start, busy_cpu_seconds() - busy
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, usage.ru_maxrss * 1024, cpu, max(0.0, busy - cpu) / wall


def open_tensors(folder: str) -> dict:
    """Tensor name -> open safetensors handle holding it."""
    return {n: f for path in safetensors_files(folder) for f in [safe_open(path, "pt")] for n in f.keys()}


def compare_outputs(label: str, ours: str, theirs: str, paths: list[str]) -> str:
    """Bit-identical tensors, differing elements, max |difference|, and how many of the differing
    elements sit where some expert's |delta| equals its TIES cut-off exactly (a magnitude tie)."""
    a, b = open_tensors(ours), open_tensors(theirs)
    base, *experts = map(open_tensors, paths)
    names = sorted(a.keys() & b.keys())
    same = n_diff = n_tie = elems = 0
    max_diff = 0.0
    for name in names:
        x, y = a[name].get_tensor(name), b[name].get_tensor(name)
        differ = x.view(torch.int16) != y.view(torch.int16)
        elems += x.numel()
        if not differ.any():
            same += 1
            continue
        n_diff += int(differ.sum())
        max_diff = max(max_diff, float((x.float() - y.float()).abs().max()))
        w, at_tie = base[name].get_tensor(name), torch.zeros_like(differ)
        for e, density in zip(experts, TIES["density"]):
            mag = (e[name].get_tensor(name) - w).abs().float()
            k = max(1, int(density * mag.numel()))
            at_tie |= mag == mag.reshape(-1).kthvalue(mag.numel() - k + 1).values
        n_tie += int((differ & at_tie).sum())
    only_one = len(a.keys() ^ b.keys())
    return (f"- {label}: {same}/{len(names)} tensors bit-identical; {n_diff} of {elems} elements "
            f"differ ({n_tie} of them at an exact magnitude tie on a TIES cut-off), max |difference| {max_diff:.3g}"
            + (f"; {only_one} tensor names in only one output" if only_one else "") + "\n")


def machine(dropped: bool) -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    with open("/proc/meminfo") as f:
        ram = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 2**20
    cache = "dropped before each timed run" if dropped else "NOT dropped (no permission): inputs may be warm"
    return (f"- CPU: {cpu}, {os.cpu_count()} cores, {ram:.1f} GiB RAM\n"
            f"- torch {torch.__version__}, Python {platform.python_version()}\n- page cache: {cache}")


def engine_info() -> str:
    """merge_engine's git commit and whether its compiled CPU kernels load (built here, untimed)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty"], capture_output=True, text=True)
    kernels = subprocess.run([sys.executable, "-m", "merge_engine.build_kernels"], capture_output=True, text=True)
    return f"- merge_engine: commit {commit.stdout.strip() or '?'}; {kernels.stdout.strip() or kernels.stderr.strip()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/merge_engine_bench", help="folder for models and outputs")
    for name, default in SHAPE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--mergekit", default=MERGEKIT, help="mergekit-yaml executable")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--skip-reference", action="store_true", help="skip the (slow) reference-ops run")
    p.add_argument("--methods", help="comma-separated methods: time merge_engine on each against its I/O floor")
    p.add_argument("--cache", default="cold,warm", help="with --methods: page-cache states to run (cold,warm)")
    p.add_argument("--experts", type=int, default=EXPERTS, help=f"with --methods: experts merged (1-{EXPERTS})")
    p.add_argument("--mergekit-ratio", action="store_true", help="with --methods: mergekit-yaml on every config too")
    p.add_argument("--small", action="store_true", help=f"the small model: {SMALL}")
    a = p.parse_args()
    if a.small:
        vars(a).update(SMALL)
    root = os.path.join(os.path.abspath(a.work), f"llama-L{a.layers}-H{a.hidden}-I{a.intermediate}-V{a.vocab}")
    t0 = time.perf_counter()
    paths = generate_models_apart(a, root)
    print(f"models ready in {root} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if a.methods:
        return methods_table(a.methods.split(","), paths, root, a)
    config = write_config(paths, os.path.join(root, "ties.yml"))
    inputs = [f for path in paths for f in safetensors_files(path)]
    in_bytes, out_bytes = sum(map(folder_bytes, paths)), folder_bytes(paths[0])  # output: the base's layout
    params = sum(math.prod(s) for s in tensor_shapes(a, range(a.layers), True, True).values())

    engine = engine_info()
    dropped = drop_caches()
    floors = []
    for direct in (False, True):
        drop_caches()
        floors.append(io_floor(inputs, out_bytes, os.path.join(root, "scratch.bin"), direct, direct_write=direct))
    rows = [("I/O floor, plain reads and writes", floors[0], out_bytes, None),
            ("I/O floor, O_DIRECT reads and writes", floors[1], out_bytes, None)]
    outs = {}
    runs = [("merge_engine", "merge_engine", {}),
            ("merge_engine, reference ops", "merge_engine_ref", {"MERGE_ENGINE_KERNELS": "0"})]
    for label, name, env in runs[:1] if a.skip_reference else runs:
        outs[label] = out = os.path.join(root, f"out_{name}")
        wall, *stats = run_merge([sys.executable, "-m", "merge_engine", config, out, "--overwrite", "-q"], out,
                                 os.path.join(root, f"{name}.log"), **env)
        rows.append((label, wall, folder_bytes(out), stats))
    run_mergekit = not a.skip_mergekit and os.path.exists(a.mergekit)
    if not a.skip_mergekit and not run_mergekit:
        print(f"{a.mergekit} not found: mergekit skipped", file=sys.stderr)
    if run_mergekit:
        outs["mergekit"] = out = os.path.join(root, "out_mergekit")
        wall, *stats = run_merge([a.mergekit, config, out, "--out-shard-size", "5B"], out,
                                 os.path.join(root, "mergekit.log"))
        rows.append(("mergekit", wall, folder_bytes(out), stats))
    first, *others = outs
    comparison = "".join(compare_outputs(f"{first} vs {o}", outs[first], outs[o], paths) for o in others)

    print(f"## TIES merge of a {params / 1e6:,.0f}M-parameter Llama (bf16) base + {EXPERTS} experts\n")
    print(machine(dropped))
    print(f"- memory copy bandwidth (torch, 1 GiB, read + write): {copy_bandwidth():.1f} GB/s")
    print(engine)
    if run_mergekit:
        print(f"- mergekit: {a.mergekit}")
    print(f"- per merge: read {in_bytes / 1e9:.2f} GB ({len(paths)} models), write {out_bytes / 1e9:.2f} GB; "
          "I/O floor = one-thread sequential read of every input file, then write + fsync of the output size, "
          "through the page cache or with O_DIRECT (as merge_engine reads a cold cache and writes); x I/O floor "
          "is against the faster one\n")
    print("| | wall s | peak RSS GB | GB/s | x I/O floor | CPU s | other load, cores |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    floor = min(floors)
    for label, wall, nbytes, stats in rows:
        rss, cpu, other = (f"{stats[0] / 1e9:.2f}", f"{stats[1]:.0f}", f"{stats[2]:.2f}") if stats else ("-",) * 3
        gbps = (in_bytes + nbytes) / wall / 1e9
        print(f"| {label} | {wall:.1f} | {rss} | {gbps:.2f} | {wall / floor:.2f} | {cpu} | {other} |")
    print(f"\nOutputs compared tensor by tensor (bf16 bit patterns):\n\n{comparison}", end="")


if __name__ == "__main__":
    main()
