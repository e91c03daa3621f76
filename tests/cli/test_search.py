"""`merge-engine search` (merge_engine/cli/search.py): a search end to end from the command line, its summary
line, and one-line refusals (exit 2) of bad budgets, spaces and a missing extra."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from merge_engine.cli import main
from tests.search.conftest import search_config


def test_a_search_from_the_command_line(search_models, write_search, tmp_path, capsys, monkeypatch):
    # main() called in a long-lived process (here pytest's, a day old) starts the budget at the call
    monkeypatch.setattr("merge_engine.cli.search.process_age", lambda: 86400.0)
    paths, val, test = search_models
    config = write_search(search_config(paths, val))
    out = tmp_path / "out"
    assert main(["search", config, str(out), "--budget", "10m", "--trials", "3", "--device", "cpu", "--test", test,
                 "--sampler", "cmaes", "--seed", "4", "--lora", "factored"]) == 0  # no LoRA input: held as they are
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("best score ") and ", test " in line and "after 3 trials (3 in this run)" in line
    assert {"model.safetensors", "config.json", "mergekit_config.yml", "trials.csv", "search.json",
            "search_journal.log"} <= set(os.listdir(out))
    assert not (tmp_path / ".out.search").exists()


def test_a_search_over_hub_references_in_a_cache(search_models, write_search, tmp_path, capsys):
    """--transformers-cache: the experts named by Hub id, found in that cache (nothing downloaded), as merge-engine
    finds them; the best config names them so, and merge-engine with the same cache reproduces the best model."""
    from tests.io.test_hub_cache import cache_repo
    paths, val, _ = search_models
    cache = tmp_path / "cache"
    ids = [f"org/model-{i}" for i in range(len(paths))]
    for repo_id, folder in zip(ids, paths):
        cache_repo(str(cache), repo_id, folder)
    config = write_search(search_config(ids, val))
    out = tmp_path / "out"
    assert main(["search", config, str(out), "--budget", "10m", "--trials", "2", "--device", "cpu",
                 "--transformers-cache", str(cache), "-q"]) == 0
    assert "org/model-1" in (out / "mergekit_config.yml").read_text()
    assert main([str(out / "mergekit_config.yml"), str(tmp_path / "again"), "--transformers-cache", str(cache),
                 "-q"]) == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert main(["search", config, str(tmp_path / "uncached"), "--budget", "10m", "--device", "cpu",
                 "--transformers-cache", str(tmp_path / "empty")]) == 2
    assert "hf download org/model-0" in capsys.readouterr().err

@pytest.mark.parametrize("budget, problem", [
    ("soon", "a duration such as 50m"), ("0", "must be more than 0 seconds"), ("-5m", "a duration such as 50m"),
    ("9" * 400 + "s", "--budget")])
def test_a_bad_budget_is_refused(budget, problem, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", "search.yml", str(tmp_path / "out"), "--budget", budget])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--budget" in err and problem in err, err


def test_a_bad_space_is_one_line_and_nothing_is_written(search_models, write_search, tmp_path, capsys):
    paths, val, _ = search_models
    config = search_config(paths, val)
    config["models"][0]["parameters"]["t"] = {"search": [0, 1]}
    assert main(["search", write_search(config), str(tmp_path / "out"), "--budget", "60"]) == 2
    err = capsys.readouterr().err
    assert "models[0].parameters.t: a search space on 't', which merge method 'ties' does not have" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_without_optuna_the_error_names_the_extra(search_models, write_search, tmp_path):
    paths, val, _ = search_models
    code = ("import sys; sys.modules['optuna'] = None; from merge_engine.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "search", write_search(search_config(paths, val)),
                          str(tmp_path / "out"), "--budget", "60"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        'merge-engine: error: merge-engine search needs optuna: pip install "merge_engine[tune]"']


@pytest.mark.parametrize("flags, message", [
    (["--seed", str(2**32)], "--seed: an integer from 0 to 2**32 - 1"),
    (["--storage", "{out}/journal.log"], "--storage: the journal {out}/journal.log is inside the output folder"),
])
def test_bad_seed_and_storage_are_one_line_and_nothing_is_written(flags, message, search_models, write_search, tmp_path,
                                                                  capsys):
    paths, val, _ = search_models
    out = str(tmp_path / "out")
    argv = ["search", write_search(search_config(paths, val)), out, "--budget", "60", "--device", "cpu"]
    assert main(argv + [f.format(out=out) for f in flags]) == 2
    err = capsys.readouterr().err
    assert message.format(out=out) in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["search.yml"]


def test_a_search_whose_output_fits_the_disk_runs_though_the_disk_holds_less_than_64_mib(search_models, write_search,
                                                                                        tmp_path):
    # the output disk's write rate was measured with a 64 MiB file: a search of a small model failed on a disk (here
    # a file size limit) with room for its output but not for that probe, with a message naming no file
    import resource
    paths, val, _ = search_models
    limit = 8 << 20

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    run = subprocess.run([sys.executable, "-m", "merge_engine", "search", write_search(search_config(paths, val)),
                          str(tmp_path / "out"), "--budget", "10m", "--trials", "2", "--device", "cpu", "-q"],
                         capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert run.returncode == 0, run.stderr
    assert os.path.getsize(tmp_path / "out" / "model.safetensors") < limit
