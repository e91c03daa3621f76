"""LoRA adapter folders in peft's format (adapter_config.json + adapter_model.safetensors), written
for tests without peft: random A and B (peft would start B at zero), for any model folder."""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

from tests.conftest import _folder_tensors as model_tensors


def write_adapter(folder: str, base: str, targets=("q_proj", "v_proj", "down_proj"), embedding: str | None = None,
                  modules_to_save=(), r: int = 4, alpha: float = 8, seed: int = 0, dtype=torch.float32,
                  **config) -> dict[str, torch.Tensor]:
    """Write an adapter for the model in `base`; return its tensors (peft's key names). `config` adds
    adapter_config.json fields (fan_in_fan_out, use_rslora, rank_pattern, alpha_pattern, ...)."""
    gen = torch.Generator().manual_seed(seed)
    weights = model_tensors(base)
    tensors = {}

    def rank(module: str) -> int:
        for key, value in (config.get("rank_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return r

    for name, w in weights.items():
        module = name.removesuffix(".weight")
        if any(module.endswith(f".{t}") for t in targets) and name.endswith(".weight"):
            n_in, n_out = (w.shape[0], w.shape[1]) if config.get("fan_in_fan_out") else (w.shape[1], w.shape[0])
            tensors[f"base_model.model.{module}.lora_A.weight"] = 0.1 * torch.randn(rank(module), n_in, generator=gen)
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.1 * torch.randn(n_out, rank(module), generator=gen)
        elif embedding and module == embedding:
            tensors[f"base_model.model.{module}.lora_embedding_A"] = 0.1 * torch.randn(rank(module), w.shape[0],
                                                                                      generator=gen)
            tensors[f"base_model.model.{module}.lora_embedding_B"] = 0.1 * torch.randn(w.shape[1], rank(module),
                                                                                      generator=gen)
        elif module in modules_to_save:
            tensors[f"base_model.model.{name}"] = w + 0.05 * torch.randn(w.shape, generator=gen).to(w.dtype)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    target_modules = list(targets) + ([embedding.rsplit(".", 1)[-1]] if embedding else [])
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r,
                   "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "target_modules": target_modules,
                   "modules_to_save": [m.rsplit(".", 1)[-1] for m in modules_to_save] or None,
                   "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {},
                   "alpha_pattern": {}, "inference_mode": True, **config}, f, indent=2)
    return tensors
