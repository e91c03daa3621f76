"""Weight patches: a fine-tune's difference to its base, extracted once, stored compactly (float with exact
fixups, int8/int4 per row, or a PEFT LoRA adapter), then applied, rescaled, composed and removed: into a new
folder, in place under a crash-safe journal, or in memory. See docs/patches.md."""
from merge_engine.patches.apply import (
    PatchRun,
    apply_patches,
    apply_patches_in_place,
    remove_patches,
    remove_patches_in_place,
)
from merge_engine.patches.extract import ExtractReport, extract_patch
from merge_engine.patches.memory import apply_patches_in_memory, remove_patches_in_memory
from merge_engine.patches.select import Selection
from merge_engine.tiers.inplace import recover

__all__ = ["ExtractReport", "PatchRun", "Selection", "apply_patches", "apply_patches_in_memory",
           "apply_patches_in_place", "extract_patch", "recover", "remove_patches", "remove_patches_in_memory",
           "remove_patches_in_place"]
