"""Tiny random checkpoints made with transformers, and a demo merge on them.

Nothing can be downloaded in our environments, so demos and tests build their own models: a base
with random weights (fixed seed) and "fine-tunes" that add seeded noise to it, saved as Hugging Face
folders (optionally sharded, in fp32 or bf16).

    python -m merge_engine.demo OUT_DIR     # makes models, runs a TIES merge, loads the result
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from merge_engine.dtypes import dtype_name
from merge_engine.errors import MergeEngineError, OutputError
from merge_engine.extras import require

ARCHS = ("llama", "qwen2", "gpt2")
WORK_PREFIX = "merge_engine_demo_"  # the demo's temporary folder, where its models are made


def tiny_config(arch: str, layers: int = 4):
    tf = require("transformers", "hf", "the demo models")
    if arch == "llama":
        return tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                              tie_word_embeddings=False)
    if arch == "qwen2":  # grouped-query attention, tied embeddings
        return tf.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              tie_word_embeddings=True)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=layers, n_head=4, n_positions=128)
    raise ValueError(f"unknown arch {arch!r} (one of {ARCHS})")


def make_models(root: str, arch: str = "llama", n_experts: int = 3, dtype: torch.dtype = torch.float32,
                shard_size: str | None = None, layers: int = 4, seed: int = 0, noise: float = 0.02) -> list[str]:
    """Save a base and n_experts fine-tune-like variants under root; return their folders (base first)."""
    tf = require("transformers", "hf", "the demo models")
    cfg = tiny_config(arch, layers)
    with torch.random.fork_rng(devices=[]):  # model inits draw from the global generator: the caller's is left as it was
        torch.manual_seed(seed)
        base = tf.AutoModelForCausalLM.from_config(cfg).to(dtype)
        paths = []
        for i in range(n_experts + 1):
            path = os.path.join(root, f"{arch}-{'base' if i == 0 else f'expert{i}'}")
            model = base
            if i:
                model = tf.AutoModelForCausalLM.from_config(cfg).to(dtype)
                gen = torch.Generator().manual_seed(seed * 1000 + i)
                with torch.no_grad():
                    for (_, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
                        p.copy_(q + noise * torch.randn(q.shape, generator=gen).to(dtype))
            kwargs = {"max_shard_size": shard_size} if shard_size else {}
            model.save_pretrained(path, **kwargs)
            paths.append(path)
    return paths


def llama_tensor_shapes(layers: int, hidden: int, intermediate: int, vocab: int, kv_heads_ratio: int = 1):
    """Hugging Face Llama tensor names and shapes, in checkpoint order."""
    kv = hidden // kv_heads_ratio
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def make_synthetic_llama(path: str, layers: int, hidden: int, intermediate: int, vocab: int,
                         dtype: torch.dtype = torch.bfloat16, seed: int = 0, base: str | None = None,
                         noise: float = 0.01, heads: int = 8, kv_heads: int = 8) -> str:
    """Write a Llama-shaped checkpoint of any size tensor by tensor (memory: one tensor), without
    instantiating a model; with base, the weights are base + seeded noise (a fake fine-tune)."""
    import json

    from merge_engine.io.checkpoint import Checkpoint
    from merge_engine.io.safetensors_format import save_tensors
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": dtype_name(dtype)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    gen = torch.Generator().manual_seed(seed)
    base_checkpoint = Checkpoint(base) if base else None
    weight_map, total, shard_tensors = {}, 0, {}
    shapes = llama_tensor_shapes(layers, hidden, intermediate, vocab, heads // kv_heads)
    for n, (name, shape) in enumerate(shapes.items()):
        if base_checkpoint:
            t = (base_checkpoint.read(name).float() + noise * torch.randn(shape, generator=gen)).to(dtype)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        shard_tensors[name] = t
        # one shard for the embeddings, one per layer, one for the final norm and head
        if ".layers." not in name or name.endswith("post_attention_layernorm.weight") or n == len(shapes) - 1:
            filename = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_tensors(shard_tensors, os.path.join(path, filename))
            for k, v in shard_tensors.items():
                weight_map[k] = filename
                total += v.numel() * v.element_size()
            shard_tensors = {}
    if base_checkpoint:
        base_checkpoint.close()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path


DEMO_WORDS = ("the a cat dog bird fish sat ran flew swam on under over near mat rug tree river far away big small "
              "red blue green old young and then slowly quickly").split()


def save_word_tokenizer(folder: str) -> None:
    """A word-level fast tokenizer over DEMO_WORDS (ids below 40, inside any demo model's vocabulary) that adds
    <bos> before every text, saved into a model folder: what the evaluators of a search need."""
    tf = require("transformers", "hf", "the demo tokenizer")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    tokens = ["<pad>", "<eos>", "<unk>", "<bos>", *DEMO_WORDS]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    tf.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
                               bos_token="<bos>").save_pretrained(folder)


def write_questions(path: str, n: int = 8, choices: int = 3, seed: int = 0) -> str:
    """A JSONL file of n random multiple-choice questions over DEMO_WORDS (the evaluators' format)."""
    import json
    import random
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"question": " ".join(rng.choices(DEMO_WORDS, k=6)),
                                "choices": [" ".join(rng.choices(DEMO_WORDS, k=2)) for _ in range(choices)],
                                "answer": rng.randrange(choices)}) + "\n")
    return path


def demo(out_dir: str) -> None:
    """Make a tiny base and three experts in a temporary folder (removed at the end: the merged model does
    not need them), TIES-merge them into out_dir and load the result with transformers."""
    import tempfile

    import yaml

    from merge_engine import MergeOptions, merge, parse_config
    tf = require("transformers", "hf", "the demo")
    replace = _earlier_demo_output(out_dir)
    if not replace and os.path.isdir(out_dir) and os.listdir(out_dir):
        raise OutputError(f"{out_dir}: the folder holds other files than an earlier demo's output; name a new or "
                          "empty folder")
    with tempfile.TemporaryDirectory(prefix=WORK_PREFIX) as work:
        base, *experts = make_models(work, "llama", 3, torch.bfloat16, shard_size="100KB")
        config = {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
                  "parameters": {"normalize": True},
                  "models": [{"model": e, "parameters": {"weight": w, "density": d}}
                             for e, w, d in zip(experts, (0.5, 0.3, [0.1, 0.4]), (0.5, 0.6, 0.7))]}
        print(yaml.safe_dump(config, sort_keys=False))
        report = merge(parse_config(config), out_dir, MergeOptions(out_shard_size=200_000, overwrite=replace))
    print(report.summary())
    model = tf.AutoModelForCausalLM.from_pretrained(out_dir)
    logits = model(torch.arange(16)[None]).logits
    print(f"loaded the merged model with transformers: logits {tuple(logits.shape)}, "
          f"finite={bool(torch.isfinite(logits).all())}")


def _earlier_demo_output(out_dir: str) -> bool:
    """Whether out_dir holds an earlier demo's output (its merge config names models in the demo's temporary
    folder), which a rerun replaces; any other folder is the user's, and refused unless empty."""
    try:
        with open(os.path.join(out_dir, "mergekit_config.yml")) as f:
            return os.path.join(tempfile.gettempdir(), WORK_PREFIX) in f.read()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m merge_engine.demo", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default="demo_out")
    out_dir = p.parse_args(argv).out_dir
    try:
        demo(out_dir)
    except MergeEngineError as e:  # a missing extra, an output folder holding the user's files
        print(f"merge_engine.demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
