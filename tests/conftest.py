"""Shared fixtures: tiny Hugging Face checkpoints generated with transformers (random init, fixed
seeds), a YAML writer, and the location of a mergekit install for the parity tests."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import zlib

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_engine.demo import make_models

# ---- constants and helpers of the numerical tests (import them from here: tests.conftest) ----

DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # the dtypes the kernels and most ops take
# odd sizes: one element, under one 16-lane vector, a 16-lane tail, past a 4096-element block, 2-D
SIZES = [(1,), (7,), (1023,), (4097,), (37, 53)]
MANTISSA = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}  # p: significant bits, the implicit one included


def seed_of(*parts) -> int:
    """A seed stable across runs (not Python's per-process str hash), from the test's parameters;
    printed, so that a failure's output names it."""
    seed = zlib.crc32(repr(parts).encode()) % 10**6
    print(f"seed {seed} for {parts}")
    return seed


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An upper bound of the ulp of the dtype at |x| (fp64): 2^-(p-1) |x|, at least that of the
    smallest normal, so subnormal results get the normal spacing, never a zero bound."""
    return 2.0 ** -(MANTISSA[dtype] - 1) * x.double().abs().clamp(min=float(torch.finfo(dtype).tiny))


@contextlib.contextmanager
def torch_default_dtype(dtype: torch.dtype):
    """torch's default dtype (process-wide) set for a block, as a caller's torch.set_default_dtype, or transformers
    building a model in another thread, sets it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def rewrite_in_place(path) -> None:
    """Write into a file as `cp` over it would: its last bytes zeroed, its modification time a second later
    (whatever the clock's resolution)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size - 4)
        f.write(b"\0" * 4)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def pairwise(*axes, where=None) -> list[tuple]:
    """A covering subset of the product of the axes (lists of values): every pair of values of any two
    axes occurs together in some returned tuple (the whole product for one or two axes), among the
    tuples for which where(*values) holds. Greedy and deterministic: each step takes the first tuple,
    in product order, that covers the most pairs not covered yet. For grids whose axes each select a
    code path (dtype, size class, mode), this keeps every path and every interaction of two of them,
    at a fraction of the product (3 x 5 x 10 axes: 50 of 150 tuples)."""
    allowed = [t for t in itertools.product(*(range(len(a)) for a in axes))
               if where is None or where(*(a[i] for a, i in zip(axes, t)))]
    if len(axes) <= 2:
        chosen = allowed
    else:
        pairs = list(itertools.combinations(range(len(axes)), 2))
        uncovered = {(i, t[i], j, t[j]) for t in allowed for i, j in pairs}
        chosen = []
        while uncovered:
            best = max(allowed, key=lambda t: sum((i, t[i], j, t[j]) in uncovered for i, j in pairs))
            chosen.append(best)
            uncovered -= {(i, best[i], j, best[j]) for i, j in pairs}
    return [tuple(a[i] for a, i in zip(axes, t)) for t in chosen]


# Fixtures that generate Hugging Face checkpoints (here, tests/tiers/conftest.py and test_compare.py's lm,
# tests/stats/conftest.py): a test that takes one runs on generated checkpoints, and is marked slow.
GENERATED_CHECKPOINTS = {"model_sets", "vocab_models", "bpe_models", "tier_model", "lm", "tiny_lm", "models",
                         "low_rank_tune", "search_models"}
# The longest tests (the CUDA compile check takes minutes; each parity test starts a mergekit process), started
# first so that the parallel workers of tools/test.sh finish together rather than one ending on them alone.
LONG_FIRST = ("tests/csrc/test_cuda_compile.py", "tests/test_parity_mergekit.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if GENERATED_CHECKPOINTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))  # stable: the rest keep their order


# (arch, dtype, shard size): Llama (MHA), Qwen2 (GQA, tied embeddings), GPT-2; sharded and unsharded.
MODEL_SETS = {
    "llama": ("llama", torch.float32, None),
    "llama_bf16_sharded": ("llama", torch.bfloat16, "60KB"),
    "qwen2": ("qwen2", torch.float32, "100KB"),
    "gpt2": ("gpt2", torch.float32, None),
}


@pytest.fixture(scope="session", autouse=True)
def temporary_files_stay_in_pytests_folder(tmp_path_factory):
    """TMPDIR for this test process and every process it starts (the pages' examples call tempfile.mkdtemp,
    torchrun makes its own folders): their temporary files land in pytest's folder, which pytest prunes,
    not in /tmp, where nothing removes them."""
    import tempfile
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmpdir"))
    tempfile.tempdir = None  # read TMPDIR again
    yield
    if previous is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def model_sets(tmp_path_factory):
    """Lazily built model sets: model_sets(key) -> [base, expert1, expert2, expert3] folders."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, list[str]] = {}

    def get(key: str) -> list[str]:
        if key not in cache:
            arch, dtype, shard = MODEL_SETS[key]
            cache[key] = make_models(str(root / key), arch, 3, dtype, shard, seed=len(cache) + 1)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def vocab_models(tmp_path_factory):
    """{base, extra, other, padded}: Llama folders whose tokenizers and vocabularies differ (tests/vocab_models.py)."""
    from tests.vocab_models import make_vocab_models
    return make_vocab_models(str(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="session")
def bpe_models(tmp_path_factory):
    """{bpe_base, bpe_other}: byte-level BPE tokenizers trained on different text (tests/vocab_models.py)."""
    from tests.vocab_models import make_bpe_models
    return make_bpe_models(str(tmp_path_factory.mktemp("bpe")))


def assert_refused_when_planning(config, out, match: str) -> None:
    """The parsed config is refused by build_plan with a ConfigError matching `match`, and merge() into `out`
    refuses it too, leaving no output folder."""
    from merge_engine import MergeOptions, merge
    from merge_engine.errors import ConfigError
    from merge_engine.plan import build_plan
    with pytest.raises(ConfigError, match=match):
        build_plan(config)
    with pytest.raises(ConfigError, match=match):
        merge(config, str(out), MergeOptions(device="cpu", quiet=True))
    assert not os.path.exists(out)


def folder_digest(folder) -> str:
    """A hash of every file's name and bytes under folder: the tests' proof that inputs were not changed."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode() + open(os.path.join(root, name), "rb").read())
    return h.hexdigest()


def _folder_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in a folder, read with the safetensors library."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


@pytest.fixture(scope="session")
def folder_tensors():
    return _folder_tensors


@pytest.fixture
def write_yaml(tmp_path):
    def write(config: dict, name: str = "merge.yml") -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return str(path)
    return write


def find_mergekit() -> str | None:
    """mergekit-yaml from $MERGEKIT_YAML, a .venv-mergekit beside the repo, /opt/mkvenv or PATH."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.environ.get("MERGEKIT_YAML"), os.path.join(repo, ".venv-mergekit", "bin", "mergekit-yaml"),
                      "/opt/mkvenv/bin/mergekit-yaml", shutil.which("mergekit-yaml")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def mergekit_yaml():
    path = find_mergekit()
    if path is None:
        pytest.skip("mergekit is not installed (set MERGEKIT_YAML or run tools/test.sh with MERGEKIT=1)")
    return path


@pytest.fixture(scope="session")
def mergekit(mergekit_yaml, tmp_path_factory):
    """run(argv): `mergekit-yaml ARGV`, through one mergekit process per test worker (tests/mergekit_runner.py);
    fails the test with mergekit's error."""
    log_path = tmp_path_factory.mktemp("mergekit") / "stderr.log"
    read_end, write_end = os.pipe()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    python = os.path.join(os.path.dirname(mergekit_yaml), "python")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, os.path.join(os.path.dirname(__file__), "mergekit_runner.py"),
                                 str(write_end)], stdin=subprocess.PIPE, stdout=log, stderr=log, text=True, env=env,
                                pass_fds=(write_end,))
    os.close(write_end)
    replies = os.fdopen(read_end)

    def run(*argv: str) -> None:
        proc.stdin.write(json.dumps(list(argv)) + "\n")
        proc.stdin.flush()
        line = replies.readline()
        assert line, f"the mergekit process ended:\n{log_path.read_text()[-3000:]}"
        reply = json.loads(line)
        assert reply["ok"], f"mergekit failed:\n{reply['error'][-3000:]}\n{log_path.read_text()[-2000:]}"

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)
    replies.close()


def pickled_copy(folder, out, shards: int = 1, tie: tuple[str, str] | None = None) -> str:
    """A copy of a safetensors model folder whose weights are torch.save files, as transformers 4 saved them:
    pytorch_model.bin, or `shards` files and pytorch_model.bin.index.json. tie=(head, embedding): the head stored
    as a second name of the embedding's storage, as a tied model's state dict holds it."""
    tensors = _folder_tensors(folder)
    if tie:
        tensors[tie[0]] = tensors[tie[1]]
    os.makedirs(out)
    for f in os.listdir(folder):
        if not f.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(os.path.join(folder, f), os.path.join(out, f))
    names = list(tensors)
    if shards == 1:
        torch.save(tensors, os.path.join(out, "pytorch_model.bin"))
        return str(out)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {name: tensors[name] for name in names[i::shards]}
        torch.save(part, os.path.join(out, file))
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(out)


def refuse_to_unlink(monkeypatch, name: str) -> None:
    """os.unlink raises PermissionError for the file `name`, as shutil.rmtree names it (relative to its folder's
    descriptor): a file that cannot be deleted (read-only, busy)."""
    unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if os.fspath(path) == name:
            raise PermissionError(1, "Operation not permitted", path)
        return unlink(path, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", refuse)
