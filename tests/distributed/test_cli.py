"""The commands as users run them under torchrun (two gloo ranks on this machine): a keyed copy that is the
same bytes as one process's and a clean exit; a bad merge refused on every rank, leaving nothing."""
from __future__ import annotations

import os
import subprocess
import sys

from merge_engine.tiers import apply_key
from tests.distributed.test_key import keys_of
from tests.tiers.conftest import same_files

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "merge_engine"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, timeout=300)


def test_key_apply_under_torchrun(tier_model, tmp_path):
    model = tier_model("llama")
    key = keys_of(model)[0]
    key.save(str(tmp_path / "key.json"))
    run = torchrun("key", "apply", model, str(tmp_path / "key.json"), str(tmp_path / "keyed"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("parameters moved") == 1  # rank 0 alone prints the summary
    apply_key(model, [key], str(tmp_path / "single"))
    same_files(tmp_path / "single", tmp_path / "keyed")


def test_a_refused_merge_under_torchrun_leaves_nothing(model_sets, tmp_path, write_yaml):
    base, expert, *_ = model_sets("llama")
    config = write_yaml({"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 0.5}},
                                                              {"model": expert, "parameters": {"weight": 0.5}}]})
    out = os.path.join(base, "merged")  # inside an input folder: refused while planning, on every rank
    run = torchrun(config, out, "--device", "cpu")
    assert run.returncode != 0
    assert run.stderr.count(f"merge-engine: error: output folder {out} is inside the input folder") == 2
    assert not os.path.exists(out) and not [f for f in os.listdir(base) if "partial" in f]
