"""KeyedModel: the keyed configuration, read through index maps, equals a model whose weights were physically
permuted (logits and gradients); the public configuration is the plain model; no configuration writes the weights.

Tolerance: exact (torch.equal). The keyed forward feeds the same kernels the same values, in contiguous tensors
of the same shapes, so logits are bit-identical. Gradients are too: each element of a Parameter receives the
gradient of its one keyed position, plus exact zeros from index_copy's and index_select's backward.
"""
import functools

import pytest
import torch
import transformers as tf

from merge_engine.demo import tiny_config
from merge_engine.errors import MergeEngineError
from merge_engine.stats.fisher import enable_gradient_checkpointing
from merge_engine.tiers import BlockPermutation, KeyedModel, TierKey, TierKeyError, apply_key, generate_key
from merge_engine.tiers.forward import METHODS
from tests.tiers.conftest import read_config, swap_by_hand

pytestmark = pytest.mark.slow  # whole models' forward and backward passes

ARCHS = ("llama", "qwen2", "gpt2")
TIERS = ("key", "tier")  # one generated key; a composed tier of two keys


@functools.lru_cache(maxsize=None)
def initial_state(arch: str) -> dict:
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tiny_config(arch)).state_dict()


def tiny_model(arch: str, state: dict | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch))
    model.load_state_dict(initial_state(arch) if state is None else state)
    return model.to(dtype).eval()


@functools.lru_cache(maxsize=None)
def keys_for(arch: str, tier: str) -> tuple[TierKey, ...]:
    cfg = tiny_config(arch).to_dict()
    keys = (generate_key(cfg, "first secret", 0.3, 0.6), generate_key(cfg, "second secret", 0.25, 0.6))
    assert all(k.attn_heads and k.mlp_cols for k in keys)
    return keys[:1] if tier == "key" else keys


def permuted(state: dict, arch: str, keys) -> dict:
    """The state dict with the keys applied in order, by the tests' own by-hand swaps."""
    cfg = tiny_config(arch).to_dict()
    for key in keys:
        state = swap_by_hand(state, cfg, key)
    return state


def unpermuted(state: dict, arch: str, keys) -> dict:
    return permuted(state, arch, reversed(keys))  # each key undoes itself


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_keyed_logits_equal_the_permuted_model(arch, tier):
    keys = keys_for(arch, tier)
    model, ids = tiny_model(arch), tokens()
    with torch.no_grad():
        plain = model(ids).logits
        keyed = KeyedModel(model, list(keys))
        public = keyed(ids).logits
        with keyed.configuration("keyed"):
            keyed_logits = keyed(ids).logits
        want = tiny_model(arch, permuted(initial_state(arch), arch, keys))(ids).logits
    assert torch.equal(public, plain)
    assert torch.equal(keyed_logits, want)
    assert not torch.equal(keyed_logits, plain)


@pytest.mark.parametrize("arch", ("llama", "qwen2", "gpt2", "gpt_neo", "qwen3", "qwen3_moe", "mistral"))
def test_keyed_logits_equal_the_key_applied_on_disk(arch, tier_model, tmp_path):
    """Against apply_key's output folder, reloaded (llama: bf16; gpt_neo: the reference code's layout; qwen3_moe: its
    attention alone, as its MLP is a mixture of experts)."""
    model_dir = tier_model(arch)
    share = 1.0 if arch == "qwen3_moe" else 0.6
    keys = [generate_key(read_config(model_dir), secret, 0.3, share) for secret in ("first secret", "second secret")]
    apply_key(model_dir, keys, str(tmp_path / "keyed"))
    ids = tokens()
    with torch.no_grad():
        keyed = KeyedModel(tf.AutoModelForCausalLM.from_pretrained(model_dir).eval(), keys, configuration="keyed")
        got = keyed(ids).logits
        want = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "keyed")).eval()(ids).logits
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_keyed_gradients_are_the_permuted_models_mapped_back(arch, tier):
    """float64; every Parameter's gradient, tied embeddings (Qwen2) included."""
    keys, ids = keys_for(arch, tier), tokens()
    model = tiny_model(arch, dtype=torch.float64)
    plain = loss_and_grads(model, ids)
    keyed = KeyedModel(model, list(keys))
    assert all(torch.equal(g, plain[n]) for n, g in loss_and_grads(model, ids).items())  # public
    with keyed.configuration("keyed"):
        got = loss_and_grads(model, ids)
    reference = tiny_model(arch, permuted(initial_state(arch), arch, keys), torch.float64)
    want = unpermuted(loss_and_grads(reference, ids), arch, keys)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert any(not torch.equal(got[n], plain[n]) for n in plain if ".layers.0." in n or ".h.0." in n)


def snapshot(model: torch.nn.Module) -> dict:
    return {name: (p, p.detach().clone()) for name, p in model.named_parameters()}


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    """The same Parameter objects, in their modules, with the same values."""
    for name, p in model.named_parameters():
        param, values = before[name]
        assert p is param and isinstance(p, torch.nn.Parameter), name
        assert torch.equal(p, values), name


def test_alternating_steps_leave_the_weights_untouched():
    model, ids = tiny_model("qwen2", dtype=torch.float64), tokens()
    keyed = KeyedModel(model, list(keys_for("qwen2", "tier")))
    before = snapshot(model)
    grads = {}
    for name in ("public", "keyed", "public", "keyed"):
        with keyed.configuration(name):
            grads[name] = loss_and_grads(model, ids)
        assert_untouched(model, before)
        assert keyed.active == "public"
    # a joint step (public + keyed loss, one backward) accumulates both gradients into the shared Parameters
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    with keyed.configuration("keyed"):
        loss = loss + model(ids, labels=ids).loss
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads["public"][name] + grads["keyed"][name], rtol=1e-12, atol=1e-15)
    assert_untouched(model, before)


def test_parameters_are_put_back_when_a_forward_raises():
    model = tiny_model("llama")
    keyed = KeyedModel(model, list(keys_for("llama", "key")), configuration="keyed")
    before = snapshot(model)
    q_proj = model.model.layers[1].self_attn.q_proj

    def fail(module, args):
        assert not isinstance(module.weight, torch.nn.Parameter)  # the keyed weight stands in
        raise RuntimeError("boom")
    handle = q_proj.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        keyed(tokens())
    handle.remove()
    assert_untouched(model, before)


def test_gradient_checkpointing_backward_inside_the_configuration():
    """The recomputation in backward runs the hooks again, in the configuration active then."""
    ids, model = tokens(), tiny_model("llama", dtype=torch.float64)
    keyed = KeyedModel(model, list(keys_for("llama", "tier")))
    with keyed.configuration("keyed"):
        want = loss_and_grads(model, ids)
    enable_gradient_checkpointing(model)
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda module, args: calls.append(1))
    with keyed.configuration("keyed"):
        got = loss_and_grads(model, ids)
    assert len(calls) == 2  # forward, and again in backward
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_identity_remove_and_refusals():
    model, ids = tiny_model("llama"), tokens()
    with torch.no_grad():
        plain = model(ids).logits
        identity = KeyedModel(model, TierKey(), configuration="keyed")
        assert torch.equal(identity(ids).logits, plain) and identity.touched == ()  # nothing hooked
        keyed = KeyedModel(model, list(keys_for("llama", "key")), configuration="keyed")
        assert set(keyed.touched) <= dict(model.named_parameters()).keys() and "model.layers.0.mlp.down_proj.weight" \
            in keyed.touched
        assert not torch.equal(model(ids).logits, plain)
        keyed.remove()
        assert torch.equal(model(ids).logits, plain)
    with pytest.raises(ValueError, match="unknown configuration"):
        identity.set_configuration("secret")
    with pytest.raises(TierKeyError, match="model_type 'gpt2'"):
        KeyedModel(model, keys_for("gpt2", "key"))
    with pytest.raises(TierKeyError, match="outside"):
        KeyedModel(model, BlockPermutation.from_swaps({"mlp_cols": [((0, 1), (9, 1))]}))
    model.model.layers[2].mlp.down_proj.to(torch.float16)  # blocks would move between dtypes: refused up front
    for method in METHODS:
        with pytest.raises(MergeEngineError, match=r"'model.layers.2.mlp.down_proj.weight' is float16 on cpu but "
                                                   r"'model.layers.0.mlp.down_proj.weight' is float32"):
            KeyedModel(model, list(keys_for("llama", "key")), method=method)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_swap_method_equals_rebuild_and_puts_the_blocks_back(arch, tier):
    """method "swap": the same logits and gradients as "rebuild" (bit for bit), gradients accumulated across a public
    and a keyed backward included, and the Parameters' values back when the configuration is left."""
    keys, ids = list(keys_for(arch, tier)), tokens()
    results = {}
    for method in ("rebuild", "swap"):
        model = tiny_model(arch, dtype=torch.float64)
        before = snapshot(model)
        keyed = KeyedModel(model, keys, method=method)
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()  # public gradients, then keyed ones added
        with keyed.configuration("keyed"):
            logits = model(ids, labels=ids)
            logits.loss.backward()
        results[method] = logits.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
        assert_untouched(model, before)
        keyed.remove()
        assert_untouched(model, before)
    assert torch.equal(results["swap"][0], results["rebuild"][0])
    for name, grad in results["rebuild"][1].items():
        assert torch.equal(results["swap"][1][name], grad), name


def test_swap_method_refuses_a_backward_after_the_blocks_moved():
    """Autograd's own check: a forward's saved Parameters were moved in place, so its backward raises rather than
    computing wrong gradients (method "rebuild" is the one for graphs that mix configurations)."""
    model, ids = tiny_model("llama"), tokens()
    keyed = KeyedModel(model, list(keys_for("llama", "key")), method="swap")
    with keyed.configuration("keyed"):
        loss = model(ids, labels=ids).loss
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(ValueError, match="unknown method"):
        KeyedModel(model, list(keys_for("llama", "key")), method="fused")
