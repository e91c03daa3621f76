"""Every code block of the README and docs/ runs as pasted: each ```python block in a fresh interpreter,
each ```bash block in bash, from an empty folder, on the CPU. The blocks that set up machines are the
exceptions, each run elsewhere: the two commands (.ci/run runs tools/test.sh; tools/demo.sh runs
python -m merge_engine.demo, tested in tests/test_engine.py) and the install commands
(tools/check_install.sh installs from a wheel in a bare venv on every full test run). Usage templates
with placeholder paths are fenced as ```text, so every ```bash block is a command that runs. Each ```yaml block
that is a whole config (one with a merge_method) is a valid one: a merge config as --strict reads it, or a
SEARCH.yml; blocks of a config's keys alone (a tokenizer setting) are fragments."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from merge_engine.config import parse_config
from merge_engine.search.spaces import parse_search_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_ELSEWHERE = ("tools/demo.sh", "tools/test.sh", "pip install", "OUT=", "bash tools/gpu_check.sh")
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.M | re.S)
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)


def blocks():
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            language, code = match.groups()
            line = text.count("\n", 0, match.start()) + 1
            if language == "bash" and code.lstrip().startswith(RUN_ELSEWHERE):
                continue
            yield pytest.param(language, code, id=f"{page.relative_to(ROOT)}:{line}")


def yaml_configs():
    for page in PAGES:
        text = page.read_text()
        for match in YAML_BLOCK.finditer(text):
            config = yaml.safe_load(match.group(1))
            if "merge_method" in config:
                line = text.count("\n", 0, match.start()) + 1
                yield pytest.param(config, id=f"{page.relative_to(ROOT)}:{line}")


def test_the_pages_have_code_to_run():
    assert len(list(blocks())) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("language, code", list(blocks()))
def test_code_block_runs_as_pasted(language, code, tmp_path):
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    assert "Traceback" not in run.stderr


def test_the_pages_have_configs():
    assert len(list(yaml_configs())) >= 3


@pytest.mark.parametrize("config", list(yaml_configs()))
def test_config_block_is_valid(config):
    """Names of methods, parameters and search settings as the engine reads them (no model folder is opened)."""
    if "search" in config:
        parse_search_config(config)
    else:
        parse_config(config, strict=True)
