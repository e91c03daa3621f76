"""Mixture-of-experts tensors in transformers 5's fused layout, as mergekit 0.1.5 reads and writes them.

transformers 5 converts a MoE checkpoint's tensors at load time (its checkpoint conversion mapping): names are
renamed (Mixtral's `block_sparse_moe` becomes `mlp`) and each layer's per-expert projections are stacked into one
tensor, `experts.gate_up_proj` [E, 2I, H] (each expert's gate then up rows) and `experts.down_proj` [E, H, I].
mergekit 0.1.5 merges and writes those fused tensors. For the model types whose conversion is only renamings and
such stacking (MergeModulelist(0), optionally followed by Concatenate(1)), a fused tensor is the concatenation of
its sources' bytes in order (e0.gate, e0.up, e1.gate, ...): FusedExperts presents it as one tensor read segment by
segment into its place in one buffer, so the rest of the engine sees plain tensors under transformers 5's names. A
folder that already holds the fused names (a mergekit output) is read as it is, so it merges with per-expert ones.

The table is transformers 5's mapping for those model types (tests/io/test_experts.py checks it against
transformers), kept here because transformers is an optional dependency. Model types whose conversion does more
(qwen3_vl_moe transposes its experts) keep the checkpoint's layout.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint, read_buffer
from merge_engine.io.safetensors_format import TensorInfo

EXPERT_LAYOUTS = ("fused", "checkpoint")

# A step: ("rename", source pattern, target) or ("fuse", source patterns, target): transformers' WeightRenaming and
# WeightConverter (patterns as transformers writes them; `*` is the expert index).
_QWEN2_MOE = (("fuse", ("mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"), "mlp.experts.gate_up_proj"),
              ("fuse", ("mlp.experts.*.down_proj.weight",), "mlp.experts.down_proj"))
_MIXTRAL_EXPERTS = (("fuse", (".experts.*.w1.weight", ".experts.*.w3.weight"), ".experts.gate_up_proj"),
                    ("fuse", (".experts.*.w2.weight",), ".experts.down_proj"))
_MIXTRAL = (("rename", ".block_sparse_moe.", ".mlp."), *_MIXTRAL_EXPERTS)
_W_EXPERTS = (("fuse", (r"\.experts.*.w1.weight", r"\.experts.*.w3.weight"), r"\.experts.gate_up_proj"),
              ("fuse", (r"\.experts.*.w2.weight",), r"\.experts.down_proj"))
_QWEN2_STYLE = ("afmoe", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "flex_olmo",
                "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa", "hunyuan_v1_moe", "longcat_flash", "mellum",
                "olmoe", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_text",
                "qwen3_omni_moe_thinker", "sarvam_mla", "solar_open")


def _renames(*pairs: tuple[str, str]) -> tuple:
    return tuple(("rename", s, t) for s, t in pairs)


_KOLIBRI = (*_QWEN2_MOE, *_renames(("moe.router.expert_bias", "mlp.gate.e_score_correction_bias"),
                                   ("post_attn_norm", "post_self_attn_layernorm"), ("post_ffn_norm", "post_mlp_layernorm")))
_SAM = r"sam_model\.", "vision_tower.sam_encoder."
CONVERSIONS: dict[str, tuple] = {
    **{t: _QWEN2_MOE for t in _QWEN2_STYLE},
    "mixtral": _MIXTRAL, "minimax": _MIXTRAL,
    "minimax_m2": (*_MIXTRAL, ("rename", ".block_sparse_moe.e_score_correction_bias", ".mlp.e_score_correction_bias")),
    "phimoe": (*_renames((".block_sparse_moe.", ".mlp."), (".gate.weight", ".router.weight")), *_MIXTRAL_EXPERTS),
    "jamba": tuple((kind, tuple(s.replace("mlp.", "feed_forward.") for s in src), t.replace("mlp.", "feed_forward."))
                   for kind, src, t in _QWEN2_MOE),
    "lfm2_moe": (("fuse", ("feed_forward.experts.*.w1.weight", "feed_forward.experts.*.w3.weight"),
                  "feed_forward.experts.gate_up_proj"),
                 ("fuse", ("feed_forward.experts.*.w2.weight",), "feed_forward.experts.down_proj")),
    "nemotron_h": (("rename", "backbone.", "model."),
                   ("fuse", ("mixer.experts.*.up_proj.weight",), "mixer.experts.up_proj"),
                   ("fuse", ("mixer.experts.*.down_proj.weight",), "mixer.experts.down_proj")),
    "kolibri1": _KOLIBRI, "kolibri1_1": _KOLIBRI,
    "axk1": (*_QWEN2_MOE, ("rename", "post_mlp_layernorm", "mlp.post_mlp_layernorm")),
    "axk2": (*_QWEN2_MOE, *_renames(("W_down", "mlp.fc1"), ("W_up", "mlp.fc2"),
                                    (r"self_attn\.q_b_proj\.", "self_attn.q_gate_proj."))),
    "ernie4_5_moe": (*_QWEN2_MOE, ("rename", "mlp.moe_statics.e_score_correction_bias",
                                   "mlp.gate.moe_statics.e_score_correction_bias")),
    "exaone_moe": (*_QWEN2_MOE, ("rename", "mlp.e_score_correction_bias", "mlp.gate.e_score_correction_bias")),
    "flint": (*_QWEN2_MOE, ("rename", "self_attn.softmax_offset", "self_attn.sinks")),
    "hy_v3": (*_QWEN2_MOE, *_renames((r"mlp\.router\.gate\.weight", "mlp.gate.weight"),
                                     (r"mlp\.expert_bias", "mlp.e_score_correction_bias"),
                                     (r"mlp\.shared_mlp\.", "mlp.shared_experts."))),
    "laguna": (*_QWEN2_MOE, *_renames(("mlp.experts.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),
                                      ("mlp.shared_expert.", "mlp.shared_experts."))),
    "mimo_v2_flash": (*_QWEN2_MOE, ("rename", "self_attn.attention_sink_bias", "self_attn.sinks")),
    "minicpm5_moe": (*_QWEN2_MOE, ("rename", "self_attn.q_proj", "self_attn.q_gate_proj")),
    "deepseek_ocr2": (*_renames(*((rf"sam_model\.blocks\.(\d+)\.{a}\.", rf"vision_tower.sam_encoder.layers.\1.{b}.")
                                  for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn", "attn"),
                                               ("mlp", "mlp"))),
                                (rf"{_SAM[0]}patch_embed\.proj\.", f"{_SAM[1]}patch_embed.projection."),
                                (rf"{_SAM[0]}pos_embed", f"{_SAM[1]}pos_embed"),
                                *((rf"{_SAM[0]}neck\.{i}\.", f"{_SAM[1]}neck.{n}.")
                                  for i, n in enumerate(("conv1", "layer_norm1", "conv2", "layer_norm2"))),
                                (rf"{_SAM[0]}net_2\.", f"{_SAM[1]}proj.conv1."),
                                (rf"{_SAM[0]}net_3\.", f"{_SAM[1]}proj.conv2."),
                                (r"qwen2_model\.model\.model\.layers\.", "vision_tower.vision_encoder.layers."),
                                (r"qwen2_model\.model\.model\.norm\.", "vision_tower.vision_encoder.norm."),
                                (r"qwen2_model\.query_768\.", "vision_tower.query_768_resolution."),
                                (r"qwen2_model\.query_1024\.", "vision_tower.query_1024_resolution."),
                                (r"projector\.layers\.", "multi_modal_projector."),
                                ("view_seperator", "view_separator"),
                                *((rf"(^|model\.){n}\.", rf"\1language_model.{n}.")
                                  for n in ("embed_tokens", "layers", "norm"))),
                      *_QWEN2_MOE),
    "deepseek_v4": (*_renames((r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."),
                              (r"\.indexer\.compressor\.", r"\.compressor\.indexer\."),
                              (r"^embed\.weight", "embed_tokens.weight"), (r"^head\.weight", "lm_head.weight"),
                              *((rf"^hc_head_{k}", f"hc_head.hc_{k}") for k in ("fn", "base", "scale")),
                              (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
                              *((rf"\.hc_{m}_{k}", f".{m}_hc.{k}") for m in ("attn", "ffn")
                                for k in ("fn", "base", "scale")),
                              (r"\.attn_sink", ".sinks"),
                              (r"\.indexer\.weights_proj\.", r"\.compressor\.indexer\.scorer\.weights_proj\."),
                              (r"\.indexer\.wq_b\.", r"\.compressor\.indexer\.q_b_proj\."),
                              (r"\.norm\.", r"\.kv_norm\."), (r"\.ape", r"\.position_bias"),
                              (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", r"\.self_attn\.q_b_proj\."),
                              (r"\.wkv\.", ".kv_proj."), (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."),
                              (r"\.wo_b\.", ".o_b_proj."), (r"\.q_norm\.", ".q_a_norm."),
                              (r"\.gate\.bias", ".gate.e_score_correction_bias"),
                              *((rf"\.shared_experts\.w{i}\.", f".shared_experts.{p}_proj.")
                                for i, p in ((1, "gate"), (2, "down"), (3, "up")))),
                    *_W_EXPERTS),
    "mistral_large4_text": (*_renames((r"\.attention\.", r"\.self_attn\."), (r"\.wq\.", ".q_proj."),
                                      (r"\.wkv_a_with_mqa\.", r"\.kv_a_proj_with_mqa\."), (r"\.wkv_b\.", ".kv_b_proj."),
                                      (r"\.attention_norm\.", r"\.input_layernorm\."),
                                      (r"\.ffn_norm\.", r"\.post_attention_layernorm\."),
                                      (r"\.kv_a_norm\.", r"\.kv_a_layernorm\."), (r"\.feed_forward\.", r"\.mlp\."),
                                      (r"\.gate\.", r"\.mlp.gate\."), (r"\.experts\.", r"\.mlp.experts\."),
                                      (r"\.shared_experts\.", r"\.mlp.shared_experts\."),
                                      (r"\.ssmax_scaling.s", r"\.softmax_scaling.scale"),
                                      (r"\.ssmax_scaling.b", r"\.softmax_scaling.bias")),
                            *_W_EXPERTS),
    "dots3_note_vision_encoder": (*_renames((r"^post_trunk_norm\.", "norm."), (r"^adapter\.", "merger."),
                                            (r"(blocks\.\d+)\.norm_1\.", r"\1.norm1."),
                                            (r"(blocks\.\d+)\.norm_2\.", r"\1.norm2."),
                                            (r"(blocks\.\d+\.mlp)\.fc1\.", r"\1.gate_proj."),
                                            (r"(blocks\.\d+\.mlp)\.fc2\.", r"\1.down_proj."),
                                            (r"(blocks\.\d+\.mlp)\.fc3\.", r"\1.up_proj."),
                                            (r"\.mlp\.gate_weight", ".mlp.gate.weight"),
                                            (r"\.mlp\.router_bias", ".mlp.e_score_correction_bias")),
                                  ("fuse", (".mlp.experts.*.fc1.weight", ".mlp.experts.*.fc3.weight"),
                                   ".mlp.experts.gate_up_proj"),
                                  ("fuse", (".mlp.experts.*.fc2.weight",), ".mlp.experts.down_proj")),
}


def _target(pattern: str) -> str:
    """A target pattern as transformers applies it (core_model_loading.process_target_pattern): no anchor, no
    lookaround, a capturing group as \\1, escaped dots plain."""
    pattern = re.sub(r"\(\?.+?\)?\)", "", pattern.removeprefix("^"))
    group = re.search(r"\(.+?\)", pattern)
    if group:
        pattern = pattern.replace(group[0], r"\1", 1)
    return pattern.replace(r"\.", ".")


@dataclass(frozen=True)
class _Step:
    fuse: bool
    sources: tuple[str, ...]
    target: str
    regex: re.Pattern

    @classmethod
    def of(cls, kind: str, sources: str | tuple[str, ...], target: str) -> _Step:
        """Compiled as transformers' WeightTransform compiles it: longest source first; `*.` any run of characters;
        a pattern ending in a word character ends on a name boundary."""
        sources = (sources,) if isinstance(sources, str) else sources
        branches = []
        for i, source in sorted(enumerate(sources), key=lambda item: -len(item[1])):
            pattern = source.replace("*.", r".*\.")
            if re.search(r"[a-zA-Z0-9]$", pattern):
                pattern += r"(?!\w)"
            branches.append(f"(?P<g{i}>{pattern})")
        return cls(kind == "fuse", sources, _target(target), re.compile("|".join(branches)))

    def apply(self, name: str) -> tuple[str, int] | None:
        """(renamed name, index of the source pattern that matched), None when none matches
        (WeightTransform.rename_source_key)."""
        m = self.regex.search(name)
        if m is None:
            return None
        group = next(g for g, v in m.groupdict().items() if v is not None)
        replacement = self.target
        if r"\1" in replacement:
            replacement = replacement.replace(r"\1", m.group(self.regex.groupindex[group] + 1))
        return name.replace(m.group(0), replacement, 1), int(group[1:])


@lru_cache(maxsize=None)
def conversion(model_type: str) -> tuple[_Step, ...]:
    return tuple(_Step.of(*step) for step in CONVERSIONS.get(model_type, ()))


def _expert_index(name: str) -> int | None:
    """The expert number in a per-expert tensor's name (the `experts.N.` component)."""
    m = re.search(r"(?:^|\.)experts\.(0|[1-9][0-9]*)\.", name)
    return int(m[1]) if m else None


@dataclass
class Layout:
    """How a folder's tensors appear fused: logical name -> the stored names it reads, in byte order."""

    sources: dict[str, tuple[str, ...]]
    fused: dict[str, int]  # the names that stack experts -> how many sources one expert adds (gate and up: 2)


def expert_layout(model_type: str, names: list[str], folder: str, experts: int | None = None) -> Layout:
    """Each stored name through the model type's conversion: renamed, or gathered into a fused tensor of `experts`
    experts (config.json's count; None: as many as the names hold). CheckpointError naming the folder for names
    that collide or experts that are missing."""
    steps = conversion(model_type)
    plain: dict[str, str] = {}
    groups: dict[str, tuple[_Step, dict[int, list[str]]]] = {}
    for stored in names:
        name = stored
        for step in steps:
            hit = step.apply(name)
            if hit is None:
                continue
            if step.fuse:
                groups.setdefault(hit[0], (step, {}))[1].setdefault(hit[1], []).append(stored)
                break
            name = hit[0]
        else:
            if name in plain:
                raise CheckpointError(f"{folder}: tensors '{plain[name]}' and '{stored}' are both '{name}' in "
                                      "transformers 5's layout (use --expert-layout checkpoint)")
            plain[name] = stored
    sources = {name: (stored,) for name, stored in plain.items()}
    for target, (step, by_pattern) in groups.items():
        if target in sources:
            raise CheckpointError(f"{folder}: holds '{target}' and also the per-expert tensors it fuses, such as "
                                  f"'{next(iter(by_pattern.values()))[0]}'")
        sources[target] = _stacked(target, step, by_pattern, folder, experts)
    return Layout(sources, {target: len(step.sources) for target, (step, _) in groups.items()})


def _stacked(target: str, step: _Step, by_pattern: dict[int, list[str]], folder: str,
             configured: int | None) -> tuple[str, ...]:
    """The sources of one fused tensor in byte order: expert by expert, each expert's patterns in order (gate then
    up). Every expert 0..E-1 must be there for every pattern, E the configured count when there is one (else the
    highest index found: a missing last expert leaves no gap)."""
    by_expert: list[dict[int, str]] = []
    for i, pattern in enumerate(step.sources):
        found: dict[int, str] = {}
        for stored in by_pattern.get(i, []):
            e = _expert_index(stored)
            if e is None or e in found:
                raise CheckpointError(f"{folder}: tensor '{stored}' does not name one expert of '{target}' "
                                      f"(expected '{pattern.replace('*', 'N')}' once per expert N)")
            found[e] = stored
        by_expert.append(found)
    count = max(max(found, default=-1) + 1 for found in by_expert)
    if configured is not None and count > configured:
        extra = next(found[count - 1] for found in by_expert if count - 1 in found)
        raise CheckpointError(f"{folder}: tensor '{extra}' is expert {count - 1} of '{target}' but config.json says "
                              f"the model has {configured} experts")
    count = count if configured is None else configured
    for i, found in enumerate(by_expert):
        missing = [e for e in range(count) if e not in found]
        if missing:
            raise CheckpointError(f"{folder}: '{target}' stacks {count} experts but "
                                  f"'{step.sources[i].replace('*', str(missing[0]))}' (expert {missing[0]}) is missing"
                                  f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return tuple(found[e] for e in range(count) for found in by_expert)


class FusedExperts(Checkpoint):
    """A checkpoint (a folder, BASE+ADAPTER, BASE+PATCH) whose MoE experts read fused, its tensors renamed as
    transformers 5 names them. Each fused tensor's sources are read by the checkpoint itself (its adapter or patch
    applied) straight into their places in the fused buffer."""

    def __init__(self, inner: Checkpoint, layout: Layout):
        self.inner, self.path, self.sources, self.fused = inner, inner.path, layout.sources, layout.fused
        self.reference = getattr(inner, "reference", inner.path)  # as plan digests name it: BASE+ADAPTER
        self._no_files_open()
        self.tensors = {name: self._info(name, srcs) for name, srcs in layout.sources.items()}

    def _info(self, name: str, srcs: tuple[str, ...]) -> TensorInfo:
        """The tensor as read: a plain one renamed, or the stack of its experts (checked to stack: one dtype, each
        projection one shape, projections concatenated along their first dimension)."""
        infos = [self.inner.tensors[s] for s in srcs]
        if name not in self.fused:
            return replace(infos[0], name=name)
        per_expert, first = self.fused[name], infos[0]
        for k, info in enumerate(infos):
            like = infos[k % per_expert]
            if info.dtype != first.dtype or info.shape != like.shape or (per_expert > 1 and (
                    not info.shape or info.shape[1:] != first.shape[1:])):
                raise CheckpointError(f"{info.file}: tensor '{info.name}' is {info.dtype} {list(info.shape)} but "
                                      f"'{like.name}' is {like.dtype} {list(like.shape)}: the experts of '{name}' "
                                      "do not stack (transformers 5's layout)")
        row = (sum(i.shape[0] for i in infos[:per_expert]), *first.shape[1:]) if per_expert > 1 else first.shape
        return TensorInfo(name, first.file, first.dtype, (len(infos) // per_expert, *row), first.data_start,
                          sum(i.nbytes for i in infos))

    @property
    def config(self) -> dict:
        return self.inner.config

    @property
    def folders(self) -> list[str]:
        return self.inner.folders

    def stored(self, name: str) -> TensorInfo:
        return self.tensors[name] if name in self.fused else self.inner.stored(self.sources[name][0])

    def non_finite(self, name: str, count: int) -> str:
        srcs = self.sources[name]
        if name not in self.fused:
            return self.inner.non_finite(srcs[0], count)
        return (f"{' + '.join(self.folders)}: tensor '{name}' (its experts '{srcs[0]}' to '{srcs[-1]}' stacked) has "
                f"{count} NaN or Inf value(s) (a corrupt checkpoint{', adapter or patch' * (len(self.folders) > 1)}?)")

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self.fused:
            return self.inner.read(self.sources[name][0], out)
        return self._fill(name, read_buffer(name, self.tensors[name], out), "off")

    def read_pooled(self, name: str, take_bytes: Callable[[int], torch.Tensor], direct_io: str = "auto") -> torch.Tensor:
        if name not in self.fused:
            return self.inner.read_pooled(self.sources[name][0], take_bytes, direct_io)
        info = self.tensors[name]
        return self._fill(name, take_bytes(info.nbytes)[:info.nbytes].view(info.dtype).view(info.shape), direct_io)

    def _fill(self, name: str, out: torch.Tensor, direct_io: str) -> torch.Tensor:
        """Each source read into its place in out (contiguous: the sources' bytes one after another). Unless
        direct_io is "off", each is read as the inner checkpoint's pooled reads read it (O_DIRECT, where they read
        so, needs a block-aligned window that its place in out is not) into scratch buffers, then copied."""
        flat, at, scratch = out.view(-1), 0, _Scratch()
        for src in self.sources[name]:
            info = self.inner.tensors[src]
            place = flat[at:at + info.numel].view(info.shape)
            if direct_io == "off":
                self.inner.read(src, place)
            else:
                place.copy_(self.inner.read_pooled(src, scratch.restart(), direct_io))
            at += info.numel
        return out

    def check_unchanged(self) -> None:
        self.inner.check_unchanged()  # (the inner checkpoint opened and read the files)

    def close(self) -> None:
        super().close()
        if hasattr(self, "inner"):
            self.inner.close()

    def __repr__(self) -> str:
        return f"FusedExperts({self.inner!r}, {len(self.fused)} fused tensors)"


class _Scratch:
    """Buffers for one pooled read, reused by the next: its k-th take gets the k-th buffer (a read may take two,
    the second a copy of the first, which must not overlap it)."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.taken = 0

    def restart(self) -> Callable[[int], torch.Tensor]:
        self.taken = 0
        return self.take

    def take(self, nbytes: int) -> torch.Tensor:
        k, self.taken = self.taken, self.taken + 1
        if k == len(self.buffers):
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        if self.buffers[k].numel() < nbytes:
            self.buffers[k] = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffers[k][:nbytes]


def layout_hint(missing: str, held) -> str:
    """Why a tensor an adapter or a patch names may be missing from a model: the other expert layout (a per-expert
    tensor of a model holding its experts fused, or the reverse), as a clause to append; "" otherwise."""
    fused_held = any(".experts." in name and _expert_index(name) is None for name in held)
    if _expert_index(missing) is not None and fused_held:
        return (" (it names one expert's tensor, and the model holds its experts fused, as transformers 5 and "
                "mergekit 0.1.5 write them)")
    if ".experts." in missing and _expert_index(missing) is None and any(_expert_index(n) is not None for n in held):
        return (" (it names fused experts, and the model holds one tensor per expert: merge with --expert-layout "
                "checkpoint to keep the checkpoint's layout)")
    return ""


EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")  # transformers'


def configured_experts(config: dict) -> int | None:
    """The expert count config.json gives (its text_config's for a multimodal model), None where it gives none as a
    whole number."""
    for cfg in (config, config.get("text_config")):
        for key in EXPERT_COUNT_KEYS if isinstance(cfg, dict) else ():
            if type(cfg.get(key)) is int:
                return cfg[key]
    return None


def with_expert_layout(ckpt: Checkpoint, layout: str) -> Checkpoint:
    """ckpt as the merge reads it: its experts fused as transformers 5 holds them ("fused", for the model types
    of CONVERSIONS), or as stored ("checkpoint")."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout must be one of {', '.join(EXPERT_LAYOUTS)}, not {layout!r}")
    model_type = ckpt.config.get("model_type")
    if layout == "checkpoint" or model_type not in CONVERSIONS:
        return ckpt
    fused = expert_layout(model_type, list(ckpt.tensors), ckpt.path, configured_experts(ckpt.config))
    if not fused.fused and all(name == srcs[0] for name, srcs in fused.sources.items()):  # nothing to change
        return ckpt
    return FusedExperts(ckpt, fused)
