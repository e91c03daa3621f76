"""Low-level merge ops, callable directly by other tools.

Each op is declared once with torch.library (namespace ``merge_engine``, visible as
``torch.ops.merge_engine.<name>``; see ops/library.py): the Python body is the pure-PyTorch reference
and the default kernel on every device, a fake implementation lets it trace under torch.compile and
torch.export, and compiled backends register device kernels for the same op, so callers never change.
The functions here have the references' signatures and docstrings. merge_task_vectors, fisher_merge,
weighted_sum and slerp also write into a caller's tensor (`out=`, the `.out` overloads).
rescale_l1, della_keep_probability, mirror_upper_, topk_count and merge_task_vectors_reference are plain helpers.
"""
from merge_engine.ops.consensus import disjoint_mean, elect_sign, merge_task_vectors, merge_task_vectors_reference
from merge_engine.ops.fisher import accumulate_fisher, fisher_merge
from merge_engine.ops.gram import accumulate_gram, mirror_upper_
from merge_engine.ops.interpolate import karcher_mean, multislerp, nearswap, nuslerp, slerp, weighted_sum
from merge_engine.ops.permute import gather_blocks, scatter_add_blocks_, swap_blocks_
from merge_engine.ops.select import magnitude_cutoff
from merge_engine.ops.selective import arcee_fusion, ram_merge, ramplus_tl_merge, sce_merge
from merge_engine.ops.sparsify import (
    della_keep_probability,
    drop_by_rank,
    drop_random,
    magnitude_topk_mask,
    rescale_l1,
    topk_count,
    trim_by_magnitude,
    trim_outliers,
)
from merge_engine.ops.spectral import iso_c, tsv_merge

__all__ = [
    "accumulate_fisher", "accumulate_gram", "magnitude_cutoff", "fisher_merge", "mirror_upper_", "della_keep_probability", "disjoint_mean", "drop_by_rank", "drop_random", "elect_sign",
    "gather_blocks", "magnitude_topk_mask", "merge_task_vectors", "merge_task_vectors_reference", "nuslerp", "rescale_l1",
    "scatter_add_blocks_", "slerp", "swap_blocks_", "topk_count", "trim_by_magnitude", "trim_outliers", "weighted_sum",
    "iso_c", "tsv_merge", "multislerp", "karcher_mean", "nearswap", "sce_merge", "ram_merge", "ramplus_tl_merge",
    "arcee_fusion",
]
