"""`merge-engine patch ...`: the happy paths, and errors that exit 2 with one line naming what is at fault."""
import os
import resource
import subprocess
import sys

import pytest
import torch

from merge_engine.cli import main
from tests.patches.conftest import read_all, same_bits
from tests.tiers.conftest import same_files


def patch_command(argv: list[str]) -> int:
    return main(["patch", *argv])


def test_extract_apply_remove_norms(models, tmp_path, capsys):
    m = models(torch.bfloat16)
    p, p8 = str(tmp_path / "p"), str(tmp_path / "p8")
    assert patch_command(["extract", m["base"], m["tuned"], p, "--table"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 patch of" in out and "% of the full checkpoint" in out and "rel. error" in out
    assert patch_command(["extract", m["base"], m["tuned2"], p8, "--storage", "int8", "--top-norm", "0.5",
                          "--outside-layers", "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert patch_command(["norms", m["base"], m["tuned"]]) == 0
    assert "cumulative" in capsys.readouterr().out

    applied = str(tmp_path / "applied")
    assert patch_command(["apply", m["base"], p, applied]) == 0
    printed = capsys.readouterr()
    assert "tensors changed" in printed.out and "applying patches" in printed.err and "100%" in printed.err
    assert same_bits(read_all(applied), read_all(m["tuned"]))
    assert patch_command(["remove", applied, p, str(tmp_path / "removed"), "-q"]) == 0
    assert "removing patches" not in capsys.readouterr().err
    same_files(m["base"], str(tmp_path / "removed"))
    both = str(tmp_path / "both")
    assert patch_command(["apply", m["base"], p, p8, both, "--scale", "0.5", "2", "-q"]) == 0
    assert patch_command(["remove", both, p, p8, "--in-place", "--scale", "0.5", "2", "--any-base", "-q"]) == 0
    assert patch_command(["recover", both]) == 0
    assert "nothing to recover" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["apply", "{base}", "{p}", "{out}", "--scale", "1", "2"], "--scale takes one value per patch"),
    (["apply", "{base}", "{out}"], "needs MODEL PATCH"),
    (["extract", "{base}", "{tuned}", "{out}", "--rank", "4"], "use them with --storage lora"),
    (["extract", "{base}", "{tuned}", "{out}", "--top-norm", "1.5"], "expected a share in (0, 1]"),
    (["apply", "{other}", "{p}", "{out}"], "differs from the base this patch was made for"),
    (["apply", "{base}", "{base}", "{out}"], "a model folder (config.json), where a patch is expected"),
    (["apply", "{base}", "{p}", "{out}", "--scale", "nan"], "expected a finite number of at most 3.4e+38 in magnitude, got nan"),
    (["remove", "{base}", "{p}", "{out}", "--scale", "inf"], "expected a finite number of at most 3.4e+38 in magnitude, got inf"),
    (["apply", "{base}", "{p}", "{out}", "--scale", "1e300"], "expected a finite number of at most 3.4e+38 in magnitude, got 1e300"),
])
def test_errors_are_one_line_and_leave_nothing(models, tmp_path, capsys, argv, message):
    m = models(torch.bfloat16)
    p = str(tmp_path / "p")
    assert patch_command(["extract", m["base"], m["tuned"], p, "-q"]) == 0
    names = dict(base=m["base"], tuned=m["tuned"], other=m["other"], p=p, out=str(tmp_path / "out"))
    try:
        status = patch_command([a.format(**names) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


def test_inputs_and_the_output_are_kept_apart(models, tmp_path, capsys):
    """--overwrite would delete a patch that lies inside the output folder; an output inside the model or patch
    folder would write among its files: both refused before anything is read, and nothing changes."""
    import shutil
    m = models(torch.bfloat16)
    out = tmp_path / "out"
    p = str(out / "p")
    assert patch_command(["extract", m["base"], m["tuned"], p, "-q"]) == 0
    before = sorted(os.listdir(p))
    for argv, message in ((["apply", m["base"], p, str(out), "--overwrite"], f"the input folder {p} is inside the output folder"),
                          (["apply", m["base"], p, os.path.join(p, "x")], f"is inside the input folder {p}"),
                          (["extract", m["base"], m["tuned"], os.path.join(m["tuned"], "pp")], "is inside the input folder")):
        assert patch_command(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(p)) == before and not os.path.exists(os.path.join(m["tuned"], "pp"))
    shutil.rmtree(out)


@pytest.mark.parametrize("storage", ["int8", "lora"])
def test_a_full_disk_during_extract_names_the_patch_file_and_leaves_nothing(models, tmp_path, storage):
    # the patch shards' (pwrite) and the LoRA adapter's (a buffered write) errors named no file: "[Errno 27] File too
    # large" alone
    m = models(torch.bfloat16)

    def small_disk():  # a file size limit: writes past it fail as a full disk's do
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    run = subprocess.run([sys.executable, "-m", "merge_engine", "patch", "extract", m["base"], m["tuned"],
                          str(tmp_path / "p"), "--storage", storage, "-q"],
                         capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    said = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(said) == 1 and "File too large" in said[0], run.stderr
    written = "adapter_model.safetensors" if storage == "lora" else "patch-00001.safetensors"
    assert said[0].endswith(f"{written}'") and os.listdir(tmp_path) == []
