"""Every registered method on TensorGroups: edge cases and closed forms."""
import pytest
import torch

from merge_engine import ops
from merge_engine.methods import REGISTRY, TensorGroup
from merge_engine.parameters import Scope
from tests.conftest import pairwise

GTA = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear"]


def group(method, tensors, base_index=0, shared=None, per_model=None, name="w"):
    """A TensorGroup with each parameter at its default unless given."""
    m = REGISTRY[method]
    sh = {p.name: p.default for p in m.shared_params}
    sh.update(shared or {})
    rows = []
    for i in range(len(tensors)):
        row = {p.name: p.default for p in m.model_params if i != base_index or p.scope == Scope.INPUT}
        row.update((per_model or [{}] * len(tensors))[i])
        rows.append(row)
    return TensorGroup(name, tensors, base_index, sh, rows)


def inputs(k, shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base.to(dtype)] + [(base + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]


def expert_params(k, **values):
    return [{}] + [{"weight": 1.0, **values} for _ in range(k)]


# every method on every shape and in both dtypes: a pairwise covering set
@pytest.mark.parametrize("method, shape, dtype", pairwise(GTA, [(1,), (7,), (9, 13)], [torch.float32, torch.bfloat16]))
def test_gta_methods_shapes_dtypes_and_identities(method, shape, dtype):
    t = inputs(2, shape, dtype, seed=len(shape))
    extra = {"density": 0.5}
    if method.startswith("della"):
        extra["epsilon"] = 0.1
    out = REGISTRY[method].merge(group(method, t, per_model=expert_params(2, **extra)))
    assert out.shape == t[0].shape and out.dtype == dtype and torch.isfinite(out).all()
    # all experts equal to the base: the output is the base, whatever the method
    same = [t[0]] * 3
    assert torch.equal(REGISTRY[method].merge(group(method, same, per_model=expert_params(2, **extra))), t[0])


@pytest.mark.parametrize("method", GTA[1:])  # task_arithmetic does not sparsify
def test_gta_density_zero_gives_base(method):
    t = inputs(3, (50,))
    extra = {"density": 0.0, "epsilon": 0.0} if method.startswith("della") else {"density": 0.0}
    out = REGISTRY[method].merge(group(method, t, per_model=expert_params(3, **extra)))
    assert torch.equal(out, t[0])


def test_ties_method_is_the_ties_op():
    t = inputs(3, (31, 5), seed=4)
    per = [{}, {"weight": 0.2, "density": 0.3}, {"weight": 0.5, "density": 0.9}, {"weight": 1.0, "density": 0.5}]
    got = REGISTRY["ties"].merge(group("ties", t, per_model=per, shared={"lambda": 0.8}))
    want = ops.merge_task_vectors(t[0], t[1:], [0.2, 0.5, 1.0], [0.3, 0.9, 0.5], "magnitude", True, True,
                                  lambda_=0.8)
    assert torch.equal(got, want)


def test_dare_depends_on_seed_and_tensor_name_only():
    t = inputs(2, (400,))
    per = expert_params(2, density=0.3)
    a = REGISTRY["dare_linear"].merge(group("dare_linear", t, per_model=per, name="x"))
    assert torch.equal(a, REGISTRY["dare_linear"].merge(group("dare_linear", t, per_model=per, name="x")))
    assert not torch.equal(a, REGISTRY["dare_linear"].merge(group("dare_linear", t, per_model=per, name="y")))


def test_linear_weights_and_single_input():
    t = inputs(2, (6, 4))
    per = [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}]
    torch.testing.assert_close(REGISTRY["linear"].merge(group("linear", t, None, per_model=per)),
                               (t[0] + 2 * t[1] + t[2]) / 4)
    one = REGISTRY["linear"].merge(group("linear", t[:1], None, per_model=[{"weight": 0.3}]))
    torch.testing.assert_close(one, t[0])


def test_slerp_method_endpoints():
    t = inputs(1, (8, 8))
    for tt, want in ((0.0, t[0]), (1.0, t[1])):
        torch.testing.assert_close(REGISTRY["slerp"].merge(group("slerp", t, shared={"t": tt})), want)
    # the base may be the second input: t still measures the distance from the base
    torch.testing.assert_close(REGISTRY["slerp"].merge(group("slerp", t[::-1], 1, shared={"t": 0.0})), t[0])


def test_nuslerp_with_base_interpolates_task_vectors():
    t = inputs(2, (5, 7), torch.float64)
    per = [{}, {"weight": 1.0}, {"weight": 3.0}]
    got = REGISTRY["nuslerp"].merge(group("nuslerp", t, per_model=per))
    assert torch.allclose(got, t[0] + ops.nuslerp(0.75, t[1] - t[0], t[2] - t[0]))


def test_model_stock_closed_form():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, generator=g, dtype=torch.float64)
    d1, d2 = torch.randn(200, generator=g, dtype=torch.float64), torch.randn(200, generator=g, dtype=torch.float64)
    w1, w2 = base + d1, base + d2
    cos = float((d1 @ d2) / (d1.norm() * d2.norm()))
    t = 2 * cos / (1 + cos)
    want = t * (w1 + w2) / 2 + (1 - t) * base
    got = REGISTRY["model_stock"].merge(group("model_stock", [base, w1, w2]))
    torch.testing.assert_close(got, want)
    # identical experts (cos = 1): t = 1, the output is their mean
    same = REGISTRY["model_stock"].merge(group("model_stock", [base, w1, w1.clone()]))
    torch.testing.assert_close(same, w1)


def test_passthrough_scale():
    x = torch.randn(3, 3)
    torch.testing.assert_close(REGISTRY["passthrough"].merge(group("passthrough", [x], None,
                                                                   per_model=[{"scale": 2.0}])), 2 * x)


def test_tied_embeddings_are_merged_once_like_any_tensor():
    # Qwen2-style checkpoints store only embed_tokens when embeddings are tied; the method sees one
    # tensor group for it, and an odd vocabulary size is fine.
    t = inputs(2, (257, 16))
    out = REGISTRY["ties"].merge(group("ties", t, per_model=expert_params(2, density=0.5),
                                       name="model.embed_tokens.weight"))
    assert out.shape == (257, 16)
