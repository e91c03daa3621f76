#!/usr/bin/env bash
# Install merge_engine as a user does and use it from outside the checkout: build an sdist and, from
# it, a wheel (compiled kernels included); install the wheel with no extras into a fresh venv; then,
# from another folder, run merges, ops calls and every command's --help, and check that the compiled
# kernels ran and that no optional package (transformers, triton, optuna, scipy) was needed.
# Run by tools/test.sh, inside the project's .venv (torch, setuptools, ninja, build installed).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/merge_engine_install_check.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "install check in $work (removed at the end)"

# a wheel for other machines, as one is built for distribution: on x86, for a portable -march, which the
# installed package must then use without being told (MERGE_ENGINE_CPU_ARCH is a build setting)
arch=native
[ "$(uname -m)" = x86_64 ] && arch=x86-64-v2
MERGE_ENGINE_CPU_ARCH=$arch python -m build --no-isolation --outdir "$work/dist" . > "$work/build.log" 2>&1 ||
  { tail -30 "$work/build.log"; exit 1; }
python - "$work/dist" "$arch" <<'EOF'
import glob, json, sys, tarfile, zipfile
dist, arch = sys.argv[1:]
sdist = tarfile.open(glob.glob(f"{dist}/*.tar.gz")[0]).getnames()
for needed in ("setup.py", "pyproject.toml", "MANIFEST.in", "csrc/cpu/bindings.cpp", "csrc/cuda/bindings.cpp",
               "triton_kernels/task_vectors.py", "merge_engine/kernel_build.py"):
    assert any(n.endswith("/" + needed) for n in sdist), f"the sdist lacks {needed}"
assert not [n for n in sdist if "/tests/" in n], "the sdist holds tests (a part of them, which cannot run)"
wheel = zipfile.ZipFile(glob.glob(f"{dist}/*.whl")[0]).namelist()
for needed in ("merge_engine/_cpu_kernels.", "merge_engine/triton_kernels/task_vectors.py",
               "merge_engine/csrc/cpu/bindings.cpp"):
    assert any(n.startswith(needed) for n in wheel), f"the wheel lacks {needed}"
stray = [n for n in wheel if not n.startswith(("merge_engine/", "merge_engine-"))]
assert not stray, f"the wheel holds files outside the package: {stray}"
target = json.loads(zipfile.ZipFile(glob.glob(f"{dist}/*.whl")[0]).read("merge_engine/_cpu_kernels.target.json"))
assert target["arch"] == arch and (arch != "x86-64-v2" or "sse4_2" in target["features"] and "avx2" not in target["features"]), target
# the compiled modules load only with the torch they were built against: the wheel requires exactly that one
import email, torch
meta = zipfile.ZipFile(glob.glob(f"{dist}/*.whl")[0]).read(next(n for n in wheel if n.endswith(".dist-info/METADATA")))
pinned = f"torch=={torch.__version__}"
assert pinned in email.message_from_bytes(meta).get_all("Requires-Dist"), meta
print(f"sdist and wheel contents: ok (the wheel requires {pinned})")
EOF

python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$work"/dist/*.whl  # and torch, as the wheel requires it
unset MERGE_ENGINE_CPU_ARCH
mkdir "$work/elsewhere"
cd "$work/elsewhere"
export PATH="$work/venv/bin:$PATH"
python - <<'EOF'
import importlib.util, multiprocessing, os, subprocess, sys, threading, torch, yaml
import merge_engine
from merge_engine import MergeOptions, merge, merge_state_dicts, ops, parse_config
from merge_engine.demo import make_synthetic_llama
from merge_engine.ops import backends

assert "site-packages" in merge_engine.__file__, merge_engine.__file__
for optional in ("transformers", "triton", "optuna", "scipy", "lm_eval"):
    assert importlib.util.find_spec(optional) is None, f"{optional} is installed: this check needs a bare venv"

ext = backends.cpu_extension()  # the wheel's own compiled module, not a build on first use
assert ext is not None and ext.__name__ == "merge_engine._cpu_kernels" and "site-packages" in ext.__file__, ext
calls = []
real = ext.merge_task_vectors
ext.merge_task_vectors = lambda *args: calls.append(1) or real(*args)

shape = dict(layers=2, hidden=64, intermediate=96, vocab=128)
base = make_synthetic_llama("base", seed=0, **shape)
experts = [make_synthetic_llama(f"expert{i}", seed=i, base=base, **shape) for i in (1, 2)]
ties = {"merge_method": "ties", "base_model": base, "dtype": "bfloat16", "parameters": {"normalize": True},
        "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]}
merge(parse_config(ties), "ties_out", MergeOptions(device="cpu", quiet=True))
assert calls, "the TIES merge did not run the compiled kernel"
merge(parse_config(ties), "ties_shown", MergeOptions(device="cpu"))  # its progress bar shown
left = (multiprocessing.get_start_method(allow_none=True), [t.name for t in threading.enumerate()])
assert left == (None, ["MainThread"]), f"merging left a start method or threads in the caller's process: {left}"
print(f"TIES merge through the API: ok ({len(calls)} tensors on the compiled kernel; the process left as it was)")

x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
assert int((ops.trim_by_magnitude(x, 0.3) != 0).sum()) == 300
merged = ops.merge_task_vectors(x, [x + 1, x - 2], [0.5, 0.5], [0.5, 0.5], "magnitude", True, True)
assert merged.shape == x.shape and torch.isfinite(merged).all()
print("ops calls: ok")

calls.clear()
state_dicts = [{"w": torch.randn(64, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
merged = merge_state_dicts(state_dicts, "ties", base=0, parameters={"weight": 0.5, "density": 0.5})
assert merged["w"].dtype == torch.bfloat16 and calls, "merge_state_dicts did not run the compiled kernel"
print("merge_state_dicts: ok")

with open("linear.yml", "w") as f:
    yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                    "models": [{"model": m, "parameters": {"weight": 1.0}} for m in [base, *experts]]}, f)
run = subprocess.run(["merge-engine", "linear.yml", "linear_out", "-q"], capture_output=True, text=True)
assert run.returncode == 0 and os.path.exists("linear_out/config.json") and not run.stderr, run.stderr
print("merge-engine CONFIG OUT: ok")

tuned = make_synthetic_llama("tuned", seed=3, base=base, noise=0.0001, **shape)  # a small fine-tune
for storage in ("auto", "int4", "lora"):
    for argv in (["extract", base, tuned, f"patch_{storage}", "--storage", storage],
                 ["apply", base, f"patch_{storage}", f"patched_{storage}"]):
        run = subprocess.run(["merge-engine", "patch", *argv, "-q"], capture_output=True, text=True)
        assert run.returncode == 0 and not run.stderr, (argv, run.stderr)
print("merge-engine patch extract / apply: ok")

from merge_engine.cli import SUBCOMMANDS, key as key_cli, patch as patch_cli  # every command, as the CLI knows them
nested = [[group, name] for group, cli in (("key", key_cli), ("patch", patch_cli)) for name in cli.COMMANDS]
for command in ([], *[[name] for name in SUBCOMMANDS], *nested):
    run = subprocess.run(["merge-engine", *command, "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "usage:" in run.stdout and not run.stderr, (command, run.stderr)
print("every command's --help: ok")

# an optional part without its extra: one line naming the extra, exit 2, no traceback, nothing written
with open("data.txt", "w") as f:
    f.write("some text\n")
for command in (["stats", base, "data.txt", "grams"], ["fisher", base, "data.txt", "fishers"]):
    run = subprocess.run(["merge-engine", *command], capture_output=True, text=True)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and 'pip install "merge_engine[hf]"' in lines[0], run.stderr
    assert not os.path.exists(command[-1]), command
with open("search.yml", "w") as f:
    f.write(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: {{search: [0.1, 1]}}}}\n"
            "search: {objective: {kind: multiple_choice, data: val.jsonl}}\n")
run = subprocess.run(["merge-engine", "search", "search.yml", "searched", "--budget", "60"], capture_output=True, text=True)
lines = run.stderr.strip().splitlines()
assert run.returncode == 2 and len(lines) == 1 and 'pip install "merge_engine[tune]"' in lines[0], run.stderr
assert not os.path.exists("searched")
from merge_engine.evaluation import LmEvalTasks
from merge_engine.extras import MissingExtraError
try:
    LmEvalTasks(["arc_easy"], None)
    raise AssertionError("LmEvalTasks ran without lm_eval")
except MissingExtraError as e:
    assert 'pip install "merge_engine[eval]"' in str(e), e
print("optional parts without their extras: one-line refusals")
unexpected = {m for m in ("transformers", "triton", "optuna", "scipy", "cmaes", "lm_eval") if m in sys.modules}
assert not unexpected, unexpected
EOF
echo "install check: ok"
