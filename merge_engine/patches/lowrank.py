"""Low-rank patches: each weight matrix's difference truncated by SVD and saved as a PEFT LoRA adapter.

For a linear weight of shape [out, in], d = U S V^T (full SVD in fp32, as mergekit-extract-lora takes it); the
rank kept is `rank`, or the fewest singular values holding an `energy` share of sum(S^2) (capped at `rank` when
both are given); lora_B = U_r S_r, lora_A = V_r^T. Every module gets scaling 1 (lora_alpha and alpha_pattern equal
its rank), so peft's merge adds exactly B @ A. Only linear weights inside the layers and the output head are
stored: embeddings, norms and biases are left out (listed in the report with why), as peft would need them whole.
GPT-2's Conv1D weights ([in, out]) are saved with fan_in_fan_out, as peft expects for that model.
"""
from __future__ import annotations

import json
import re

import torch

from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.lora import CONFIG_FILE, CONV1D_MODEL_TYPES, WEIGHTS_FILE
from merge_engine.io.safetensors_format import save_tensors
from merge_engine.io.writer import ShardedWriter
from merge_engine.patches import arithmetic as ar
from merge_engine.patches.extract import StoredRow
from merge_engine.patches.format import PatchedTensor
from merge_engine.patches.select import OUTSIDE_LAYERS, layer_of, read_pairs

DEFAULT_RANK = 32
_PREFIX = "base_model.model."


def rank_for(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The rank a module keeps: `rank`, or the fewest singular values holding `energy` of sum(S^2), capped by rank."""
    cap = min(rank if rank is not None else len(singular_values), len(singular_values))
    if energy is None:
        return max(cap, 1)
    share = (singular_values.square().cumsum(0) / singular_values.square().sum()).tolist()
    needed = next((i + 1 for i, s in enumerate(share) if s >= energy - 1e-12), len(share))
    return max(min(needed, cap), 1)


def write_low_rank(b: Checkpoint, t: Checkpoint, names: list[str], writer: ShardedWriter, report,
                   rank: int | None, energy: float | None) -> list[PatchedTensor]:
    if rank is None and energy is None:
        rank = DEFAULT_RANK
    if rank is not None and rank < 1 or energy is not None and not 0 < energy <= 1:
        raise ValueError(f"rank must be at least 1 and energy in (0, 1]; got {rank}, {energy}")
    transposed = t.config.get("model_type") in CONV1D_MODEL_TYPES
    linear = [n for n in names if _is_linear(n, t)]
    report.left_out += [(n, _why_not_low_rank(n, t)) for n in names if n not in set(linear)]
    weights, ranks, stored = {}, {}, []
    for name, base, tuned in read_pairs(b, t, linear) if linear else ():
        d = ar.difference(base, tuned).float()
        if not d.any():
            report.unchanged.append(name)
            continue
        m = d.T if transposed else d  # peft's B @ A is [out, in]
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        r = rank_for(s, rank, energy)
        module = name.removesuffix(".weight")
        weights[f"{_PREFIX}{module}.lora_A.weight"] = vh[:r].contiguous()
        weights[f"{_PREFIX}{module}.lora_B.weight"] = (u[:, :r] * s[:r]).contiguous()
        ranks[module] = r
        approx = weights[f"{_PREFIX}{module}.lora_B.weight"] @ weights[f"{_PREFIX}{module}.lora_A.weight"]
        error = float((approx - m).norm() / m.norm())
        stored.append(PatchedTensor(name, tuple(base.shape), base.dtype, ar.fingerprint(base), ar.fingerprint(tuned)))
        report.rows.append(StoredRow(name, 4 * r * sum(m.shape), b.tensors[name].nbytes, error, rank=r))
    if stored:
        save_tensors(weights, f"{writer.tmp_dir}/{WEIGHTS_FILE}")
        writer.add_file(CONFIG_FILE, json.dumps(_adapter_config(ranks, b.path, transposed), indent=1) + "\n")
    return stored


def _is_linear(name: str, ckpt: Checkpoint) -> bool:
    if len(ckpt.tensors[name].shape) != 2 or not name.endswith(".weight"):
        return False
    return layer_of(name) is not OUTSIDE_LAYERS or name.split(".")[-2] in ("lm_head", "embed_out")


def _why_not_low_rank(name: str, ckpt: Checkpoint) -> str:
    if len(ckpt.tensors[name].shape) == 3 and layer_of(name) is not OUTSIDE_LAYERS:
        return "fused experts (3-D): a LoRA adapter holds 2-D linear weights; store them in a dense patch"
    return "not a linear weight in a layer or the head (kept whole by peft, not low rank)"


def _adapter_config(ranks: dict[str, int], base: str, fan_in_fan_out: bool) -> dict:
    top = max(ranks.values())
    other = {re.escape(m): r for m, r in ranks.items() if r != top}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": top,
            "lora_alpha": top, "rank_pattern": other, "alpha_pattern": dict(other), "target_modules": sorted(ranks),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_rslora": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
