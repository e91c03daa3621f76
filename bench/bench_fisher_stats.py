"""Cost of Fisher accumulation next to a plain forward/backward of the same model on the same batches.

    python bench/bench_fisher_stats.py [--hidden 512] [--layers 4] [--batch 8] [--length 128] [--device cpu|cuda]

A randomly initialised Llama (transformers) and random token batches. Rows:
- forward/backward: the sequences' mean log-likelihood, backward, gradients dropped (the floor);
- fisher, per batch: merge_engine.stats.compute_fisher (one backward per batch; each gradient is folded
  into the fp32 Fisher by accumulate_fisher in its grad hook and freed);
- fisher, per example: one backward per sequence (exact per-example squares).
Times are the best of --repeat runs over --batches batches, after one warm-up batch.
"""
from __future__ import annotations

import argparse

import torch
import transformers as tf
from common import best_time, machine

from merge_engine.stats.fisher import compute_fisher, sequence_log_likelihoods


def plain_step(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ll, _ = sequence_log_likelihoods(out.logits, batch["input_ids"], batch["attention_mask"])
    (-ll.mean()).backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=args.length)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    batches = [{"input_ids": torch.randint(0, args.vocab, (args.batch, args.length), device=device),
                "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long, device=device)}
               for _ in range(args.batches)]
    print(f"device: {machine(device)}; torch {torch.__version__}")
    print(f"model: Llama {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}); batches of {args.batch} x {args.length} tokens\n")
    print("| run | ms per batch | x forward/backward |")
    print("|---|---|---|")
    runs = {
        "forward/backward": lambda: [plain_step(model, b) for b in batches],
        "fisher, per batch": lambda: compute_fisher(model, batches, progress=False),
        "fisher, per example": lambda: compute_fisher(model, batches, per_example=True, progress=False),
    }
    floor = None
    for name, run in runs.items():
        t = best_time(run, device, args.repeat) / args.batches
        floor = floor or t
        print(f"| {name} | {t * 1e3:.1f} | {t / floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
