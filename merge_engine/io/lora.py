"""LoRA adapters applied while reading (`model: BASE+ADAPTER`, mergekit's syntax).

mergekit merges the adapter into a full copy of the base with peft's merge_and_unload and then reads
that copy. Here the base's tensors are read as usual and each is corrected in its read buffer: no
copy on disk, no extra pass over the weights. The arithmetic is peft's (0.21), so the result is the
same bits:
    LoRA weight (Linear):      W += (B @ A) * s              (B @ A transposed when fan_in_fan_out)
    LoRA embedding:            W += ((B @ A).T * s).to(W.dtype)
    other adapter tensors      replace the base's (modules_to_save, saved embedding layers)
with s = alpha / r (alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern per module). Only modules
peft adapts get the low-rank update (target_modules, exclude_modules, modules_to_save, layers_to_transform, as
its check_target_module_exists reads them); the others' LoRA tensors are left out, as peft never loads them. The
update is formed in fp32 (peft keeps adapter weights in fp32 whatever the base's dtype); the add
rounds it to the base tensor's dtype, once (an embedding's update, and MiCA's, is rounded before the add).

The adapter is checked whole before any tensor data is read: adapter_config.json's settings, the
header of adapter_model.safetensors (safetensors_format.read_header: offsets, dtypes, ...; or of a pickled
adapter_model.bin, read as io/torch_pickle.py reads a torch.save file), and every
adapter tensor against the base tensor it changes (name, floating-point dtype, 2-D A and B whose
shapes and rank match the base tensor and the configured rank, as peft requires to load them).
Adapter tensors are then read with positional reads, not through a memory map, so an adapter file
truncated during a merge is a CheckpointError naming it rather than a SIGBUS; each is refused by
name if it holds NaN or Inf.
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass, replace
from typing import Callable

import torch

from merge_engine.dtypes import dtype_name
from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint, read_buffer, read_weight_header
from merge_engine.io.experts import layout_hint
from merge_engine.io.raw import tensor_bytes
from merge_engine.io.safetensors_format import TensorInfo
from merge_engine.io.untrusted import inside_folder, is_finite_number, is_int, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"  # what a patch's adapter is written as
PICKLE_WEIGHTS_FILE = "adapter_model.bin"  # read where there is no WEIGHTS_FILE, as peft does
_PREFIX = "base_model.model."
# peft sets fan_in_fan_out per layer, from its type, whatever adapter_config.json says: on for transformers' Conv1D
# (weights stored [in, out]: these models' layers), off for nn.Linear ([out, in]: these families'). A non-square
# weight's shape tells the two apart anyway; for a square one of another model, the adapter's setting is taken.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt")
LINEAR_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                      "gemma3", "gemma3_text", "phi", "phi3", "gpt_neo", "gpt_neox", "gptj", "falcon", "stablelm",
                      "starcoder2", "gpt_bigcode", "olmo", "olmo2", "cohere", "granite", "deepseek_v2",
                      "deepseek_v3", "opt", "bloom", "mpt", "t5", "bart", "bert", "roberta", "qwen2_vl")
log = logging.getLogger("merge_engine")
# with or without the adapter name "default": some tools save peft's in-model names (lora_A.default.weight), which
# peft, loading a file as its default adapter (PeftModel.from_pretrained, mergekit's load), takes as they are
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])(?:\.default)?\.weight"
                       r"|lora_embedding_(?P<eab>[AB])(?:\.default)?)$")
# a LoRA tensor named for another adapter, which peft's default adapter leaves unloaded
_OTHER_ADAPTER_KEY = re.compile(r"\.lora_(?:[AB]\.(?P<name>[^.]+)\.weight|embedding_[AB]\.(?P<ename>[^.]+))$")
# repeats one rank_pattern / alpha_pattern key may hold: "layers.*.q_proj" has one, "^(?!.*lm_head).*" two
MAX_PATTERN_REPEATS = 2
# a target_modules / exclude_modules expression may hold one more: peft's documented
# ".*decoder.*(self_attn|encoder_attn).*(q_proj|v_proj)$" has three
MAX_TARGET_REPEATS = 3
# adapter_config.json settings that change what merging means, or that peft cannot merge (aLoRA, Arrow); refused
# rather than ignored
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "layer_replication": "layer replication",
                "target_parameters": "target_parameters", "trainable_token_indices": "trainable tokens",
                "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA",
                "arrow_config": "Arrow routing"}
# init_lora_weights whose initialisation peft reruns on the base weight when it loads the adapter, changing the
# weight the update is added to (PiSSA and OLoRA subtract their initial factors; LoftQ quantises it; CorDA and
# LoRA-GA need data peft does not have then): refused rather than merged onto the unchanged base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
MICA = "mica"  # peft's MiCA variant: a plain LoRA whose update peft rounds to the weight's dtype before adding it
ALL_LINEAR = "all-linear"
OUTPUT_EMBEDDING = "lm_head"  # the layer peft leaves out of "all-linear" (the causal LM families' output head)


def open_model(ref: str, lora_merge_dtype: torch.dtype | None = None) -> Checkpoint:
    """The checkpoint a config's model reference names: a folder, BASE+ADAPTER, or BASE+PATCH (a merge_engine
    patch folder, applied at scale 1 while reading: merge_engine.patches.checkpoint). lora_merge_dtype: see
    LoraCheckpoint."""
    base, _, adapter = ref.partition("+")
    if not adapter:
        return Checkpoint(base)
    if not os.path.exists(os.path.join(adapter, CONFIG_FILE)):
        from merge_engine.patches.checkpoint import PatchedCheckpoint, is_patch
        from merge_engine.patches.format import not_a_patch
        if is_patch(adapter):
            return PatchedCheckpoint(base, adapter)
        if os.path.isdir(adapter):
            raise not_a_patch(adapter)
    return LoraCheckpoint(base, adapter, merge_dtype=lora_merge_dtype)


@dataclass
class _Target:
    """How one base tensor changes: a low-rank update and/or a replacement."""

    a: str | None = None  # adapter keys
    b: str | None = None
    embedding: bool = False
    scaling: float = 1.0
    replacement: str | None = None
    rank: int = 0  # the rank adapter_config.json gives the module (rank_pattern, else r)
    rank_from: str = "r"  # which setting gave it
    transposed: bool = False  # the update is (B @ A)^T: an embedding, or a weight stored [in, out] (Conv1D)
    rounded: bool = False  # peft rounds the update to the weight's dtype before adding it (an embedding's, MiCA's)


_NO_CHANGE = _Target()


class LoraCheckpoint(Checkpoint):
    """A base model folder whose tensors are read with a LoRA adapter merged in. Opening it reads only
    adapter_config.json and the adapter's safetensors header; adapter tensors are read (positional reads
    into fresh memory, checked finite) when apply_to needs them, or once by hold_adapter."""

    def __init__(self, base: str, adapter: str, headers: Checkpoint | None = None,
                 merge_dtype: torch.dtype | None = None):
        """headers: the base's tensor table when it is already open (or held in memory: patches/memory.py);
        the adapter is then checked against it without opening the base folder again. merge_dtype (mergekit's
        --lora-merge-dtype): every floating-point tensor of the base is read cast to it and the adapter merged in
        it, as mergekit loads the base with transformers in that dtype before peft merges; `tensors` then
        describes the tensors in it (`stored` as the files hold them)."""
        if headers is None:
            super().__init__(base)
        else:
            self.path, self.tensors = headers.path, headers.tensors
            self._no_files_open()
        self._stored = self.tensors
        if merge_dtype is not None:
            self.tensors = {name: _cast_info(info, merge_dtype) for name, info in self.tensors.items()}
        self.adapter = os.path.abspath(adapter)
        self.reference = f"{base}+{adapter}"
        config = self._read_config()
        self._stated_layout = config.get("fan_in_fan_out", False)
        self._square_layout = self._layout_of_square_weights()
        self._file = self._weights_file()
        # adapter key -> where its tensor lies (validated); the file's identity, checked when its data is read
        self._weights, self._identities[self._file] = read_weight_header(self._file)
        self.targets = self._plan_targets(config)
        self._scratch = threading.local()  # per read thread: fp32 buffers for B @ A and the widened weight
        self._held: dict[str, torch.Tensor] | None = None  # the adapter's tensors, once hold_adapter() read them

    def _weights_file(self) -> str:
        for name in (WEIGHTS_FILE, PICKLE_WEIGHTS_FILE):
            if os.path.lexists(os.path.join(self.adapter, name)):  # a dangling link too: refused, not passed over
                return inside_folder(self.adapter, name, self.adapter)
        raise CheckpointError(f"{self.adapter}: no {WEIGHTS_FILE} or {PICKLE_WEIGHTS_FILE}")

    def _layout_of_square_weights(self) -> bool:
        """Whether a square adapted weight is stored [in, out] (its shape cannot tell): from the model's layer
        type where it is known, else as adapter_config.json's fan_in_fan_out says."""
        model_type = self.config.get("model_type")
        if model_type in CONV1D_MODEL_TYPES or model_type in LINEAR_MODEL_TYPES:
            return model_type in CONV1D_MODEL_TYPES
        return self._stated_layout

    def _warn_layout(self, targets: dict[str, _Target]) -> None:
        """Name the targets whose layout is not what fan_in_fan_out says (peft corrects it, with a warning)."""
        differ = [name for name, t in targets.items() if t.a and not t.embedding and t.transposed != self._stated_layout]
        if differ:
            log.warning("%s: fan_in_fan_out is %s, but %d adapted weight(s) of %s (%s%s) are stored %s; peft takes "
                        "each layer's own layout when it loads the adapter, and so does merge_engine", self.adapter,
                        self._stated_layout, len(differ), self.path, ", ".join(differ[:3]),
                        ", ..." if len(differ) > 3 else "", "[in, out]" if not self._stated_layout else "[out, in]")

    def _read_config(self) -> dict:
        path = inside_folder(self.adapter, CONFIG_FILE, self.adapter)
        config = read_json(path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: unreadable adapter config (not a JSON object)")
        if config.get("peft_type") != "LORA":
            raise CheckpointError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are merged")
        used = [what for key, what in _UNSUPPORTED.items() if config.get(key)]
        if used:
            raise CheckpointError(f"{path}: uses {', '.join(used)}, which merge_engine does not merge")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise CheckpointError(
                f"{path}: init_lora_weights is {init!r}: peft redoes that initialisation on the base weights when it "
                "loads the adapter (changing them before adding the update), which merge_engine does not reproduce; "
                "convert the adapter to a plain LoRA first (peft's save_pretrained with "
                "path_initial_model_for_weight_conversion)")
        problem = _targeting_problem(config)
        if problem:
            raise CheckpointError(f"{path}: {problem}")
        if not isinstance(config.get("fan_in_fan_out", False), bool):
            raise CheckpointError(f"{path}: fan_in_fan_out must be true or false, not {config['fan_in_fan_out']!r}")
        r, alpha = config.get("r"), config.get("lora_alpha")
        if not (is_int(r) and r > 0 and is_finite_number(r)):
            raise CheckpointError(f"{path}: needs a positive integer 'r', not {repr(r)[:40]}")
        if not is_finite_number(alpha):
            raise CheckpointError(f"{path}: needs a finite number 'lora_alpha', not {repr(alpha)[:40]}")
        for setting in ("rank_pattern", "alpha_pattern"):
            problem = _pattern_problem(config.get(setting) or {}, ranks=setting == "rank_pattern")
            if problem:
                raise CheckpointError(f"{path}: {setting}: {problem}")
        return config

    def _plan_targets(self, config: dict) -> dict[str, _Target]:
        """Base tensor name -> its change; every adapter tensor is matched to a base tensor of its shape."""
        targets: dict[str, _Target] = {}
        problems, untargeted = [], []
        for key in self._weights:
            if key.startswith(_PREFIX) and ".lora_" not in key and ".base_layer." not in key:
                self._untie(key[len(_PREFIX):])
        for key, info in self._weights.items():
            m = _LORA_KEY.match(key.removeprefix(_PREFIX)) if key.startswith(_PREFIX) else None
            if m and not _targets(config, m["module"], embedding=m["eab"] is not None):
                untargeted.append(key)  # peft builds no LoRA layer for the module, so it never loads these
                continue
            if not info.dtype.is_floating_point:
                problems.append(f"'{key}' is {dtype_name(info.dtype)}, not a floating-point tensor")
            if not key.startswith(_PREFIX):
                problems.append(f"'{key}' is not under '{_PREFIX}'")
                continue
            name = key[len(_PREFIX):]
            if m:
                module = m["module"]
                t = targets.setdefault(self._tied_name(f"{module}.weight"), _Target())
                if (t.a or t.b) and t.embedding != (m["eab"] is not None):
                    problems.append(f"'{key}' and '{t.a or t.b}' both change '{self._tied_name(f'{module}.weight')}' "
                                    "(an output head tied to the embeddings), which merge_engine does not merge")
                t.embedding = m["eab"] is not None
                t.rounded = t.embedding or config.get("init_lora_weights") == MICA
                side = (m["ab"] or m["eab"]).lower()
                if getattr(t, side):  # peft would load whichever of the two comes last
                    problems.append(f"'{key}' and '{getattr(t, side)}' are both lora_{side.upper()} of '{module}' "
                                    "(with and without the adapter name 'default'); keep one")
                setattr(t, side, key)
                t.scaling = _scaling(config, module)
                t.rank, t.rank_from = _rank(config, module)
            elif other := _OTHER_ADAPTER_KEY.search(name):
                adapter = other["name"] or other["ename"]
                problems.append(f"'{key}' is named for the adapter '{adapter}': peft loads a file as its adapter "
                                "'default' (as mergekit does) and would leave this tensor out; rename the tensors "
                                f"without '.{adapter}' (or with '.default')")
            elif name.endswith(".lora_B.bias"):  # (lora_bias, with which peft loads them, is refused above)
                untargeted.append(key)  # peft builds lora_B without a bias, so it never loads these (mergekit's
                # extract-lora writes a bias's change so)
            elif ".lora_" in name:
                problems.append(f"'{key}' is a LoRA tensor of a kind merge_engine does not merge")
            else:  # a whole tensor saved with the adapter (modules_to_save, an embedding's base layer)
                targets.setdefault(self._tied_name(name.replace(".base_layer.", ".")), _Target()).replacement = key
        for name, t in targets.items():
            problems += self._target_problems(name, t)
        if problems:
            raise CheckpointError(f"{self._file}: " + "; ".join(problems[:10])
                                  + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""))
        self._warn_layout(targets)
        if untargeted:
            log.warning("%s: %d LoRA tensor(s) (%s%s) belong to modules adapter_config.json's target_modules, "
                        "exclude_modules, layers_to_transform or modules_to_save leave out, or are lora_B biases "
                        "without lora_bias; peft ignores them, and so does merge_engine", self._file, len(untargeted),
                        ", ".join(untargeted[:3]), ", ..." if len(untargeted) > 3 else "")
        return targets

    def _untie(self, name: str) -> None:
        """peft replaces a modules_to_save module with a copy of its own: when it is an output head the base ties to
        its embeddings, or those embeddings, the two no longer share a matrix (peft's merged model unties them, and
        its config says so). The head the base has no tensor of is then read as a tensor of its own, the base's
        embeddings, which replacing either leaves as they are."""
        from merge_engine.plan import TIED_HEADS
        for head in TIED_HEADS:
            tied = self._tied_name(head)
            if head not in self.tensors and tied != head and name in (head, tied):
                self.tensors, self._stored = {**self.tensors, head: self.tensors[tied]}, {**self._stored,
                                                                                         head: self._stored[tied]}
                self.config = {**self.config, "tie_word_embeddings": False}

    def _tied_name(self, name: str) -> str:
        """The base tensor peft's update to weight `name` lands in: for an output head the base has no tensor of (its
        config ties it to the embeddings), the embeddings, the one matrix peft's two layers share."""
        from merge_engine.plan import TIED_HEADS  # (merge_engine.plan imports this module)
        if name in self.tensors:
            return name
        return next((tied for tied in TIED_HEADS.get(name, ()) if tied in self.tensors), name)

    def _target_problems(self, name: str, t: _Target) -> list[str]:
        info = self.tensors.get(name)
        if info is None:
            return [f"'{t.a or t.b or t.replacement}' changes '{name}', which {self.path} does not have"
                    + layout_hint(name, self.tensors)]
        def shape(key: str) -> tuple[int, ...]:
            return self._weights[key].shape
        if t.replacement and shape(t.replacement) != info.shape:
            return [f"'{t.replacement}' has shape {list(shape(t.replacement))} but '{name}' has {list(info.shape)}"]
        if (t.a is None) != (t.b is None):
            return [f"'{name}' has lora_{'A' if t.a else 'B'} without lora_{'B' if t.a else 'A'}"]
        if t.a is None:
            return []
        flat = [f"'{key}' has shape {list(shape(key))}, not a matrix (LoRA's A and B are 2-D)"
                for key in (t.a, t.b) if len(shape(key)) != 2]
        if flat:
            return flat
        (r, cols), (rows, r_b) = shape(t.a), shape(t.b)
        linear, conv1d = (rows, cols), (cols, rows)  # [out, in] and [in, out]
        t.transposed = t.embedding or (info.shape == conv1d if linear != conv1d and info.shape in (linear, conv1d)
                                       else self._square_layout)
        product = conv1d if t.transposed else linear
        if r != r_b or len(info.shape) != 2 or product != info.shape:
            return [f"lora_A {[r, cols]} and lora_B {[rows, r_b]} do not make '{name}' {list(info.shape)}"]
        if r != t.rank:  # peft builds the layer with the configured rank and cannot load other tensors into it
            return [f"'{t.a}' has rank {r} but adapter_config.json's {t.rank_from} gives "
                    f"'{name.removesuffix('.weight')}' rank {t.rank}"]
        return []

    def stored(self, name: str) -> TensorInfo:
        return self._stored[name]

    @property
    def folders(self) -> list[str]:
        return [self.path, self.adapter]

    def non_finite(self, name: str, count: int) -> str:
        """The adapter, when its update to `name` is not finite in the tensor's dtype (a huge lora_alpha); looked
        for only once a merge has failed."""
        t, dtype = self.targets.get(name, _NO_CHANGE), self.tensors[name].dtype
        if not t.a or _all_finite(self.delta(name, dtype).to(dtype)):
            return super().non_finite(name, count)
        return (f"{self.adapter}: its update to tensor '{name}' of {self.path}, at scale {t.scaling:g} (from "
                f"lora_alpha and r), overflows {dtype_name(dtype)}: {count} NaN or Inf value(s) once applied")

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        info = self.tensors[name]
        if info.dtype == self.stored(name).dtype:
            return self.apply_to(name, super().read(name, out))
        return self.apply_to(name, read_buffer(name, info, out).copy_(super().read(name)))

    def read_pooled(self, name: str, take_bytes: Callable[[int], torch.Tensor], direct_io: str = "auto") -> torch.Tensor:
        return self.apply_to(name, self.read_base_pooled(name, take_bytes, direct_io))

    def read_base_pooled(self, name: str, take_bytes: Callable[[int], torch.Tensor], direct_io: str = "auto") -> torch.Tensor:
        """Tensor `name` as the base folder stores it (in the merge dtype, when one is set), without the
        adapter's change."""
        stored, info = super().read_pooled(name, take_bytes, direct_io), self.tensors[name]
        if stored.dtype == info.dtype:
            return stored
        return take_bytes(info.nbytes).view(info.dtype).view(info.shape).copy_(stored)  # stored's buffer: garbage

    def adapter_bytes(self, name: str) -> int:
        """Bytes of the adapter tensors that change base tensor `name` (0 when the adapter leaves it as it is)."""
        t = self.targets.get(name)
        keys = [k for k in (t.a, t.b, t.replacement) if k] if t else []
        return sum(self._weights[key].nbytes for key in keys)

    def hold_adapter(self) -> None:
        """Read the adapter's low-rank updates (and what their targets replace) into memory once: apply_to then
        reads no file for them."""
        if self._held is None:
            self._held = {key: self._read_adapter(key) for t in self.targets.values() if t.a
                          for key in (t.a, t.b, t.replacement) if key}

    def apply_to(self, name: str, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's change to base tensor `name`: made in place in `weight` (its read buffer), or written to
        `out` (of weight's shape and dtype; weight is then left as it is)."""
        out = weight if out is None else out
        t = self.targets.get(name, _NO_CHANGE)
        if t.replacement:
            weight = out.copy_(self._adapter_tensor(t.replacement))
        if not t.a:
            return out if out is weight else out.copy_(weight)
        delta = self._delta(t, weight.dtype)
        if t.rounded or delta.dtype == weight.dtype:
            torch.add(weight, delta, out=out)
        else:  # peft's bf16/fp16 weight += fp32 update: the sum in fp32, rounded once. (A mixed-dtype add would
            # copy the weight to fp32 in fresh memory first, every tensor.)
            wide = self._scratch_buffer("weight", tuple(weight.shape), weight.dtype).copy_(weight)
            out.copy_(delta.add_(wide))
        return out

    def delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The low-rank update of tensor `name` (a base weight of `dtype`) as peft adds it: in fp32 (fp64 for an
        fp64 weight), or rounded to `dtype` for an embedding (and with MiCA). A fresh tensor."""
        return self._delta(self.targets[name], dtype, scratch=False)

    def _delta(self, t: _Target, dtype: torch.dtype, scratch: bool = True) -> torch.Tensor:
        a, b = self._adapter_tensor(t.a), self._adapter_tensor(t.b)
        out = self._scratch_buffer("product", (b.shape[0], a.shape[1]), dtype) if scratch else None
        delta = lora_delta(a, b, dtype, t.scaling, t.transposed, out)
        return delta.to(dtype) if t.rounded else delta

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        held = self._held.get(key) if self._held else None
        return held if held is not None else self._read_adapter(key)

    def _read_adapter(self, key: str) -> torch.Tensor:
        """Adapter tensor `key`, read from the file into fresh memory; CheckpointError naming the file and the
        tensor when the file has become shorter than its header says or the tensor holds NaN or Inf."""
        info = self._weights[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        self._read_into(info, tensor_bytes(out), key)
        if not _all_finite(out):
            raise CheckpointError(f"{info.file}: tensor '{key}' holds NaN or Inf values (a corrupt adapter?)")
        return out

    def _scratch_buffer(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """This read thread's fp32 (fp64 for an fp64 weight) scratch `slot`, grown to the largest shape so far."""
        compute = update_dtype(dtype)
        n, key = math.prod(shape), f"{slot}_{compute}"
        scratch = getattr(self._scratch, key, None)
        if scratch is None or scratch.numel() < n:
            scratch = torch.empty(n, dtype=compute)
            setattr(self._scratch, key, scratch)
        return scratch[:n].view(shape)

    def __repr__(self) -> str:
        return f"LoraCheckpoint({self.reference!r}, {len(self.targets)} tensors changed)"


def lora_delta(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scaling: float, transpose: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """peft's get_delta_weight for a base weight of `dtype`: peft holds A and B in fp32 (fp64 for an
    fp64 base: it upcasts bf16/fp16 adapter weights on load), so the update is formed in fp32 and the
    in-place add rounds once to the weight's dtype. out: a [B rows, A cols] buffer of that precision
    for the product (the same bits as a fresh one; it spares fresh pages per weight)."""
    compute = update_dtype(dtype)
    product = torch.matmul(b.to(compute), a.to(compute), out=out).mul_(scaling)
    return product.T if transpose else product


def _cast_info(info: TensorInfo, dtype: torch.dtype) -> TensorInfo:
    """A floating-point tensor's description as read cast to dtype (other tensors are read as stored)."""
    if not info.dtype.is_floating_point or info.dtype == dtype:
        return info
    return replace(info, dtype=dtype, nbytes=info.numel * dtype.itemsize)


def _all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """No NaN or Inf in floating-point tensor t, looked at a chunk at a time (a replaced embedding can be large)."""
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        if not bool(torch.isfinite(part if part.dtype.itemsize > 1 else part.float()).all()):  # no fp8 isfinite
            return False
    return True


def update_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision peft forms an update in for a weight of `dtype`: fp32, or fp64 for an fp64 weight."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rank(config: dict, module: str) -> tuple[int, str]:
    """The rank peft builds module's layer with, and the setting that gives it."""
    patterns = config.get("rank_pattern") or {}
    key = _pattern_key(patterns, module)
    return (config["r"], "r") if key is None else (patterns[key], f"rank_pattern {key!r}")


def _scaling(config: dict, module: str) -> float:
    r = _rank(config, module)[0]
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _pattern_problem(patterns, ranks: bool = False) -> str | None:
    """Why a rank_pattern (ranks) / alpha_pattern cannot be used (peft's keys are regular expressions), or None."""
    if not isinstance(patterns, dict):
        return "must map module-name patterns to numbers"
    for key, value in patterns.items():
        if not is_finite_number(value) or value <= 0 or (ranks and not is_int(value)):
            return f"the value for {key!r} must be a positive number{' (an integer rank)' if ranks else ' (finite)'}"
        problem = _regex_problem(key, rf"(.*\.)?({key})$")  # as _pattern_key matches it
        if problem:
            return problem
    return None


def _regex_problem(pattern: str, as_matched: str, max_repeats: int = MAX_PATTERN_REPEATS) -> str | None:
    """Why `pattern`, matched against module names as the expression `as_matched`, cannot be used, or None."""
    try:
        re.compile(as_matched)  # (inline flags must lead the whole)
    except re.error as e:
        return f"{pattern!r} is not a valid regular expression here ({e})"
    repeats = _repeat_count(pattern)
    if repeats == math.inf:
        return (f"{pattern!r} repeats a group that itself repeats or alternates, which can take exponential time "
                "to match a module name; write the names plainly")
    if repeats > max_repeats:
        return (f"{pattern!r} has {repeats} repeats (*, +, {{m,n}}), which can take time growing as the module name's "
                f"length to that power to match; at most {max_repeats} are taken (write the names plainly)")
    return None


def _repeat_count(pattern: str) -> float:
    """How many repeats (*, +, {m,n} with n > 1) a pattern holds, lookarounds included: Python's matcher may try
    every split of a name among repeats in sequence (".*.*.*X" backtracks as n**3 on a name of length n).
    Infinite where one repeats something that itself repeats or alternates ("(a+)+", "(.|[a-z])*Z"): that
    backtracks exponentially. Conservative: some such patterns are fast."""
    try:
        from re import _parser as parser  # Python 3.11+
    except ImportError:  # Python 3.10
        import sre_parse as parser

    def walk(items, repeated: bool) -> float:
        count = 0
        for op, av in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                many = av[1] > 1
                if repeated and many:
                    return math.inf
                count += many + walk(av[2], repeated or many)
            elif name in ("SUBPATTERN", "ASSERT", "ASSERT_NOT"):
                count += walk(av[-1], repeated)
            elif name == "ATOMIC_GROUP":
                count += walk(av, repeated)
            elif name in ("BRANCH", "GROUPREF_EXISTS"):
                alternatives = av[1] if name == "BRANCH" else [a for a in av[1:] if a is not None]
                if repeated:
                    return math.inf
                count += max(walk(a, repeated) for a in alternatives)
        return count
    return walk(parser.parse(pattern), False)


def _pattern_value(patterns: dict, module: str, default):
    key = _pattern_key(patterns, module)
    return default if key is None else patterns[key]


def _pattern_key(patterns: dict, module: str) -> str | None:
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def _targets(config: dict, module: str, embedding: bool) -> bool:
    """Whether peft builds a LoRA layer for `module` when it loads the adapter (its check_target_module_exists): not
    in exclude_modules nor modules_to_save, and named by target_modules (and in layers_to_transform)."""
    exclude = config.get("exclude_modules")
    if re.fullmatch(exclude, module) if isinstance(exclude, str) else _named_in(exclude or (), module):
        return False
    if any(re.match(rf"(^|.*\.){name}($|\..*)", module) for name in config.get("modules_to_save") or ()):
        return False
    wanted = config.get("target_modules")
    if wanted is None:  # peft takes its defaults for the model type; every module the adapter has is taken
        return True
    if isinstance(wanted, str):
        if wanted.lower() == ALL_LINEAR:  # every Linear or Conv1D layer, in every layer, but the output head
            return not embedding and module != OUTPUT_EMBEDDING
        return re.fullmatch(wanted, module) is not None
    if module in wanted:  # a full name: peft does not look at layers_to_transform then
        return True
    return _named_in(wanted, module) and _in_layers(config, module)


def _named_in(names, module: str) -> bool:
    return module in names or any(module.endswith(f".{name}") for name in names)


def _in_layers(config: dict, module: str) -> bool:
    """Whether module's layer is one layers_to_transform lists (its number the first after layers_pattern's name,
    or after the second name component when there is none), as peft reads them."""
    indexes, names = config.get("layers_to_transform"), config.get("layers_pattern")
    if indexes is None or indexes == []:
        return True
    found = None
    if not names:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    for name in [names] if isinstance(names, str) else names or ():
        found = re.match(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.", module)
        if found:
            break
    if found is None:
        return False
    return int(found["idx"]) == indexes if is_int(indexes) else int(found["idx"]) in indexes


def _targeting_problem(config: dict) -> str | None:
    """Why adapter_config.json's target_modules, exclude_modules, modules_to_save, layers_to_transform or
    layers_pattern cannot be read as peft reads them (which modules get a LoRA layer), or None."""
    patterns = []  # (regular expression, setting): peft matches every one of these against module names
    for setting in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
        value = config.get(setting)
        if isinstance(value, str) and setting != "modules_to_save":
            patterns.append((value, setting))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            patterns += [(v, setting) for v in value if setting in ("modules_to_save", "layers_pattern")]
        elif value is not None:
            return f"{setting} must be a list of module names{'' if setting == 'modules_to_save' else ' or a string'}"
    for pattern, setting in patterns:
        targets = setting in ("target_modules", "exclude_modules")
        problem = _regex_problem(pattern, pattern, MAX_TARGET_REPEATS if targets else MAX_PATTERN_REPEATS)
        if problem:
            return f"{setting}: {problem}"
    indexes = config.get("layers_to_transform")
    if not (indexes is None or is_int(indexes) or isinstance(indexes, list) and all(is_int(i) for i in indexes)):
        return "layers_to_transform must be a layer number or a list of them"
    return None
