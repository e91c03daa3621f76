"""Multi-stage merges (merge_engine/multi.py, `merge-engine multi`): merges that read each other by name, run in
dependency order, every config and input folder checked before the first merge, lazy re-runs, and every malformed
file refused naming the merge at fault. Parity with mergekit-multi: tests/test_parity_mergekit.py."""
from __future__ import annotations

import os

import pytest
import torch
import yaml

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.cli import main
from merge_engine.errors import ConfigError
from merge_engine.multi import plan_stages, run_stages

OPTIONS = MergeOptions(quiet=True, copy_tokenizer=False)


def write_documents(path, *documents) -> str:
    path.write_text(yaml.safe_dump_all(list(documents), sort_keys=False))
    return str(path)


def linear(*models, name=None, **extra) -> dict:
    doc = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models], **extra}
    return {"name": name, **doc} if name else doc


def test_merges_read_earlier_merges_by_name_in_dependency_order(model_sets, folder_tensors, tmp_path):
    base, e1, e2, e3 = model_sets("llama")
    config = write_documents(
        tmp_path / "multi.yml",
        {"merge_method": "slerp", "base_model": base, "dtype": "float32", "parameters": {"t": 0.4},  # final, first
         "models": [{"model": base}, {"model": "second"}]},
        {"name": "second", "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
         "models": [{"model": {"model": {"path": "first"}}, "parameters": {"weight": 0.5}}]},  # mapping form
        linear(e1, e2, e3, name="first"))
    stages = plan_stages(config, str(tmp_path / "inter"), str(tmp_path / "final"))
    assert [(s.name, s.needs) for s in stages] == [("first", []), ("second", ["first"]), (None, ["second"])]
    run_stages(stages, OPTIONS)
    # each stage is the merge of its config with the names made folders
    merge(parse_config(linear(e1, e2, e3)), str(tmp_path / "first"), OPTIONS)
    merge(parse_config({"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                        "models": [{"model": str(tmp_path / "first"), "parameters": {"weight": 0.5}}]}),
          str(tmp_path / "second"), OPTIONS)
    merge(parse_config({"merge_method": "slerp", "base_model": base, "dtype": "float32", "parameters": {"t": 0.4},
                        "models": [{"model": base}, {"model": str(tmp_path / "second")}]}), str(tmp_path / "final2"),
          OPTIONS)
    for ours, alone in (("inter/first", "first"), ("inter/second", "second"), ("final", "final2")):
        a, b = folder_tensors(tmp_path / ours), folder_tensors(tmp_path / alone)
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a), ours
    written = yaml.safe_load((tmp_path / "inter" / "second" / "mergekit_config.yml").read_text())
    assert written["models"][0]["model"] == {"model": {"path": str(tmp_path / "inter" / "first")}}


def test_every_kind_of_reference_to_a_merge_is_its_folder(tmp_path):
    config = write_documents(tmp_path / "multi.yml", {
        "merge_method": "ties", "base_model": "a@main", "tokenizer": {"source": "b", "tokens": {
            "<x>": {"source": {"kind": "model_token", "model": "a", "token_id": 1}}, "<y>": {"source": "b"}}},
        "slices": [{"base_model": "a", "sources": [{"model": "a", "layer_range": [0, 1]},
                                                   {"model": "b+/adapters/one", "layer_range": [0, 1],
                                                    "parameters": {"weight": 1.0}}]}]},
        linear("/m/x", name="a"), linear("/m/y", name="b"))
    with pytest.raises(ConfigError) as e:  # /m/x and /m/y do not exist: named, and nothing else
        plan_stages(config, "/inter", "/out")
    assert [p for p in e.value.problems if "/inter" in p] == []
    assert all("/m/" in p or "/adapters/one" in p for p in e.value.problems), e.value.problems


def test_references_are_renamed_in_modules_and_tokenizer_sources(tmp_path, monkeypatch):
    import merge_engine.multi as multi
    monkeypatch.setattr(multi, "_folder_problems", lambda *args: [])  # (no folders: the renaming alone)
    config = write_documents(tmp_path / "multi.yml", {
        "merge_method": "linear", "tokenizer_source": "a", "parameters": {"weight": 1.0},
        "modules": {"text_decoder": {"models": [{"model": "a"}, {"model": "b@v1"}]}}},
        linear("/m/x", name="a"), linear("/m/y", name="b"))
    final = next(s for s in plan_stages(config, "/inter", "/out") if s.name is None)
    assert final.config.referenced_models() == ["/inter/a", "/inter/b@v1"]
    assert final.config.tokenizer.source == "/inter/a" and final.needs == ["a", "b"]


BAD = {  # the documents -> what the message says
    "a cycle": ([linear("b", name="a"), linear("c", name="b"), linear("a", name="c")],
                r"the merges read each other in a cycle: a -> b -> c -> a"),
    "a name given twice": ([linear("/m", name="a"), linear("/m", name="a")], r"document 2: the name 'a' is given twice"),
    "two final merges": ([linear("/m"), linear("/m")], r"document 2: a second merge without a name"),
    "a name that is a path": ([linear("/m", name="../up")], r"document 1: name '../up' is not a folder name"),
    "a document that is no config": ([["merge_method", "linear"]], r"document 1: expected a merge config"),
    "a bad config": ([linear("/m", name="a"), {**linear("a"), "merge_method": "tie"}],
                     r"the final merge: unknown merge_method 'tie'"),
    "a missing input": ([linear("/nowhere", name="a"), linear("a")],
                        r"merge 'a': /nowhere: model path does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_refused_before_any_merge(case, tmp_path):
    documents, message = BAD[case]
    config = write_documents(tmp_path / "multi.yml", *documents)
    with pytest.raises(ConfigError, match=message):
        plan_stages(config, str(tmp_path / "inter"), str(tmp_path / "out"))


def test_a_final_merge_needs_an_output_folder(tmp_path):
    config = write_documents(tmp_path / "multi.yml", linear("/m"))
    with pytest.raises(ConfigError, match=r"a merge without a name \(the final merge\): give its output folder"):
        plan_stages(config, str(tmp_path / "inter"))


def test_a_later_stages_problem_stops_the_run_before_the_first_merge(model_sets, tmp_path):
    base, e1, _, _ = model_sets("llama")
    config = write_documents(tmp_path / "multi.yml", linear(base, e1, name="a"), linear("a", "/nowhere"))
    assert main(["multi", config, "-I", str(tmp_path / "inter"), "--out-path", str(tmp_path / "out"), "-q"]) == 2
    assert not (tmp_path / "inter" / "a").exists() and not (tmp_path / "out").exists()


def test_a_lazy_run_skips_complete_merges_and_no_lazy_needs_overwrite(model_sets, tmp_path, capsys):
    base, e1, e2, _ = model_sets("llama")
    config = write_documents(tmp_path / "multi.yml", linear(base, e1, name="a"), linear("a", e2))
    argv = ["multi", config, "-I", str(tmp_path / "inter"), "--out-path", str(tmp_path / "out"), "--no-copy-tokenizer"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "a: merged" in first and "final merge: merged" in first
    weights = tmp_path / "inter" / "a" / "model.safetensors"
    stamp = os.stat(weights).st_mtime_ns
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "is complete already, not merged again" in again and os.stat(weights).st_mtime_ns == stamp
    assert main([*argv, "--no-lazy"]) == 2
    assert "not empty" in capsys.readouterr().err and os.stat(weights).st_mtime_ns == stamp
    assert main([*argv, "--no-lazy", "--overwrite", "-q"]) == 0
    assert os.stat(weights).st_mtime_ns != stamp


def test_an_out_path_no_merge_writes_is_named(model_sets, tmp_path, caplog):
    base, e1, _, _ = model_sets("llama")
    config = write_documents(tmp_path / "multi.yml", linear(base, e1, name="a"))
    plan_stages(config, str(tmp_path / "inter"), str(tmp_path / "out"))
    assert "every merge has a name" in caplog.text and "is not written" in caplog.text


@pytest.mark.parametrize("out", ["inter", "inter/a", "inter/a/final"])
def test_an_out_path_that_is_or_holds_or_lies_in_a_merges_folder_is_refused_before_any_merge(model_sets, tmp_path,
                                                                                             out):
    # --out-path inter/a: the final merge found a's output complete and was silently not run (lazy), or replaced it
    base, e1, e2, _ = model_sets("llama")
    config = write_documents(tmp_path / "multi.yml", linear(base, e1, name="a"), linear(base, e2))
    with pytest.raises(ConfigError, match=r"merge 'a' and the final merge write to .*give them folders apart"):
        plan_stages(config, str(tmp_path / "inter"), str(tmp_path / out))
    assert main(["multi", config, "-I", str(tmp_path / "inter"), "--out-path", str(tmp_path / out), "-q"]) == 2
    assert not (tmp_path / "inter").exists()


def test_an_intermediate_dir_inside_the_out_path_is_refused(model_sets, tmp_path):
    # --overwrite on the final merge would delete the named merges' outputs with the folder it replaces
    base, e1, e2, _ = model_sets("llama")
    config = write_documents(tmp_path / "multi.yml", linear(base, e1, name="a"), linear(base, e2))
    with pytest.raises(ConfigError, match="give them folders apart"):
        plan_stages(config, str(tmp_path / "out" / "inter"), str(tmp_path / "out"))


def test_a_merge_reading_another_ones_folder_by_its_path_runs_after_it(model_sets, tmp_path):
    # a path to -I/NAME is not checked before the run (it is a merge's output); it was run first, and failed there
    base, e1, e2, _ = model_sets("llama")
    config = write_documents(tmp_path / "multi.yml", linear(str(tmp_path / "inter" / "a"), e2),
                             linear(base, e1, name="a"))
    stages = plan_stages(config, str(tmp_path / "inter"), str(tmp_path / "out"))
    assert [(s.name, s.needs) for s in stages] == [("a", []), (None, ["a"])]
    run_stages(stages, OPTIONS)
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


def test_a_merge_writing_inside_a_folder_a_later_merge_reads_is_refused_before_any_merge(model_sets, tmp_path):
    # -I inside a model folder: merge 'a' ran, then merge 'b' (writing into the model it reads) was refused
    base, e1, e2, _ = model_sets("llama")
    config = write_documents(tmp_path / "multi.yml", linear(base, e1, name="a"), linear(e2, "a", name="b"))
    with pytest.raises(ConfigError, match=r"merge 'b': output folder .*inter/b is inside the input folder .*"):
        plan_stages(config, os.path.join(e2, "inter"))
    assert main(["multi", config, "-I", os.path.join(e2, "inter"), "-q"]) == 2
    assert not os.path.exists(os.path.join(e2, "inter"))


def test_an_out_path_that_cannot_be_written_stops_the_run_before_the_first_merge(model_sets, tmp_path, capsys):
    base, e1, e2, _ = model_sets("llama")
    config = write_documents(tmp_path / "multi.yml", linear(base, e1, name="a"), linear("a", e2))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["multi", config, "-I", str(tmp_path / "inter"), "--out-path", str(tmp_path / "out"), "-q"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert not (tmp_path / "inter").exists() and (tmp_path / "out" / "notes.txt").read_text() == "mine"
