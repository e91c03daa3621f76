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


def mergekit_model_stock(w_0, ws, filter_wise):
    """mergekit 0.1.5's ModelStockMergeTask.execute, whole tensors at a time (t = 0 where singular, as
    0.1.5 returns the base there)."""
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.view(-1), [w.view(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, w_0_offset in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            norm_product = torch.norm(w_0_offset, dim=-1) * torch.norm(offsets[j], dim=-1)
            cos_thetas.append(((w_0_offset * offsets[j]).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / torch.where(singular, 1, denominator))
    return (t * (sum(ws) / len(ws)) + (1 - t) * w_0).reshape(out_shape)


# sizes past the method's 1M-element chunks and torch's per-thread reduction grain, 1-D to 3-D
# (expert counts other than 3 on one dtype and shape: the rest is the same code)
@pytest.mark.parametrize("shape, dtype, k", [
    *[(shape, dtype, 3) for shape in [(1_300_001,), (1031, 1337), (5, 300_007), (3, 7, 11), (0, 4)]
      for dtype in (torch.bfloat16, torch.float16, torch.float32)],
    ((1031, 1337), torch.bfloat16, 2), ((1031, 1337), torch.bfloat16, 4)])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_is_mergekits_arithmetic_bit_for_bit(shape, dtype, filter_wise, k):
    tensors = inputs(k, shape, dtype, seed=k)
    want = mergekit_model_stock(tensors[0], tensors[1:], filter_wise)
    pool = []
    take = lambda shape, dtype: pool.append(torch.full(shape, float("nan"), dtype=dtype)) or pool[-1]  # noqa: E731
    for take_output in (None, take):
        g = group("model_stock", tensors, shared={"filter_wise": filter_wise})
        g.take_output = take_output
        got = REGISTRY["model_stock"].merge(g)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want)


class _FreshMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every tensor the ops inside it allocate (an output that is none of its inputs' storage)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.sizes.append(t.untyped_storage().nbytes())
        return result


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_memory_is_one_tensor_beyond_its_output(filter_wise):
    """Whatever the expert count: one tensor-sized scratch (the output buffer is the other), and chunks."""
    tensors = inputs(4, (2048, 1536), torch.bfloat16)
    g = group("model_stock", tensors, shared={"filter_wise": filter_wise})
    buffer = torch.empty_like(tensors[0])  # the engine's recycled output buffer
    g.take_output = lambda shape, dtype: buffer
    with _FreshMemory() as fresh:
        REGISTRY["model_stock"].merge(g)
    tensor_bytes = tensors[0].nbytes
    large = [n for n in fresh.sizes if n > tensor_bytes // 2]
    assert large == [tensor_bytes], large  # mergekit's whole-tensor arithmetic: 4 offsets, 6 products, sums...
    assert sum(n for n in fresh.sizes if n <= tensor_bytes // 2) < 16 * tensor_bytes  # chunks, freed as it goes


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
