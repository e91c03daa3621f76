"""Tiered models: keys that swap attention heads and MLP columns across layers (arXiv 2606.21638).

blocks: which tensors each block kind spans, per architecture; key: the key file format and checks;
generate: keys from a secret; permutation: the general form of keys and tiers; apply / inplace: keying and
unkeying checkpoints (streamed into a new folder, or rewritten in place under a journal); memory: keying a loaded
model or state dict in place; report: what a key moves;
forward: a loaded model running public or keyed from one copy of its weights; compare: public vs keyed outputs.
"""
from merge_engine.tiers.apply import KeyedRun, apply_key, remove_key
from merge_engine.tiers.blocks import ATTN_HEADS, BLOCK_KINDS, MLP_COLS, PARTS, ModelBlocks, model_blocks
from merge_engine.tiers.compare import Comparison, PromptComparison, compare_configurations, compare_prompts
from merge_engine.tiers.forward import IndexMap, KeyedModel, index_maps, keyed_tensor
from merge_engine.tiers.generate import generate_key
from merge_engine.tiers.inplace import apply_key_in_place, recover, remove_key_in_place
from merge_engine.tiers.key import TierKey, TierKeyError, validate_key
from merge_engine.tiers.memory import apply_key_in_memory, remove_key_in_memory
from merge_engine.tiers.permutation import BlockPermutation, compose
from merge_engine.tiers.report import KeyReport, key_report

__all__ = ["ATTN_HEADS", "BLOCK_KINDS", "BlockPermutation", "Comparison", "IndexMap", "KeyReport", "KeyedModel",
           "KeyedRun", "MLP_COLS", "ModelBlocks", "PARTS", "PromptComparison", "TierKey", "TierKeyError", "apply_key",
           "apply_key_in_memory", "apply_key_in_place", "compare_configurations", "compare_prompts", "compose",
           "generate_key", "index_maps", "key_report", "keyed_tensor", "model_blocks", "recover", "remove_key",
           "remove_key_in_memory", "remove_key_in_place", "validate_key"]
