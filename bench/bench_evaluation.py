"""Multiple-choice scoring speed: merge_engine's token_logprobs (rows shared between choices whose fed tokens one
extends, the tokens a batch's rows share fed once: a question's prompt, a few-shot block; logits formed only at
the positions asked for) against the straightforward batched scorer (one row per choice, logits and log-softmax
at every position) and, where lm_eval is installed, lm-eval-harness's own HF model (HFLM, which shares the rows
of one-token continuations), in the same run, on a random-init Llama.

Three question shapes, each N questions of 4 choices: `letters` (one-token choices, as " A"/" B"/" C"/" D" after
a P-token question that lists the options: one row per question), `phrases` (choices of 4-12 tokens after a
P-token question: the prompt fed once, then each choice) and `few-shot` (letters after one shared 4P-token block
of examples and a P/3-token question, as lm-eval's MMLU prompts a subject's questions: the block fed once a
batch). Throughput is tokens of every choice's sequence per second (what the straightforward scorer feeds), next
to the ceiling this machine's measured matrix-product rate in the model's dtype puts on a forward: rate / (2 x
the parameters outside the embedding) tokens per second.

    python bench/bench_evaluation.py                      # 162M-shaped Llama, fp32, CPU
    python bench/bench_evaluation.py --device cuda --dtype bfloat16 --layers 22 --hidden 2048
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile

import common  # noqa: F401  (the engine's process settings, before torch allocates)
import torch
import transformers

from merge_engine.demo import save_word_tokenizer
from merge_engine.evaluation.loglikelihood import carriers, token_logprobs, tokens_fed


def straightforward(model, sequences: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    """The baseline: every sequence its own right-padded row, logits and float32 log-softmax at every position."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[start:start + batch_size]]
            width = max(map(len, batch)) - 1
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(batch):
                ids[row, :len(s) - 1], mask[row, :len(s) - 1] = torch.tensor(s[:-1]), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, (i, s) in enumerate(zip(order[start:start + batch_size], batch)):
                lp = logits[row, :len(s) - 1].float().log_softmax(-1)
                out[i] = lp.gather(-1, torch.tensor(s[1:], device=device).unsqueeze(-1)).squeeze(-1).cpu()
    return out


def lm_eval_scorer(model, sequences: list[list[int]], first: list[int], batch_size: int, work: str):
    """lm_eval's HFLM scoring the same requests (context and continuation ids), or None without lm_eval."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None
    save_word_tokenizer(work)  # HFLM wants a tokenizer (for its pad and end tokens); the requests are token ids
    lm = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(work), batch_size=batch_size)
    requests = [(("", ""), s[:f], s[f:]) for s, f in zip(sequences, first)]
    return lambda: lm._loglikelihood_tokens(requests, disable_tqdm=True)


def questions(shape: str, count: int, prompt: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Sequences (prompt + choice) of `count` 4-choice questions, and each one's first continuation index. A
    `few-shot` prompt is one shared block of 4 x prompt tokens (the examples), then a question of prompt / 3."""
    rng = random.Random(seed)
    shots = [rng.randrange(100, vocab) for _ in range(4 * prompt)]
    sequences, first = [], []
    for _ in range(count):
        if shape == "few-shot":
            context = shots + [rng.randrange(100, vocab) for _ in range(prompt // 3)]
        else:
            context = [rng.randrange(100, vocab) for _ in range(prompt)]
        letters = rng.sample(range(10, 100), 4)
        for c in range(4):
            choice = [rng.randrange(100, vocab) for _ in range(rng.randint(4, 12))] if shape == "phrases" else [letters[c]]
            sequences.append(context + choice)
            first.append(len(context))
    return sequences, first


def matmul_rate(device: torch.device, dtype: torch.dtype, repeat: int) -> float:
    """FLOP/s of a square matrix product in the model's dtype: this machine's ceiling for a forward."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / common.best_time(lambda: a @ b, device, repeat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--prompt", type=int, default=96, help="prompt tokens per question")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = transformers.LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                                      intermediate_size=4 * args.hidden, num_attention_heads=args.hidden // 64,
                                      num_key_value_heads=args.hidden // 64, vocab_size=args.vocab,
                                      max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    rate = matmul_rate(device, dtype, args.repeat)
    ceiling = rate / (2 * (params - model.get_input_embeddings().weight.numel()))  # tokens/s
    print(f"# multiple-choice scoring, Llama {params / 1e6:.0f}M parameters ({args.layers} layers, hidden "
          f"{args.hidden}, vocab {args.vocab}), {args.dtype}, {device}; {args.questions} questions x 4 choices, "
          f"prompts of {args.prompt} tokens, batch size {args.batch_size}")
    print(f"- {common.machine(device)}")
    print(f"- matrix product ({args.dtype}): {rate / 1e9:.1f} GFLOP/s: a forward's ceiling {ceiling:.0f} tokens/s")
    print("\n| questions | scorer | rows fed | tokens fed | s | tokens fed/s | x ceiling | choice tokens/s | x baseline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape in ("letters", "phrases", "few-shot"):
        sequences, first = questions(shape, args.questions, args.prompt, args.vocab, seed=1)
        every = sum(len(s) - 1 for s in sequences)
        rows = sorted(set(carriers(sequences)))
        distinct_rows = {tuple(s[:-1]) for s in sequences}  # HFLM shares only identical fed rows
        scorers = {"straightforward": (lambda: straightforward(model, sequences, args.batch_size), len(sequences), every),
                   "merge_engine": (lambda: token_logprobs(model, sequences, args.batch_size, first), len(rows),
                                    tokens_fed(sequences, first, args.batch_size))}
        with tempfile.TemporaryDirectory() as work:
            theirs = lm_eval_scorer(model, sequences, first, args.batch_size, work)
        if theirs is not None:
            scorers["lm_eval HFLM"] = (theirs, len(distinct_rows), sum(map(len, distinct_rows)))
        names = list(scorers)
        seconds = dict(zip(names, common.interleaved_best([scorers[n][0] for n in names], device, args.repeat)))
        got, want = token_logprobs(model, sequences, args.batch_size, first), straightforward(model, sequences, args.batch_size)
        worst = max(float((g.double() - w[f - 1:].double()).abs().max()) for g, w, f in zip(got, want, first))
        for name in names:
            _, n_rows, tokens = scorers[name]
            print(f"| {shape} | {name} | {n_rows} | {tokens} | {seconds[name]:.3f} | {tokens / seconds[name]:.0f} | "
                  f"{tokens / seconds[name] / ceiling:.2f} | {every / seconds[name]:.0f} | "
                  f"{seconds['straightforward'] / seconds[name]:.2f} |")
        print(f"<!-- {shape}: largest log-prob difference between the two scorers {worst:.2e} -->", file=sys.stderr)

if __name__ == "__main__":
    main()
