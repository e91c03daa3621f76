"""Argument types, options and log lines the subcommands share."""
import argparse
import io
import logging
import re

import pytest

from merge_engine.cli.args import LineHandler, parse_size, positive_int, shard_size
from merge_engine.progress import progress_bar


def test_parse_size():
    assert parse_size("5B") == 5 * 10**9 and parse_size("500M") == 5 * 10**8 and parse_size("123") == 123
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_positive_int():
    assert positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int("0")


def test_shard_size():
    assert shard_size("1") == 1 and shard_size("0.5K") == 500
    assert shard_size("0") == shard_size("0B") == shard_size("0.0K") == 0  # no limit, as mergekit's --out-shard-size 0
    for text in ("0.1", "0.0001K"):  # a fraction of a byte would round down to that 0
        with pytest.raises(argparse.ArgumentTypeError, match=f"or a size of at least 1 byte, got {text}"):
            shard_size(text)


@pytest.mark.parametrize("command", ["stats", "fisher", "key report", "key apply", "patch norms", "patch extract",
                                     "patch recover"])
def test_every_command_takes_verbose_for_the_traceback_of_a_failure(command, tmp_path, capsys):
    """-v, which merge and search took, was refused by the other commands ('unrecognized arguments: -v'): their
    failures could not be shown with a traceback, as the one-line error says it is."""
    from merge_engine import cli
    missing = [str(tmp_path / name) for name in ("model", "data", "out")]
    argv = [*command.split(), "-v", *missing[:{"patch recover": 1, "patch norms": 2}.get(command, 3)]]
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse refusing the arguments
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" in err and err.splitlines()[-1].startswith("merge-engine: error: "), err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_warning_during_a_progress_bar_on_a_terminal_is_a_line_of_its_own():
    """A merge's warning about a tensor, logged while its progress bar is shown, was written after the bar's text,
    on the bar's line."""
    terminal = Terminal()
    handler = LineHandler(terminal)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    with progress_bar(total=2, desc="merging", disable=False, file=terminal, mininterval=0) as bar:
        bar.update(1)
        handler.emit(logging.makeLogRecord({"msg": "tensor 'x': 1 merged value(s) are NaN or Inf"}))
        bar.update(1)
    lines = re.split("[\r\n]", terminal.getvalue())
    assert "warning: tensor 'x': 1 merged value(s) are NaN or Inf" in lines, lines
    assert lines[-2].startswith("merging: 100%"), lines  # the bar drawn again below it


def test_verbose_logs_the_commands_debug_lines_not_other_libraries():
    """-v set every logger to debug: a search with an lm_eval objective logged hundreds of filelock and datasets
    lines per trial. Other libraries' warnings still show, named (they read as merge_engine's)."""
    import subprocess
    import sys
    code = ("import logging; from merge_engine.cli.args import setup_logging; setup_logging(False, True); "
            "logging.getLogger('filelock').debug('lock acquired'); logging.getLogger('datasets').info('torch found'); "
            "logging.getLogger('merge_engine.plan').debug('own debug'); logging.getLogger('lm_eval').warning('theirs')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.splitlines() == ["own debug", "merge-engine: warning: lm_eval: theirs"], err


@pytest.mark.parametrize("choice, shown", [(None, 2), ("ignore", 0), ("always", 3)])
def test_the_users_warning_filters_are_kept(choice, shown):
    """The command shows each warning once per place, unless the user chose with -W or PYTHONWARNINGS (which
    setting up the command's logging overrode)."""
    import os
    import subprocess
    import sys
    code = ("import warnings; from merge_engine.cli.args import setup_logging; setup_logging(False)\n"
            "for text in ('a', 'a', 'b'): warnings.warn(text)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    err = subprocess.run([sys.executable, *(["-W", choice] if choice else []), "-c", code], capture_output=True,
                         text=True, check=True, env=env).stderr
    assert err.count("merge-engine: warning:") == shown, err
