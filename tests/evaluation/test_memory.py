"""evaluation.memory: the memory an evaluation allocates beside the model, estimated before any weight is read,
bounds what scoring really allocates (measured as the peak resident memory of a process of its own), and is the
same for the live model's class and config built on the meta device."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from merge_engine.errors import ConfigError
from merge_engine.evaluation import MultipleChoice, Perplexity
from merge_engine.evaluation.memory import scoring_bytes
from tests.evaluation.conftest import QUESTIONS, word_tokenizer, write_questions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def three_shapes(rng: random.Random) -> dict[str, tuple[list[list[int]], list[int], int]]:
    """Rows of three shapes, (sequences, first scored token, batch size), over a 32000-word vocabulary: questions
    of four 3-10-token choices after 200-token prompts (rows share their question's prompt), one-token choices
    after a shared 300-token few-shot block (rows share a trunk), and 256-token perplexity windows (whole rows)."""
    def words(n):
        return [rng.randrange(4, 32000) for _ in range(n)]
    shapes = {"choices": ([], [], 16), "few-shot": ([], [], 16), "windows": ([], [], 4)}
    for _ in range(12):
        prompt = words(200)
        for _ in range(4):
            shapes["choices"][0].append(prompt + words(rng.randrange(3, 11)))
            shapes["choices"][1].append(len(prompt))
    shots = words(300)
    for _ in range(10):
        prompt = shots + words(rng.randrange(10, 30))
        for _ in range(4):
            shapes["few-shot"][0].append(prompt + words(1))
            shapes["few-shot"][1].append(len(prompt))
    shapes["windows"][0].extend(words(256) for _ in range(6))
    shapes["windows"][1].extend([1] * 6)
    return shapes


def small_llama(attention: str, dtype: torch.dtype, device: str = "cpu"):
    """A small Llama with a realistic vocabulary: logits dominate, as they do in real models."""
    import transformers
    config = transformers.AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=32000, max_position_embeddings=1024)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype).to(device).eval()


# One process per attention and dtype, every shape scored once before it is measured. The peak resident memory
# above the resident memory before (VmHWM, reset through /proc/self/clear_refs) is what the scoring allocated: with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_)
# every tensor-sized allocation is its own mapping, given back when freed, so resident memory follows the live
# tensors.
MEASURE = textwrap.dedent("""
    import json, random, sys
    import torch
    from merge_engine.evaluation.loglikelihood import scored_tokens
    from merge_engine.evaluation.memory import generation_bytes, scoring_bytes
    from tests.evaluation.test_memory import small_llama, three_shapes

    def resident(field):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    torch.set_num_threads(1)
    model = small_llama(sys.argv[1], getattr(torch, sys.argv[2]))
    shapes = three_shapes(random.Random(0))
    for sequences, first, batch_size in shapes.values():  # what the CPU's matrix products cache for each shape
        scored_tokens(model, sequences, batch_size, first)  # (oneDNN's, resident for good) before measuring
    out = {}
    for name, (sequences, first, batch_size) in shapes.items():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = resident("VmRSS")
        scored_tokens(model, sequences, batch_size, first)
        out[name] = (scoring_bytes(model, sequences, first, batch_size), resident("VmHWM") - before)
    # generation as lm_eval's HF model runs it: left-padded prompts, greedy, to prompt + max_gen_toks tokens
    lengths = [8, 11, 16, 13, 9, 16, 12, 10]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, n in enumerate(lengths):
        ids[k, -n:] = torch.randint(4, 32000, (n,))
        mask[k, -n:] = 1
    def generate():
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_length=ids.shape[1] + 300, min_length=ids.shape[1] + 300,
                           do_sample=False, use_cache=True, pad_token_id=0)
    generate()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = resident("VmRSS")
    generate()
    out["generation"] = (generation_bytes(model, len(lengths), ids.shape[1], ids.shape[1] + 300),
                         resident("VmHWM") - before)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_estimate_bounds_what_scoring_allocates(attention, dtype):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", MEASURE, attention, dtype], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    for shape, (estimate, measured) in json.loads(done.stdout.splitlines()[-1]).items():
        assert measured > 2e6, shape  # the scoring allocated tensors worth measuring (logits of 32000 words)
        # an upper bound, and a useful one: within 2x
        assert measured <= estimate <= 2 * measured, (shape, estimate, measured)


def test_the_estimate_needs_only_the_models_class_config_and_dtype(causal_lm, tmp_path):
    """On the meta device (what the search builds before reading any weight) the estimate is the real model's."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(causal_lm.config)
    tokenizer = word_tokenizer()
    questions = MultipleChoice(write_questions(tmp_path / "q.jsonl", QUESTIONS, [0] * len(QUESTIONS)), tokenizer,
                               batch_size=3)
    (tmp_path / "text.txt").write_text(" ".join(p for p, _ in QUESTIONS) * 4)
    text = Perplexity(str(tmp_path / "text.txt"), tokenizer, max_length=16, batch_size=2)
    for evaluator in (questions, text):
        assert evaluator.memory_bytes(shape) == evaluator.memory_bytes(causal_lm) > 0


def test_more_rows_per_batch_need_more_memory(causal_lm):
    sequences = [[5 + i % 7] * 40 + [9 + i, 11 + i] for i in range(12)]
    first = [40] * 12
    one, four = (scoring_bytes(causal_lm, sequences, first, b) for b in (1, 4))
    assert one < four <= 4 * one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_estimate_bounds_what_scoring_allocates_on_a_gpu(attention):
    from merge_engine.evaluation.loglikelihood import scored_tokens
    model = small_llama(attention, torch.bfloat16, "cuda")
    shapes = three_shapes(random.Random(0))
    scored_tokens(model, shapes["windows"][0][:2], 2)  # cuBLAS workspaces and kernels before measuring
    for shape, (sequences, first, batch_size) in shapes.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        scored_tokens(model, sequences, batch_size, first)
        measured = torch.cuda.max_memory_allocated() - before
        assert measured <= scoring_bytes(model, sequences, first, batch_size), shape


def test_a_multimodal_models_estimate_is_its_language_models(tmp_path):
    """Qwen2-VL's config holds its language model's sizes in text_config: the estimate is a Qwen2 causal LM's, and
    data longer than its positions is refused."""
    import transformers
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    with torch.device("meta"):
        multimodal = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2), vocab_size=128))
        language = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**text))
    questions = MultipleChoice(write_questions(tmp_path / "q.jsonl", QUESTIONS, [0] * len(QUESTIONS)),
                               word_tokenizer(), batch_size=3)
    assert questions.memory_bytes(multimodal) == questions.memory_bytes(language) > 0
    with pytest.raises(ConfigError, match=r"more than its max_position_embeddings \(64\)"):
        MultipleChoice(write_questions(tmp_path / "long.jsonl", [(" ".join(["the"] * 80), ["cat", "dog"])], [0]),
                       word_tokenizer()).check_model(multimodal.config)
