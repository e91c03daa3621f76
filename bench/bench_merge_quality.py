"""Merge quality on a small real testbed: four experts fine-tuned from one tiny BERT on digit tasks whose
inputs differ, merged by each method through the engine, scored per task on held-out test images.

    python bench/bench_merge_quality.py [--seed 0] [--quick] [--out DIR] [--threads 1]

Needs transformers and optuna (the hf and tune extras) and scikit-learn (the bench extra). About 3-4
minutes on one core; a default run is deterministic for a given seed.

Data: scikit-learn's bundled digits (1797 8x8 images, pixel values 0..16), each image a "sentence" of 64
word tokens `v0`..`v16` in row-major order, read by a word-level tokenizer saved with every model folder
(so `merge-engine stats` tokenizes the text files as it would any user's). Splits 60/20/20 by seed.
Tasks (inputs differ between tasks, which is where input Grams carry information):
    T1 digits 0-4, plain    T2 digits 5-9, plain    T3 all digits, mirrored    T4 all digits, inverted (16 - v)
Model: BertForSequenceClassification, hidden 64, 2 layers, 4 heads, 10 labels for every task. The base is
pretrained briefly on all plain digits; each expert is fine-tuned from it on one task (Adam).

Merged: the backbone (embeddings, encoder, pooler). Model folders hold the backbone (BertModel) and the
tokenizer; each model's classifier is kept aside and, as is usual in merging benchmarks, task t is scored
with expert t's own head on top of the merged backbone (the base's row too). (Backbone folders also keep
Gram and weight names aligned: `merge-engine stats` loads a BertForSequenceClassification folder as a
bare BertModel, so its Grams would be named `encoder.*` beside weights named `bert.encoder.*`, and the
merge refuses them; check_gram_coverage stops the run if any linear weight lacks its Gram.) Grams: collect_grams (what
`merge-engine stats` runs) on a text file of up to 300 of the expert's training inputs.
Each method's main coefficient is chosen on the validation sets' mean accuracy (a small grid, the same
kind of search for every method); the table reports test accuracy at that choice.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import optuna
import torch
import transformers as tf
from common import machine
from safetensors.torch import save_file

from merge_engine.config import parse_config
from merge_engine.engine import MergeOptions, merge
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.grams import gram_folder
from merge_engine.methods import REGISTRY
from merge_engine.ops import backends
from merge_engine.stats.gram import GramOptions, collect_grams
from merge_engine.tuning import BMMProblem, tune_bmm

TASKS = {  # name -> (digits kept, image transform)
    "T1": (range(0, 5), lambda img: img),
    "T2": (range(5, 10), lambda img: img),
    "T3": (range(10), lambda img: img.reshape(8, 8)[:, ::-1].reshape(64)),
    "T4": (range(10), lambda img: 16 - img),
}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
SPLITS = ("train", "val", "test")
GRAM_EXAMPLES = 300
TA_LAMBDAS = [round(0.1 * i, 1) for i in range(2, 11)]
TIES_GRID = [(d, lam) for d in (0.2, 0.5, 0.8) for lam in (0.6, 0.8, 1.0, 1.2)]
BMM_LAMBDAS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
REGMEAN_ALPHAS = [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
SVD_ALPHAS = [0.5, 0.75, 1.0, 1.25, 1.5]


@dataclass
class Settings:
    seed: int
    pretrain_epochs: int
    expert_epochs: int
    bmm_trials: int


@dataclass
class Row:
    method: str
    setting: str
    val: float | None  # mean validation accuracy (None: not measured)
    test: list[float]
    seconds: float


@dataclass
class Bench:
    out: str
    tokenizer: object
    model_config: tf.BertConfig
    data: dict  # task -> split -> (input_ids, labels, texts)
    heads: dict = field(default_factory=dict)  # task -> classifier state of its expert
    scorer: torch.nn.Module | None = None
    times: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)  # grid label -> [(setting, mean validation accuracy)]

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - start


# ---- data and tokenizer ----

def digit_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"v{v}" for v in range(17)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # [CLS] first: BERT's pooler reads the first token
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                      cls_token="[CLS]", sep_token="[SEP]")


def load_tasks(tokenizer, seed: int) -> dict:
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = digits.data.astype(np.int64), digits.target
    order = np.random.RandomState(seed).permutation(len(images))
    cut = [int(0.6 * len(order)), int(0.8 * len(order))]
    split_idx = dict(zip(SPLITS, np.split(order, cut)))
    data = {"pretrain": {}}
    for task, (kept, transform) in TASKS.items():
        data[task] = {}
        for split, idx in split_idx.items():
            idx = idx[np.isin(labels[idx], list(kept))]
            texts = [" ".join(f"v{v}" for v in transform(images[i])) for i in idx]
            ids = torch.tensor(tokenizer(texts)["input_ids"])
            data[task][split] = (ids, torch.tensor(labels[idx]), texts)
    data["pretrain"]["train"] = _concat(data["T1"]["train"], data["T2"]["train"])  # all plain digits
    return data


def _concat(a, b):
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), a[2] + b[2]


# ---- training ----

def train(model, ids, labels, epochs: int, lr: float, seed: int, batch: int = 32) -> None:
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ids), generator=order).split(batch):
            loss = model(input_ids=ids[idx], labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model, ids, labels) -> float:
    return float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())


def save_backbone(bench: Bench, model, name: str) -> str:
    """The backbone as a model folder (BertModel + tokenizer); the head kept aside."""
    path = os.path.join(bench.out, "models", name)
    model.bert.save_pretrained(path)
    bench.tokenizer.save_pretrained(path)
    return path


def build_models(bench: Bench, s: Settings) -> tuple[str, dict[str, str]]:
    torch.manual_seed(s.seed)
    model = tf.BertForSequenceClassification(bench.model_config)
    with bench.stage("pretrain base"):
        ids, labels, _ = bench.data["pretrain"]["train"]
        train(model, ids, labels, s.pretrain_epochs, 2e-3, s.seed)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = save_backbone(bench, model, "base")
    experts = {}
    for i, task in enumerate(TASKS):
        with bench.stage(f"fine-tune {task}"):
            model.load_state_dict(base_state)
            ids, labels, _ = bench.data[task]["train"]
            train(model, ids, labels, s.expert_epochs, 1e-3, s.seed + 1 + i)
        experts[task] = save_backbone(bench, model, task)
        bench.heads[task] = {k: v.clone() for k, v in model.classifier.state_dict().items()}
        os.makedirs(os.path.join(bench.out, "heads"), exist_ok=True)
        save_file(bench.heads[task], os.path.join(bench.out, "heads", f"{task}.safetensors"))
    return base, experts


def collect_expert_grams(bench: Bench, experts: dict[str, str]) -> dict[str, str]:
    grams = {}
    for task, path in experts.items():
        text = os.path.join(bench.out, "data", f"{task}-train.txt")
        os.makedirs(os.path.dirname(text), exist_ok=True)
        with open(text, "w") as f:
            f.write("\n".join(bench.data[task]["train"][2][:GRAM_EXAMPLES]) + "\n")
        grams[task] = os.path.join(bench.out, "grams", task)
        with bench.stage(f"grams {task}"):
            collect_grams(path, text, grams[task], GramOptions(batch_size=32, device="cpu", quiet=True, overwrite=True))
    check_gram_coverage(experts, grams)
    return grams


def check_gram_coverage(experts: dict[str, str], grams: dict[str, str]) -> None:
    """Every linear weight of the backbone must have a Gram: regmean / bmm merge a weight without one by
    their wrapped method, silently (the engine refuses only a Grams folder that matches no weight), and
    the table would measure that instead."""
    for task, path in experts.items():
        ckpt = Checkpoint(path)
        linear = [n for n, t in ckpt.tensors.items() if len(t.shape) == 2 and n.endswith(".weight")
                  and "embeddings" not in n]
        missing = [n for n in linear if gram_folder(grams[task]).module_of(n) is None]
        if missing:
            sys.exit(f"{grams[task]}: no Gram for {len(missing)} of {len(linear)} linear weights, e.g. {missing[:2]}")


# ---- scoring ----

def read_state(path: str) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def scores(bench: Bench, backbone: dict[str, torch.Tensor], split: str) -> list[float]:
    """Per-task accuracy of the backbone with each task's own expert head."""
    bench.scorer.bert.load_state_dict(backbone)
    out = []
    for task in TASKS:
        bench.scorer.classifier.load_state_dict(bench.heads[task])
        ids, labels, _ = bench.data[task][split]
        out.append(accuracy(bench.scorer, ids, labels))
    return out


# ---- merges ----

def config(method: str, base: str | None, experts: dict[str, str], params: dict, grams: dict | None = None) -> dict:
    models = [{"model": p, **({"grams": grams[t]} if grams else {})} for t, p in experts.items()]
    return {"merge_method": method, "dtype": "float32", "models": models, "parameters": params,
            **({"base_model": base} if base else {})}


def run_merge(bench: Bench, name: str, cfg: dict) -> dict[str, torch.Tensor]:
    out = os.path.join(bench.out, "merges", name)
    merge(parse_config(cfg), out, MergeOptions(device="cpu", quiet=True, overwrite=True))
    return read_state(out)


def grid(bench: Bench, label: str, values: list, make_config, describe) -> tuple[Row, object]:
    """Merge at every value, keep the one with the best mean validation accuracy (first on ties)."""
    start = time.perf_counter()
    best = None
    for value in values:
        state = run_merge(bench, label, make_config(value))
        val = float(np.mean(scores(bench, state, "val")))
        bench.curves.setdefault(label, []).append((describe(value), val))
        if best is None or val > best[0]:
            best = (val, value, state)
    val, value, state = best
    row = Row(label, describe(value), val, scores(bench, state, "test"), time.perf_counter() - start)
    return row, value


def merge_rows(bench: Bench, base: str, experts: dict[str, str], grams: dict[str, str], s: Settings) -> list[Row]:
    rows = []
    start = time.perf_counter()
    state = run_merge(bench, "linear", config("linear", None, experts, {"weight": 1.0}))
    rows.append(Row("linear (average)", "equal weights", float(np.mean(scores(bench, state, "val"))),
                    scores(bench, state, "test"), time.perf_counter() - start))

    row, ta_lambda = grid(bench, "task_arithmetic", TA_LAMBDAS,
                          lambda lam: config("task_arithmetic", base, experts, {"weight": 1.0, "lambda": lam}),
                          lambda lam: f"lambda {lam}")
    rows.append(row)
    rows.append(grid(bench, "ties", TIES_GRID,
                     lambda v: config("ties", base, experts, {"weight": 1.0, "density": v[0], "lambda": v[1]}),
                     lambda v: f"density {v[0]}, lambda {v[1]}")[0])
    for method in ("tsv", "iso_c"):
        if method in REGISTRY:
            rows.append(grid(bench, method, SVD_ALPHAS, lambda a, m=method: config(m, base, experts, {"alpha": a}),
                             lambda a: f"alpha {a}")[0])

    start = time.perf_counter()
    state = run_merge(bench, "regmean", config("regmean", base, experts, {"alpha": 0.9}, grams))
    rows.append(Row("regmean", "alpha 0.9", float(np.mean(scores(bench, state, "val"))), scores(bench, state, "test"),
                    time.perf_counter() - start))
    rows.append(grid(bench, "regmean, alpha on val", REGMEAN_ALPHAS,
                     lambda a: config("regmean", base, experts, {"alpha": a}, grams), lambda a: f"alpha {a}")[0])

    anchor = {"weight": 1.0, "anchor_lambda": ta_lambda}  # the tuned task arithmetic as the prior mean
    bmm = lambda lam, **extra: config("bmm", base, experts, {**anchor, "lambda": lam, **extra}, grams)  # noqa: E731
    rows.append(grid(bench, "bmm", BMM_LAMBDAS, bmm, lambda lam: f"lambda {lam}, anchor TA {ta_lambda}")[0])
    rows.append(tuned_bmm(bench, bmm(1.0), s))
    rows.append(grid(bench, "bmm data_free", BMM_LAMBDAS,
                     lambda lam: config("bmm", base, experts, {**anchor, "lambda": lam, "data_free": True}),
                     lambda lam: f"lambda {lam}, anchor TA {ta_lambda}")[0])
    return rows


def tuned_bmm(bench: Bench, cfg: dict, s: Settings) -> Row:
    """tune_bmm (per-layer lambda, Bayesian optimisation on mean validation accuracy), then its config merged."""
    start = time.perf_counter()
    problem = BMMProblem(cfg, device="cpu", progress=False)
    result = tune_bmm(problem, lambda state: float(np.mean(scores(bench, state, "val"))), n_trials=s.bmm_trials,
                      granularity="block", seed=s.seed, progress=False)
    state = run_merge(bench, "bmm-tuned", result.config)
    lambdas = ", ".join(f"{g.split()[-1]}: {lam:.3g}" for g, lam in sorted(result.group_lambdas.items()))
    chosen = f"block lambdas {{{lambdas}}}" if lambdas else "the config's lambda (no trial beat it)"
    return Row("bmm, tune_bmm", f"{result.trials} trials, {chosen}", result.score,
               scores(bench, state, "test"), time.perf_counter() - start)


# ---- output ----

def print_table(rows: list[Row]) -> None:
    print("| model | setting (chosen on validation) | val mean | " + " | ".join(TASKS) + " | test mean | s |")
    print("|---|---|---|" + "---|" * len(TASKS) + "---|---|")
    for r in rows:
        accs = " | ".join(f"{100 * a:.1f}" for a in r.test)
        val = "-" if r.val is None else f"{100 * r.val:.1f}"
        print(f"| {r.method} | {r.setting} | {val} | {accs} | {100 * np.mean(r.test):.1f} | {r.seconds:.1f} |")


def reference_rows(bench: Bench, base: str, experts: dict[str, str]) -> list[Row]:
    """The individual ceiling (expert t on task t) and the base; prints the full expert x task matrix."""
    matrix = {t: scores(bench, read_state(p), "test") for t, p in experts.items()}
    print("expert x task test accuracy (each task with its own expert's head):\n")
    print("| expert | " + " | ".join(TASKS) + " |\n|---|" + "---|" * len(TASKS))
    for t, accs in matrix.items():
        print(f"| {t} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")
    print()
    individual = [matrix[t][i] for i, t in enumerate(TASKS)]
    base_state = read_state(base)
    return [Row("individual (expert t on task t)", "-", None, individual, 0.0),
            Row("base (pretrained)", "-", float(np.mean(scores(bench, base_state, "val"))),
                scores(bench, base_state, "test"), 0.0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="few epochs and trials: a smoke run, not a measurement")
    p.add_argument("--out", default=None, help="work folder (default: a temporary folder, removed at the end)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; the tiny model's ops are overhead-bound, and 2 threads on a busy 2-core "
                        "machine made a training step 7x slower than 1")
    args = p.parse_args()
    s = Settings(args.seed, 3, 2, 5) if args.quick else Settings(args.seed, 16, 10, 20)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    optuna.logging.get_logger("optuna")  # creates optuna's handler, to filter its GP sampler's note on greenlet
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(lambda record: "greenlet" not in record.getMessage())
    with contextlib.ExitStack() as stack:
        out = args.out or stack.enter_context(tempfile.TemporaryDirectory(prefix="merge-quality-"))
        run(out, s, args.quick)


def run(out: str, s: Settings, quick: bool) -> None:
    began = time.perf_counter()
    backend = backends.cpu_extension()  # built on first use: timed apart from the Gram collection
    kernels = time.perf_counter() - began
    print(f"device: {machine(torch.device('cpu'))}; torch {torch.__version__}; transformers {tf.__version__}; "
          f"python {platform.python_version()}; backend: {getattr(backend, '__name__', 'none')}")
    print(f"seed {s.seed}{' (quick)' if quick else ''}; pretrain {s.pretrain_epochs} epochs, experts {s.expert_epochs} "
          f"epochs; tune_bmm {s.bmm_trials} trials; work folder {out}\n")
    tokenizer = digit_tokenizer()
    cfg = tf.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=72, num_labels=10, pad_token_id=0,
                        initializer_range=0.2)  # learns these 64-token images ~2x faster than BERT's 0.02
    bench = Bench(out, tokenizer, cfg, load_tasks(tokenizer, s.seed), times={"load CPU kernels": kernels})
    bench.scorer = tf.BertForSequenceClassification(cfg).eval()
    print("examples (train/val/test): " + ", ".join(
        f"{t} {'/'.join(str(len(bench.data[t][sp][1])) for sp in SPLITS)}" for t in TASKS) + "\n")
    base, experts = build_models(bench, s)
    grams = collect_expert_grams(bench, experts)
    rows = reference_rows(bench, base, experts)
    rows += merge_rows(bench, base, experts, grams, s)
    print("merged backbone + task t's expert head on task t; test accuracy (%):\n")
    print_table(rows)
    print("\nmean validation accuracy (%) over each grid:")
    for label, curve in bench.curves.items():
        print(f"- {label}: " + "; ".join(f"{setting} {100 * val:.1f}" for setting, val in curve))
    print("\nstage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in bench.times.items())
          + f"; total {time.perf_counter() - began:.1f}")


if __name__ == "__main__":
    main()
