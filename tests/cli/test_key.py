"""`merge-engine key ...`: the happy paths, and errors that exit 2 naming the file at fault."""
import json
import os
import stat

from merge_engine.cli import main
from merge_engine.tiers import TierKey, generate_key, key_report
from tests.tiers.conftest import read_config, same_files


def key_command(argv: list[str]) -> int:
    return main(["key", *argv])


def generate_key_file(model: str, out: str, monkeypatch, capsys, *options: str) -> str:
    """`key generate MODEL OUT` from a passphrase with these options; what it printed."""
    monkeypatch.setenv("TIER_PASS", "open sesame")
    assert key_command(["generate", model, out, "--passphrase-env", "TIER_PASS", *options]) == 0
    return capsys.readouterr().out


def test_generate_apply_remove_report(tier_model, tmp_path, capsys, monkeypatch):
    model = tier_model("qwen2")
    monkeypatch.setenv("TIER_PASS", "open sesame")
    k1, k2 = str(tmp_path / "k1.json"), str(tmp_path / "k2.json")
    assert key_command(["generate", model, k1, "--passphrase-env", "TIER_PASS", "--fraction", "0.3",
                        "--attention-share", "0.5"]) == 0
    assert "attn_heads" in capsys.readouterr().out
    assert stat.S_IMODE(os.stat(k1).st_mode) == 0o600
    assert TierKey.load(k1).mlp_cols == generate_key(read_config(model), "open sesame", 0.3, 0.5).mlp_cols
    (tmp_path / "secret.bin").write_bytes(b"\x00\x01binary secret\n")
    secret = str(tmp_path / "secret.bin")
    assert key_command(["generate", os.path.join(model, "config.json"), k2, "--secret-file", secret, "-q"]) == 0

    keyed, public = str(tmp_path / "keyed"), str(tmp_path / "public")
    assert key_command(["apply", model, k1, k2, keyed, "-q"]) == 0
    assert "applying the key" not in capsys.readouterr().err
    assert key_command(["remove", keyed, k1, k2, public]) == 0
    printed = capsys.readouterr()
    assert "parameters moved" in printed.out and "removing the key" in printed.err and "100%" in printed.err
    same_files(model, public)
    assert key_command(["apply", public, k1, k2, "--in-place", "-q"]) == 0
    same_files(keyed, public)
    assert key_command(["remove", public, k1, k2, "--in-place", "-q"]) == 0
    same_files(model, public)

    assert key_command(["report", model, k1]) == 0
    out = capsys.readouterr().out
    assert "up in" in out and "down in" in out and "total:" in out and "% of the model" in out
    assert "in key-size terms, without the q/k/v and MLP biases" in out  # Qwen2's q/k/v biases move but do not count
    assert key_command(["recover", model]) == 0
    assert "nothing to recover" in capsys.readouterr().out


def test_generate_partial_keys_and_fractions_of_the_model(tier_model, tmp_path, capsys, monkeypatch):
    model, out = tier_model("gpt_neo"), str(tmp_path / "k.json")
    printed = generate_key_file(model, out, monkeypatch, capsys, "--fraction", "0.2", "--fraction-of", "model",
                                "--attn-mode", "out", "--mlp-mode", "down")
    assert "attn_out_heads" in printed and "mlp_down_cols" in printed and "of the model's" in printed
    key = TierKey.load(out)
    assert key.attn_out_heads and key.mlp_down_cols and not key.attn_heads and not key.mlp_cols
    assert key_command(["report", model, out]) == 0
    report = capsys.readouterr().out
    assert "o in" in report and "down in" in report and "q/k/v in" not in report
    assert key_command(["apply", model, out, str(tmp_path / "keyed"), "-q"]) == 0


def run_bad(argv, capsys, *needles):
    capsys.readouterr()  # drop earlier output (the models' creation)
    assert key_command(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("merge-engine: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_errors_name_the_file(tier_model, tmp_path, capsys, monkeypatch):
    model = tier_model("llama")
    key = str(tmp_path / "key.json")
    monkeypatch.setenv("TIER_PASS", "x")
    assert key_command(["generate", model, key, "--passphrase-env", "TIER_PASS", "-q"]) == 0
    run_bad(["generate", model, key, "--passphrase-env", "TIER_PASS"], capsys, key, "--overwrite")
    run_bad(["generate", model, str(tmp_path / "k2.json"), "--passphrase-env", "NO_SUCH_VAR"], capsys, "NO_SUCH_VAR")
    run_bad(["generate", str(tmp_path / "nowhere"), str(tmp_path / "k3.json"), "--passphrase-env", "TIER_PASS"],
            capsys, str(tmp_path / "nowhere"))

    out = str(tmp_path / "out")
    run_bad(["apply", tier_model("gpt2"), key, out], capsys, key, "model_type 'llama'")
    run_bad(["apply", model, str(tmp_path / "missing.json"), out], capsys, "missing.json")
    (tmp_path / "config_as_key.json").write_text(json.dumps(read_config(model)))
    run_bad(["apply", model, str(tmp_path / "config_as_key.json"), out], capsys, "config_as_key.json", "not a tier key")
    run_bad(["apply", str(tmp_path / "no_model"), key, out], capsys, "no_model")
    assert sorted(os.listdir(tmp_path)) == ["config_as_key.json", "key.json"]  # nothing left behind


def test_inputs_apart_from_the_output_and_fifos_refused(tier_model, tmp_path, capsys, monkeypatch):
    model = tier_model("llama")
    monkeypatch.setenv("TIER_PASS", "x")
    out = tmp_path / "out"
    out.mkdir()
    key = str(out / "k.json")  # the secret, inside the folder --overwrite would replace
    assert key_command(["generate", model, key, "--passphrase-env", "TIER_PASS", "-q"]) == 0
    run_bad(["apply", model, key, str(out), "--overwrite"], capsys, key, "inside the output folder")
    run_bad(["remove", model, key, str(out), "--overwrite"], capsys, key, "inside the output folder")
    assert os.listdir(out) == ["k.json"]
    run_bad(["apply", model, key, os.path.join(model, "keyed")], capsys, model, "inside the input folder")
    assert not os.path.exists(os.path.join(model, "keyed"))
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    run_bad(["generate", model, str(tmp_path / "k2.json"), "--secret-file", fifo], capsys, fifo, "FIFO")
    run_bad(["apply", model, fifo, str(tmp_path / "o")], capsys, fifo, "FIFO")
    assert not os.path.exists(tmp_path / "k2.json") and not os.path.exists(tmp_path / "o")


def test_generate_refuses_to_replace_its_inputs_and_sizes_no_model_has(tier_model, tmp_path, capsys, monkeypatch):
    import shutil
    model = str(shutil.copytree(tier_model("qwen2"), tmp_path / "model"))
    config = os.path.join(model, "config.json")
    before = open(config).read()
    monkeypatch.setenv("TIER_PASS", "open sesame")
    assert key_command(["generate", model, config, "--passphrase-env", "TIER_PASS", "--overwrite"]) == 2
    assert "the key would replace its own input" in capsys.readouterr().err and open(config).read() == before
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret bytes")
    assert key_command(["generate", model, str(secret), "--secret-file", str(secret), "--overwrite"]) == 2
    assert "the key would replace its own input" in capsys.readouterr().err and secret.read_bytes() == b"secret bytes"
    for field, value, problem in [("num_hidden_layers", 0, "num_hidden_layers 0"),
                                  ("num_hidden_layers", 10**8, "num_hidden_layers 100000000"),
                                  ("num_attention_heads", -4, "attention heads -4"),
                                  ("num_attention_heads", 0, "cannot read the qwen2 sizes")]:
        bad = tmp_path / f"{field}{value}.json"
        bad.write_text(json.dumps({**json.loads(before), field: value}))
        assert key_command(["generate", str(bad), str(tmp_path / "k.json"), "--passphrase-env", "TIER_PASS"]) == 2
        assert problem in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "k.json")


def test_key_warnings_are_one_line(tier_model, tmp_path, capsys, monkeypatch):
    """A key file with a field the format does not have gets a warning, on one line as every command's (it was
    Python's: file, line number and source)."""
    model = tier_model("qwen2")
    monkeypatch.setenv("TIER_PASS", "open sesame")
    key = str(tmp_path / "k.json")
    assert key_command(["generate", model, key, "--passphrase-env", "TIER_PASS", "-q"]) == 0
    data = json.loads(open(key).read())
    data["colour"] = "blue"
    with open(key, "w") as f:
        json.dump(data, f)
    assert key_command(["report", model, key]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "colour" in line]
    assert len(warnings) == 1 and warnings[0].startswith("merge-engine: warning: ")


def test_generate_prints_a_partial_keys_share_of_its_own_swappable_parameters(tier_model, tmp_path, capsys,
                                                                               monkeypatch):
    """The share printed is of the swappable parameters of the chosen modes, what --fraction counts (it was of the
    whole blocks': 9% for a 24% key), and the same as `key report` gives."""
    model, out = tier_model("gpt_neo"), str(tmp_path / "k.json")
    printed = generate_key_file(model, out, monkeypatch, capsys, "--fraction", "0.3", "--attention-share", "0.2",
                                "--attn-mode", "out", "--mlp-mode", "up")
    report = key_report(model, TierKey.load(out))
    assert 0.25 < report.fraction_of_swappable <= 0.3
    assert f"({100 * report.fraction_of_swappable:.2f}% of the {report.swappable_params:,} swappable)" in printed
