"""Diagonal Fisher information of a causal language model, for Fisher merging (Matena and Raffel,
"Merging Models with Fisher-Weighted Averaging", arXiv 2111.09832).

Definitions
-----------
An example is one sequence x_1..x_T. Its log-likelihood is the sum over its next-token positions
(both the context token and the target token real, i.e. not padding) of log p(y_t | x_<=t):

    l(x) = sum_t log p_theta(y_t | x_1..x_t)

- empirical Fisher: y_t = x_{t+1}, the observed next token;
- sampled ("true") Fisher: y_t is drawn from the model's own predictive distribution
  softmax(logits_t) (detached), by a torch.Generator seeded anew for each batch from `seed` and the
  batch's number (batch_seed), so runs are deterministic and the draws do not depend on which process
  of a distributed run takes a batch. The context stays the observed text (teacher forcing); only the
  targets are sampled.

The Fisher of parameter theta is F = (1/N) sum_i g_i^2 with g_i = d l(x_i) / d theta, over the N
examples that have at least one next-token position.

- per_example=True ("per_example" granularity): one backward per example, F += g_i^2. Exact.
- per_example=False ("per_batch", cheaper): one backward per batch B of the mean log-likelihood,
  g_B = (1/|B|) sum_{i in B} g_i, and F += |B|^2 g_B^2 = (sum_{i in B} g_i)^2. This is an approximation
  of the same quantity: (sum_i g_i)^2 = sum_i g_i^2 + the cross terms g_i g_j (i != j), whose mean is
  zero where the per-example gradients are independent with zero mean, which holds for the sampled
  Fisher (E_y[grad log p(y)] = 0), so there F is unbiased; for the empirical Fisher the cross terms
  stay. With |B| = 1 it equals per_example.

The model runs in eval mode (dropout off). Each parameter's gradient is folded into its Fisher
buffer by `accumulate_fisher` (fp32 math) from a post-accumulate-grad hook, which then frees it,
so memory holds one model, one Fisher buffer per parameter and only transient gradients (never a
full gradient set). Parameters are the floating ones with requires_grad, named as in
model.named_parameters() (tied weights once).

fisher_dtype=bfloat16 halves the buffers' memory at a precision cost: every accumulation step is
rounded to bf16 (8 significant bits, ~0.4% relative), and once a running sum is a few hundred times
one step's contribution, those contributions are partly rounded away, so long runs are biased low
(measured on squared Gaussians: ~1% low after 100 steps, ~4% after 300, ~18% after 1000). A step is
one backward (one batch, or one example with per_example); a warning is logged past 128 steps.
Prefer per-batch granularity with large batches, or fp32 storage, for long runs.

The result is saved as a Fisher folder, in the format merge_engine/io/fishers.py describes and reads.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from merge_engine.devices import resolve_device
from merge_engine.distributed import (
    Ranks,
    broadcast,
    check_same_plan,
    current_ranks,
    data_digest,
    every_rank,
    own_items,
    rank_device,
    sum_counts,
    sum_over_ranks,
)
from merge_engine.dtypes import dtype_name
from merge_engine.errors import MergeEngineError
from merge_engine.io.fishers import MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, VARIANTS
from merge_engine.io.writer import ShardedWriter, check_output_dir
from merge_engine.ops.fisher import FISHER_DTYPES, accumulate_fisher
from merge_engine.progress import progress_bar
from merge_engine.stats.data import DataError, load_data
from merge_engine.stats.models import (
    check_inputs_apart,
    check_model_folder,
    checkpoint_naming,
    load_model,
    resolve_max_length,
    vocab_size_of,
)

log = logging.getLogger("merge_engine")


@dataclass
class FisherResult:
    fisher: dict[str, torch.Tensor]  # parameter name -> diagonal Fisher, in fisher_dtype
    examples: int  # N: examples with at least one next-token position
    tokens: int  # next-token positions (log-likelihood terms) over all examples
    variant: str
    granularity: str
    seed: int


# ---- log-likelihoods ----

def sequence_log_likelihoods(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-likelihood of each sequence, next-token positions of each sequence).

    Targets are the observed next tokens, or draws from softmax(logits) when a generator is given.
    Only positions whose context and target tokens are both real count."""
    real = attention_mask.bool()
    targets_mask = real[:, :-1] & real[:, 1:]
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    predicted = logits[:, :-1][targets_mask].to(compute_dtype)  # (positions, vocab)
    if generator is None:
        targets = input_ids[:, 1:][targets_mask]
    else:
        probs = predicted.detach().softmax(-1)
        targets = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    token_ll = -F.cross_entropy(predicted, targets, reduction="none")
    rows = torch.arange(len(input_ids), device=logits.device).unsqueeze(1).expand_as(targets_mask)[targets_mask]
    ll = torch.zeros(len(input_ids), dtype=compute_dtype, device=logits.device).index_add(0, rows, token_ll)
    return ll, targets_mask.sum(1)


def single_examples(batch: dict[str, torch.Tensor]):
    """Each row of a batch as a batch of one, without its trailing padding."""
    for row in range(len(batch["input_ids"])):
        mask = batch["attention_mask"][row]
        real = mask.nonzero()
        end = int(real.max()) + 1 if len(real) else 0
        yield {"input_ids": batch["input_ids"][row:row + 1, :end], "attention_mask": mask[None, :end]}


# ---- accumulation ----

class _FisherAccumulator:
    """Fisher buffers fed by post-accumulate-grad hooks; `scale` is set before each backward."""

    def __init__(self, model: torch.nn.Module, fisher_dtype: torch.dtype):
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
        if not self.params:
            raise ValueError("compute_fisher: the model has no floating parameter with requires_grad")
        self.fisher = {name: torch.zeros(p.shape, dtype=fisher_dtype, device=p.device)
                       for name, p in self.params.items()}
        self.scale = 1.0
        self._handles = []
        for name, p in self.params.items():
            p.grad = None  # a stale gradient would be counted in the first step
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(name)))

    def _hook(self, name: str):
        def fold_and_free(param: torch.Tensor) -> None:
            accumulate_fisher(self.fisher[name], param.grad, self.scale)
            param.grad = None
        return fold_and_free

    def __enter__(self) -> _FisherAccumulator:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _backward_step(model, batch, generator, acc: _FisherAccumulator) -> tuple[int, int]:
    """Backward of the mean log-likelihood of a batch (bounded gradients in a 16-bit model), folded with
    scale |B|^2, so that F gets the square of the summed log-likelihood's gradient; -> (examples, tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    ll, positions = sequence_log_likelihoods(logits, batch["input_ids"], batch["attention_mask"], generator)
    examples = int((positions > 0).sum())
    if examples == 0:
        return 0, 0
    acc.scale = float(examples) ** 2
    (ll.sum() / examples).backward()
    return examples, int(positions.sum())


def batch_seed(seed: int, number: int) -> int:
    """The sampled Fisher's generator seed for batch `number` (its place among all the job's batches)."""
    return (seed * 0x9E3779B97F4A7C15 + number * 0xBF58476D1CE4E5B9 + 1) % 2**63


def compute_fisher(model: torch.nn.Module, batches, variant: str = "empirical", per_example: bool = False,
                   seed: int = 0, fisher_dtype: torch.dtype = torch.float32, progress: bool = True,
                   gradient_checkpointing: bool = False, ranks: Ranks | None = None) -> FisherResult:
    """Diagonal Fisher of every trainable floating parameter over batches ({"input_ids", "attention_mask"},
    right-padded; see merge_engine.stats.data). Definitions in the module docstring. With ranks, batches
    is this rank's share (distributed.own_items: the job's batches rank, rank + size, ...); the sums and
    counts are added up across ranks (in float64) before the division."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if fisher_dtype not in FISHER_DTYPES:
        raise ValueError(f"fisher_dtype must be one of {FISHER_DTYPES}, got {fisher_dtype}")
    device = next(model.parameters()).device
    generator = torch.Generator(device) if variant == "sampled" else None
    first, stride = (ranks.rank, ranks.size) if ranks else (0, 1)  # this rank's i-th batch: the job's first + i * stride
    with _FisherAccumulator(model, fisher_dtype) as acc, _fisher_mode(model, gradient_checkpointing):
        examples = tokens = steps = 0
        total = sum(len(b["input_ids"]) for b in batches) if hasattr(batches, "__len__") else None
        # a step: a rank that fails on its batches stops the others here, not in the sums' collectives
        with progress_bar(total=total, unit="ex", desc="fisher", disable=not progress) as bar, \
                every_rank(ranks, "computing the Fisher"):
            for i, batch in enumerate(batches):
                if generator is not None:
                    generator.manual_seed(batch_seed(seed, first + i * stride))
                batch = {k: v.to(device) for k, v in batch.items()}
                for step in (single_examples(batch) if per_example else [batch]):
                    n, t = _backward_step(model, step, generator, acc)
                    examples, tokens, steps = examples + n, tokens + t, steps + (n > 0)
                bar.update(len(batch["input_ids"]))
    examples, tokens = sum_counts(ranks, {"examples": examples, "tokens": tokens}).values()
    for f in acc.fisher.values():
        f.copy_(sum_over_ranks(ranks, f))
    if examples == 0:
        raise MergeEngineError("no example has a next-token position (every example is shorter than 2 tokens)")
    finish(acc.fisher, examples)
    warn_if_swamped(steps, fisher_dtype)
    return FisherResult(acc.fisher, examples, tokens, variant, "per_example" if per_example else "per_batch", seed)


def finish(fisher: dict[str, torch.Tensor], examples: int) -> None:
    """Divide the sums by N (in fp32) and check that every value is finite."""
    for name, f in fisher.items():
        f.copy_(f.float() / examples)
        if not torch.isfinite(f).all():
            raise MergeEngineError(f"the Fisher of '{name}' has non-finite values (gradients overflowed; "
                                   "try a float32 model)")


def warn_if_swamped(steps: int, fisher_dtype: torch.dtype) -> None:
    """Past about 1/eps steps, one step's contribution nears half an ulp of the running sum and is
    partly rounded away (bf16: 128 steps; measured bias ~1% low at 100 steps, ~18% at 1000)."""
    if steps * torch.finfo(fisher_dtype).eps > 1:
        log.warning("%d accumulation steps into %s Fisher buffers: late contributions are partly rounded away, "
                    "so the Fisher is biased low (bfloat16: ~1%% at 100 steps, ~18%% at 1000); use float32 "
                    "storage or larger batches", steps, dtype_name(fisher_dtype))


@contextmanager
def _fisher_mode(model: torch.nn.Module, gradient_checkpointing: bool):
    """Eval mode (dropout off), optionally with gradient checkpointing; the model's modes are restored after."""
    was_training = model.training
    try:
        model.eval()
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        yield
    finally:
        if gradient_checkpointing:
            disable_gradient_checkpointing(model)
        model.train(was_training)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    # transformers checkpoints a layer only in training mode: set that flag on the checkpointing modules
    # alone, so their dropout submodules stay in eval mode.
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


def disable_gradient_checkpointing(model: torch.nn.Module) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


# ---- saving ----

def save_fisher(result: FisherResult, out_dir: str, model_path: str, max_length: int | None,
                overwrite: bool = False, shard_size: int = 5 * 10**9) -> dict:
    """Write the Fisher tensors (safetensors shards) and fisher.json atomically; return the manifest
    (fields in merge_engine/io/fishers.py)."""
    entries = [(name, f.dtype, tuple(f.shape)) for name, f in result.fisher.items()]
    writer = ShardedWriter(out_dir, entries, shard_size, overwrite)
    try:
        sum_squares = 0.0
        for name, f in result.fisher.items():
            host = f.detach().cpu()
            sum_squares += float(host.double().square().sum())
            writer.write(name, host)
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "model": model_path,
                    "variant": result.variant, "granularity": result.granularity, "examples": result.examples,
                    "tokens": result.tokens, "dtype": dtype_name(entries[0][1]), "seed": result.seed,
                    "max_length": max_length, "sum_squares": sum_squares, "tensors": len(entries)}
        writer.add_file(MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return manifest


# ---- the whole run ----

@dataclass
class FisherOptions:
    variant: str = "empirical"
    per_example: bool = False
    batch_size: int = 8
    max_length: int | None = None  # None: 512, or the model's positions when fewer (models.resolve_max_length)
    max_examples: int | None = None
    seed: int = 0
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto"
    dtype: torch.dtype | None = None  # the model's compute dtype; None: as stored in the checkpoint
    fisher_dtype: torch.dtype = torch.float32
    gradient_checkpointing: bool = False
    overwrite: bool = False
    quiet: bool = False
    shard_size: int = 5 * 10**9
    tokenizer: object = field(default=None, repr=False)  # a tokenizer object; None: the model folder's


def collect_fisher(model_dir: str, data_path: str, out_dir: str, options: FisherOptions | None = None) -> dict:
    """Validate everything, load the model and data, compute the Fisher and save it; return the manifest.

    Inputs are checked before any compute (output folder, model folder, tokenizer, data file), and
    nothing is written unless the whole run succeeds. Called on every rank of an initialised
    torch.distributed process group, the ranks share the batches and rank 0 writes the folder."""
    options = options or FisherOptions()
    ranks = current_ranks()
    with every_rank(ranks, "checking the inputs and loading the model"):
        check_inputs_apart(out_dir, model_dir, data_path, options.tokenizer)
        check_output_dir(out_dir, options.overwrite)
        device = rank_device(resolve_device(options.device), ranks)
        config = check_model_folder(model_dir)
        options = replace(options, max_length=resolve_max_length(model_dir, config, options.max_length))
        tokenizer = model_dir if options.tokenizer is None else options.tokenizer
        data = load_data(data_path, tokenizer, options.max_length, options.max_examples, vocab_size_of(config))
        if all(len(seq) < 2 for seq in data.sequences):
            raise DataError(f"{data_path}: no example has 2 or more tokens, so there is no next token to predict")
        model = load_model(model_dir, options.dtype, device)
    if ranks:  # the digest costs a pass over the data
        check_same_plan(ranks, data_digest(model_dir, data.sequences, options, out_dir))
    result = compute_fisher(model, own_items(data.batches(options.batch_size), ranks), options.variant,
                            options.per_example, options.seed, options.fisher_dtype, not options.quiet,
                            options.gradient_checkpointing, ranks)
    stored_name = checkpoint_naming(model, model_dir)
    result = replace(result, fisher={stored_name(name): f for name, f in result.fisher.items()})
    manifest = None
    with every_rank(ranks, "saving the Fisher"):
        if ranks is None or ranks.leader:
            manifest = save_fisher(result, out_dir, os.path.abspath(model_dir), options.max_length,
                                   options.overwrite, options.shard_size)
    return manifest if ranks is None else broadcast(ranks, manifest)
