"""Every op as other tools' compiled code sees it: torch.library.opcheck (schema, fake implementation,
autograd registration, AOT dispatch with dynamic shapes) on the CPU kernels and the references;
the out overloads write into the caller's tensor; the public functions show their real signatures and
docstrings; the ops trace under torch.compile (fullgraph) and torch.export."""
import contextlib
import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map_only

from merge_engine import ops
from merge_engine.ops import backends


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def samples(dtype=torch.float32) -> dict[str, tuple[tuple, dict]]:
    """(args, kwargs) of one call of every op, on small odd shapes, in dtype (Fishers and Grams in fp32)."""
    base, e1, e2 = rand(7, 5, dtype=dtype), rand(7, 5, seed=1, dtype=dtype), rand(7, 5, seed=2, dtype=dtype)
    deltas = torch.stack([e1 - base, e2 - base])
    stack = [rand(6, 5, seed=s, dtype=dtype) for s in range(3)]  # three layers of 3 blocks of 2 rows
    src_layer, src_block = torch.tensor([0, 2, 1]), torch.tensor([0, 1, 2])
    tv = dict(weights=[0.6, 0.4], densities=[0.5, 0.7])
    return {
        "magnitude_cutoff": ((e1, 9), {}),
        "magnitude_topk_mask": ((e1, 9), {}),
        "trim_by_magnitude": ((e1, 0.4), {"rescale": True}),
        "drop_random": ((e1, 0.5, 3, "w", 1), {}),
        "trim_outliers": ((e1, 0.5, 0.1), {}),
        "drop_by_rank": ((e1, 0.5, 0.1, 3, "w", 1), {}),
        "elect_sign": ((deltas,), {}),
        "disjoint_mean": ((deltas, [0.6, 0.4]), {}),
        "merge_task_vectors": ((base, [e1, e2]), dict(tv, sparsify="magnitude", consensus=True, normalize=True)),
        "weighted_sum": (([base, e1, e2], [0.2, 0.3, 0.5]), {}),
        "slerp": ((0.3, e1, e2), {}),
        "nuslerp": ((0.3, e1, e2), {"row_wise": True}),
        "multislerp": (([e1, e2], [0.4, 0.6]), {"base": base}),
        "karcher_mean": (([e1, e2, base], [0.2, 0.3, 0.5]), {}),
        "nearswap": ((0.5, base, e1), {}),
        "sce_merge": ((base, [e1, e2]), {"select_topk": 0.5}),
        "ram_merge": ((base, [e1, e2]), {}),
        "ramplus_tl_merge": ((base, [e1, e2]), {}),
        "arcee_fusion": ((base, e1), {}),
        "tsv_merge": ((base, [e1, e2]), {}),
        "iso_c": ((base, [e1, e2]), {}),
        "fisher_merge": (([base, e1], [rand(7, 5, seed=3).abs(), rand(7, 5, seed=4).abs()], [1.0, 1.0], [1e-6, 0.0]), {}),
        "accumulate_fisher": ((torch.zeros(7, 5), e1, 0.5), {}),
        "accumulate_gram": ((torch.zeros(5, 5), e1), {"mask": torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)}),
        "gather_blocks": ((stack, 1, src_layer, src_block, 0, 2), {}),
        "scatter_add_blocks_": (([t.clone() for t in stack], 1, rand(6, 5, seed=5, dtype=dtype), src_layer, src_block,
                                 0, 2), {}),
        "swap_blocks_": (([t.clone() for t in stack], torch.tensor([[0, 1, 2, 0]]), 0, 2), {}),
    }


OUT_OPS = ("merge_task_vectors", "fisher_merge", "weighted_sum", "slerp")


def test_every_op_has_a_sample_and_every_declared_op_is_public():
    declared = {name for name in dir(torch.ops.merge_engine) if hasattr(getattr(torch.ops.merge_engine, name), "overloads")
                and not name.startswith("_")}  # _no_derivative: the library's own, in the backward of the others
    assert declared == set(samples()), declared ^ set(samples())
    assert all(hasattr(ops, name) for name in declared)
    # the plain helpers docs/kernels.md and the package docstring name: the rest of the public functions
    helpers = {"rescale_l1", "della_keep_probability", "mirror_upper_", "topk_count", "merge_task_vectors_reference"}
    assert set(ops.__all__) - declared == helpers
    assert all(name in ops.__doc__ for name in helpers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])  # half: promoted results
@pytest.mark.parametrize("kernels", ["compiled", "reference"])
@pytest.mark.parametrize("name", sorted(samples()))
def test_opcheck(name, kernels, dtype, monkeypatch):
    if kernels == "reference":
        monkeypatch.setattr(backends, "cpu_extension", lambda: None)  # the references as the CPU kernels
    args, kwargs = samples(dtype)[name]
    torch.library.opcheck(getattr(torch.ops.merge_engine, name).default, args, kwargs)


# ops that move, select or accumulate into tensors of other dtypes, whose inputs need not all be floating point
ANY_DTYPE_OPS = {"magnitude_cutoff", "magnitude_topk_mask", "gather_blocks", "scatter_add_blocks_", "swap_blocks_",
                 "accumulate_fisher", "accumulate_gram"}


def as_dtype(value, dtype):
    """The floating tensors in value (a tensor or a list of them) as dtype."""
    if isinstance(value, (list, tuple)):
        return type(value)(as_dtype(v, dtype) for v in value)
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.bool])
@pytest.mark.parametrize("kernels", ["compiled", "reference", "fake"])
@pytest.mark.parametrize("name", sorted(set(samples()) - ANY_DTYPE_OPS))
def test_tensors_that_are_not_floating_point_are_refused_by_every_backend(name, kernels, dtype, monkeypatch):
    """A complex tensor would lose its imaginary part (torch only warns), an integer one give a truncated
    result: each floating argument refuses them by name, on the references, the compiled kernels and the fakes."""
    if kernels == "reference":
        monkeypatch.setattr(backends, "cpu_extension", lambda: None)
    fn = getattr(ops, name)
    assert fn.floating, f"{name} declares no floating arguments"
    args, kwargs = samples()[name]
    for argument in fn.floating:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.arguments[argument] = as_dtype(bound.arguments[argument], dtype)
        call_args, call_kwargs = bound.args, bound.kwargs
        with FakeTensorMode() if kernels == "fake" else contextlib.nullcontext() as mode:
            if mode is not None:
                call_args, call_kwargs = tree_map_only(torch.Tensor, mode.from_tensor, (call_args, call_kwargs))
            with pytest.raises(ValueError, match=f"{name}: {argument} must be floating-point, got {dtype}"):
                fn(*call_args, **call_kwargs)


def transposed(value):
    """A 2-D floating tensor as a transposed view of a copy (same values, other strides); lists likewise."""
    if isinstance(value, (list, tuple)):
        return type(value)(transposed(v) for v in value)
    if torch.is_tensor(value) and value.dim() == 2 and value.is_floating_point():
        return value.t().contiguous().t()
    return value


@pytest.mark.parametrize("name", sorted(samples()))
def test_opcheck_on_transposed_inputs(name):
    """The fake result's strides are the real one's whatever the inputs' (compiled code allocates by them)."""
    args, kwargs = samples()[name]
    torch.library.opcheck(getattr(torch.ops.merge_engine, name).default, transposed(args),
                          {k: transposed(v) for k, v in kwargs.items()})


def four_d(value, memory_format):
    """The [7, 5] floating tensors of samples() as [1, 5, 7, 1] tensors in memory_format; lists likewise."""
    if isinstance(value, (list, tuple)):
        return type(value)(four_d(v, memory_format) for v in value)
    if torch.is_tensor(value) and value.shape == (7, 5) and value.is_floating_point():
        return value.reshape(1, 5, 7, 1).contiguous(memory_format=memory_format)
    return value


WRITING_OPS = ("accumulate_fisher", "accumulate_gram", "scatter_add_blocks_", "swap_blocks_")


@pytest.mark.parametrize("name", sorted(set(samples()) - set(WRITING_OPS)))
def test_channels_last_inputs_give_the_contiguous_result(name):
    """A conv weight's channels_last layout is an input like any other (up to the order of a sum): torch.stack keeps
    the inputs' memory format, so a stack of them cannot always be flattened by view."""
    args, kwargs = samples()[name]
    contiguous, channels_last = (getattr(ops, name)(*four_d(args, f), **{k: four_d(v, f) for k, v in kwargs.items()})
                                 for f in (torch.contiguous_format, torch.channels_last))
    torch.testing.assert_close(channels_last, contiguous)


@pytest.mark.parametrize("name", OUT_OPS)
def test_out_overloads_fill_the_callers_tensor(name):
    args, kwargs = samples()[name]
    want = getattr(ops, name)(*args, **kwargs)
    out = torch.full_like(want, float("nan"))
    assert getattr(ops, name)(*args, **kwargs, out=out) is out
    assert torch.equal(out, want)
    torch.library.opcheck(getattr(torch.ops.merge_engine, name).out, (torch.empty_like(want), *args), kwargs)


@pytest.mark.parametrize("kernels", ["compiled", "reference"])
@pytest.mark.parametrize("name", OUT_OPS)
def test_out_may_be_strided_or_share_an_inputs_memory(name, kernels, monkeypatch):
    """out= means the same on every backend: a strided out, an input given as out, and an out overlapping an
    input at an offset all get the result (a kernel that cannot write them in place copies into them); an out
    unlike the result is a ValueError."""
    if kernels == "reference":
        monkeypatch.setattr(backends, "cpu_extension", lambda: None)
    args, kwargs = samples()[name]
    want = getattr(ops, name)(*args, **kwargs)
    strided = torch.full((*want.shape[:-1], 2 * want.shape[-1]), float("nan"), dtype=want.dtype)[..., ::2]
    getattr(ops, name)(*args, **kwargs, out=strided)
    assert torch.equal(strided, want)
    tensors = [t for a in args for t in (a if isinstance(a, list) else [a]) if torch.is_tensor(t)]
    shared = next(t for t in tensors if (t.shape, t.dtype) == (want.shape, want.dtype))
    for offset in (0, 1):  # the input itself, and a view of its memory one element on
        memory = torch.cat([shared.flatten(), torch.zeros(1, dtype=want.dtype)])

        def moved(a):
            return [moved(x) for x in a] if isinstance(a, list) else memory[:want.numel()].view(want.shape) \
                if a is shared else a
        getattr(ops, name)(*map(moved, args), **kwargs, out=memory[offset:offset + want.numel()].view(want.shape))
        assert torch.equal(memory[offset:offset + want.numel()].view(want.shape), want), offset
    with pytest.raises(ValueError, match="out must be"):
        getattr(ops, name)(*args, **kwargs, out=torch.empty(want.shape, dtype=torch.float64))


def test_weighted_sum_into_an_out_overlapping_an_input_past_its_chunk():
    """weighted_sum works 2**20 elements at a time: an out one element past an input's start must not feed
    the later chunks what the earlier ones wrote."""
    memory = torch.randn(2**21 + 1)
    a, b = memory[:2**21].clone(), torch.randn(2**21)
    want = ops.weighted_sum([a, b], [0.25, 0.75])
    memory[:2**21] = a
    ops.weighted_sum([memory[:2**21], b], [0.25, 0.75], out=memory[1:])
    assert torch.equal(memory[1:], want)


@pytest.mark.parametrize("name", OUT_OPS)
def test_out_is_shown_keyword_only_as_it_is_taken(name):
    """help() and inspect.signature show the calls the function takes: out only by keyword, as ATen's out=."""
    args, kwargs = samples()[name]
    function, out = getattr(ops, name), torch.empty_like(getattr(ops, name)(*args, **kwargs))
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    positional = (*(value for argument, value in bound.arguments.items() if argument != "out"), out)
    with pytest.raises(TypeError):
        inspect.signature(function).bind(*positional)
    with pytest.raises(RuntimeError, match="expected at most"):
        function(*positional)


def test_ops_without_an_out_overload_refuse_out():
    args, kwargs = samples()["trim_by_magnitude"]
    with pytest.raises(TypeError, match="out"):
        ops.trim_by_magnitude(*args, **kwargs, out=torch.empty(7, 5))


@pytest.mark.parametrize("name", sorted(samples()))
def test_public_functions_show_their_signature_and_docstring(name):
    function = getattr(ops, name)
    parameters = inspect.signature(function).parameters
    schema = getattr(torch.ops.merge_engine, name).default._schema
    assert [p for p in parameters if p != "out"] == [a.name for a in schema.arguments]
    assert ("out" in parameters) == (name in OUT_OPS)
    assert function.__doc__ and len(function.__doc__.split()) >= 5
    assert "*args" not in str(inspect.signature(function))


def test_ops_trace_whole_under_torch_compile_and_export():
    args, kwargs = samples()["merge_task_vectors"]

    def merged(base, e1, e2):
        return ops.merge_task_vectors(base, [e1, e2], **kwargs) + ops.trim_by_magnitude(e1 - base, 0.5)
    compiled = torch.compile(merged, fullgraph=True, backend="eager")
    base, (e1, e2) = args
    assert torch.equal(compiled(base, e1, e2), merged(base, e1, e2))

    class Merge(torch.nn.Module):
        def forward(self, base, e1, e2):
            return merged(base, e1, e2)
    program = torch.export.export(Merge(), (base, e1, e2))
    assert torch.equal(program.module()(base, e1, e2), merged(base, e1, e2))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"merge_engine.merge_task_vectors.default", "merge_engine.trim_by_magnitude.default"} <= targets


def requiring_grad(value):
    """The floating tensors in value (a tensor or a list of them) as leaves that require grad."""
    if isinstance(value, (list, tuple)):
        return type(value)(requiring_grad(v) for v in value)
    return value.detach().requires_grad_() if torch.is_tensor(value) and value.is_floating_point() else value


@pytest.mark.parametrize("name", ["trim_by_magnitude", "merge_task_vectors", "weighted_sum", "slerp", "fisher_merge"])
def test_ops_on_inputs_that_require_grad_compile_and_refuse_backward_as_in_eager(name):
    """Under torch.compile (AOTAutograd traces the backward ahead of any call) the forward runs as in eager, and
    the backward raises when it runs, naming the op, as in eager."""
    args, kwargs = samples()[name]
    args = requiring_grad(args)

    def merged(*args):
        return getattr(ops, name)(*args, **kwargs) * 2
    torch._dynamo.reset()
    got = torch.compile(merged, fullgraph=True, backend="aot_eager")(*args)
    assert got.requires_grad and torch.equal(got, merged(*args))
    with pytest.raises(RuntimeError, match=f"merge_engine::{name} has no derivative"):
        got.sum().backward()


def test_meta_tensors_mixed_with_real_ones_are_refused():
    """The dispatcher runs the fake (the meta kernel) when any input is on meta; for real inputs beside it
    that would be an uninitialised result or a silent no-op, where torch's own ops raise."""
    cpu, meta = rand(4, 3), torch.empty(4, 3, device="meta")
    with pytest.raises(RuntimeError, match="fisher_merge: meta tensors mixed with tensors on cpu"):
        ops.fisher_merge([cpu], [meta], [1.0], [0.0])
    with pytest.raises(RuntimeError, match="accumulate_gram: meta tensors mixed"):
        ops.accumulate_gram(torch.zeros(3, 3), meta)
    with pytest.raises(RuntimeError, match="merge_task_vectors: meta tensors mixed"):
        ops.merge_task_vectors(cpu, [meta], [1.0], [1.0])
    shaped = ops.weighted_sum([meta, meta], [0.5, 0.5])  # all on meta: shapes only, as torch's ops
    assert shaped.device.type == "meta" and shaped.shape == (4, 3)
