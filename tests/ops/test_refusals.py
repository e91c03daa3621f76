"""The ops as a library other tools call: arguments no backend can use are refused alike, with a ValueError
saying what is wrong, on the compiled CPU kernels and on the references (which serve float64, non-contiguous
and mixed inputs, and every input when the kernels are off); inputs a backend could misread (memory shared
between what an op reads and writes, empty tensors) give every backend the reference's answer; and no op
hands back a gradient it did not compute."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from merge_engine import ops
from merge_engine.ops import backends
from merge_engine.ops.select import magnitude_cutoff_reference


@pytest.fixture(params=["compiled", "reference"])
def kernels(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(backends, "cpu_extension", lambda: None)
    elif backends.cpu_extension() is None:
        pytest.skip("the compiled CPU kernels are not built here")
    return request.param


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def task_vector_call(**changes):
    base, e1, e2 = rand(7, 5), rand(7, 5, seed=1), rand(7, 5, seed=2)
    call = dict(base=base, experts=[e1, e2], weights=[0.6, 0.4], densities=[0.5, 0.7], sparsify="magnitude",
                consensus=True)
    call.update(changes)
    return call


BAD_TASK_VECTOR_CALLS = {
    "one weight for two experts": (dict(weights=[0.6]), "2 experts but 1 weights"),
    "three densities": (dict(densities=[0.5, 0.5, 0.5]), "2 experts but 3 densities"),
    "gammas of another length": (dict(sparsify="outliers", gammas=[0.1]), "2 experts but 1 gammas"),
    "an expert of another shape": (dict(experts=[rand(7, 5), rand(1)]), r"expert 1 is a torch.float32 tensor of shape \[1\]"),
    "an expert of another dtype": (dict(experts=[rand(7, 5), rand(7, 5, dtype=torch.bfloat16)]),
                                   "expert 1 is a torch.bfloat16 tensor"),
    "a NaN density": (dict(densities=[float("nan"), 0.5]), r"densities\[0\] = nan: must be finite"),
    "a NaN density, DARE": (dict(sparsify="random", densities=[0.5, float("nan")]), r"densities\[1\] = nan"),
    "a NaN density, DELLA": (dict(sparsify="rank", densities=[float("nan"), 0.5], epsilons=[0.1, 0.1]),
                             r"densities\[0\] = nan"),
    "an infinite weight": (dict(weights=[float("inf"), 0.4]), r"weights\[0\] = inf"),
    "an unknown sparsifier": (dict(sparsify="topk"), "unknown sparsification 'topk'"),
    "an integer base": (dict(base=torch.zeros(7, 5, dtype=torch.int32), experts=[]), "floating-point"),
}


@pytest.mark.parametrize("case", BAD_TASK_VECTOR_CALLS)
def test_merge_task_vectors_refuses_alike_on_every_backend(kernels, case):
    changes, message = BAD_TASK_VECTOR_CALLS[case]
    with pytest.raises(ValueError, match=message):
        ops.merge_task_vectors(**task_vector_call(**changes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernels' and the reference's dtype
def test_out_unlike_the_result_is_refused_and_left_as_it_was(kernels, dtype):
    call = task_vector_call(base=rand(7, 5, dtype=dtype), experts=[rand(7, 5, seed=s, dtype=dtype) for s in (1, 2)])
    for out in (torch.full((2, 4), 7.0, dtype=dtype), torch.full((7, 5), 7, dtype=torch.int32)):
        with pytest.raises((ValueError, RuntimeError), match="out must be"):
            ops.merge_task_vectors(**call, out=out)
        assert bool((out == 7).all())
    params, fishers = [rand(3, 4, dtype=dtype), rand(3, 4, seed=1, dtype=dtype)], [torch.ones(3, 4), torch.ones(3, 4)]
    with pytest.raises((ValueError, RuntimeError), match="out must be"):
        ops.fisher_merge(params, fishers, [1.0, 1.0], [0.0, 0.0], out=torch.zeros(4, 3, dtype=dtype))


def test_della_without_epsilons_takes_zero_on_every_backend(monkeypatch):
    call = task_vector_call(sparsify="rank", densities=[0.5, 0.6])
    compiled = ops.merge_task_vectors(**call)
    monkeypatch.setattr(backends, "cpu_extension", lambda: None)
    assert torch.equal(compiled, ops.merge_task_vectors(**call))
    assert torch.equal(compiled, ops.merge_task_vectors(**call, epsilons=[0.0, 0.0]))


@pytest.mark.parametrize("sparsify, call", [
    ("trim_by_magnitude", lambda x, d: ops.trim_by_magnitude(x, d)),
    ("drop_random", lambda x, d: ops.drop_random(x, d, 0, "w", 0)),
    ("trim_outliers", lambda x, d: ops.trim_outliers(x, d, 0.1)),
    ("drop_by_rank", lambda x, d: ops.drop_by_rank(x, d, 0.1, 0, "w", 0)),
])
def test_a_nan_density_is_refused_by_every_sparsifier(sparsify, call):
    with pytest.raises(ValueError, match=f"{sparsify}: density = nan: must be finite"):
        call(rand(7, 5), float("nan"))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_magnitudes_of_integers_are_refused_by_name(dtype):
    with pytest.raises(ValueError, match=f"magnitudes are ordered for .* tensors, not {dtype}"):
        ops.magnitude_cutoff(torch.ones(4, dtype=dtype), 2)
    with pytest.raises(ValueError, match=f"trim_by_magnitude: x must be floating-point, got {dtype}"):
        ops.trim_by_magnitude(torch.ones(4, dtype=dtype), 0.5)


@pytest.mark.parametrize("largest", [True, False])
def test_the_cutoff_of_an_empty_tensor_selects_nothing_on_every_backend(kernels, largest):
    x = torch.empty(0)
    assert torch.equal(ops.magnitude_cutoff(x, 0, largest), magnitude_cutoff_reference(x, 0, largest))


def test_empty_inputs_give_empty_results(kernels):
    gram = torch.zeros(0, 0)
    ops.accumulate_gram(gram, torch.empty(4, 0))
    assert gram.shape == (0, 0)
    assert ops.drop_by_rank(torch.empty(0, 5), 0.5, 0.1, 0, "w", 0).shape == (0, 5)
    merged = ops.merge_task_vectors(**task_vector_call(base=torch.empty(0, 5), experts=[torch.empty(0, 5)] * 2,
                                                       sparsify="rank", epsilons=[0.1, 0.1]))
    assert merged.shape == (0, 5)


def test_weighted_sum_and_slerp_check_their_inputs_and_out():
    a, b = rand(4), rand(4, seed=1)
    refusals = {
        "2 tensors but 1 weights": lambda: ops.weighted_sum([a, b], [1.0]),
        "1 tensors but 2 weights": lambda: ops.weighted_sum([a], [0.5, 0.5]),
        r"tensor 1 has shape \[8\]": lambda: ops.weighted_sum([a, rand(8)], [0.5, 0.5]),
        r"tensor 1 has shape \[1\]": lambda: ops.weighted_sum([a, rand(1)], [0.5, 0.5]),
        "needs at least one tensor": lambda: ops.weighted_sum([], []),
        r"out must be a torch.float32 tensor of shape \[4\]": lambda: ops.weighted_sum([a, b], [0.5, 0.5],
                                                                                     out=torch.empty(10)),
        "out must be a torch.float32": lambda: ops.weighted_sum([a, b], [0.5, 0.5], out=torch.empty(4, dtype=torch.int32)),
        r"slerp: tensor 1 has shape \[8\]": lambda: ops.slerp(0.3, a, rand(8)),
        "slerp: out must be": lambda: ops.slerp(0.3, a, b, out=torch.empty(4, dtype=torch.int64)),
        r"nearswap: tensor 1 has shape \[1\]": lambda: ops.nearswap(0.5, a, rand(1)),
        r"nuslerp: tensor 1 has shape \[8\]": lambda: ops.nuslerp(0.5, a, rand(8)),
    }
    for message, call in refusals.items():
        with pytest.raises(ValueError, match=message):
            call()


def test_weighted_sum_and_slerp_take_non_contiguous_inputs_and_out():
    a, b = rand(5, 3), rand(5, 3, seed=1)
    want_sum, want_slerp = ops.weighted_sum([a, b], [0.3, 0.7]), ops.slerp(0.3, a, b)
    assert torch.equal(ops.weighted_sum([a.T.contiguous().T, b], [0.3, 0.7]), want_sum)  # a transposed view
    for call, want in ((lambda out: ops.weighted_sum([a, b], [0.3, 0.7], out=out), want_sum),
                       (lambda out: ops.slerp(0.3, a, b, out=out), want_slerp)):
        out = torch.zeros(3, 5).T  # a (5, 3) view with strides (1, 5)
        assert call(out) is out and torch.equal(out, want)


def test_zero_sum_weights_are_refused_where_they_would_divide():
    a, b = rand(6), rand(6, seed=1)
    with pytest.raises(ValueError, match="multislerp: the weights .* sum to 0"):
        ops.multislerp([a, b], [1.0, -1.0])
    with pytest.raises(ValueError, match="karcher_mean: the weights .* sum to 0"):
        ops.karcher_mean([a, b], [1.0, -1.0])
    with pytest.raises(ValueError, match="sce_merge: select_topk = nan"):
        ops.sce_merge(a, [b], float("nan"))


def test_scatter_add_reads_values_as_they_were_where_they_share_memory_with_a_target(kernels):
    layers = [torch.tensor([1.0, 10.0]), torch.tensor([100.0, 1000.0])]
    values = layers[0]  # block 0 is added to layer 1's block 1, then block 1 to layer 0's block 0
    expected = [torch.tensor([11.0, 10.0]), torch.tensor([100.0, 1001.0])]
    ops.scatter_add_blocks_(layers, 0, values, torch.tensor([1, 0]), torch.tensor([1, 0]), 0, 1)
    assert all(torch.equal(t, e) for t, e in zip(layers, expected)), layers


def test_tensors_an_op_writes_must_not_share_memory(kernels):
    t = rand(4, 3)
    with pytest.raises(ValueError, match="swap_blocks_: tensors 0 and 1 share memory"):
        ops.swap_blocks_([t, t], torch.tensor([[0, 0, 1, 1]]), 0, 2)
    with pytest.raises(ValueError, match="scatter_add_blocks_: tensors 0 and 1 share memory"):
        ops.scatter_add_blocks_([t, t], 0, rand(4, 3), torch.tensor([1, 0]), torch.tensor([0, 1]), 0, 2)
    stacked = rand(2, 4, 3)  # layers as disjoint views of one tensor are separate
    ops.swap_blocks_([stacked[0], stacked[1]], torch.tensor([[0, 0, 1, 1]]), 0, 2)
    gram = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="share memory with the gram"):
        ops.accumulate_gram(gram, gram)


def test_no_op_returns_a_gradient_it_did_not_compute(kernels):
    call = task_vector_call(base=rand(7, 5).requires_grad_(), sparsify="")
    merged = ops.merge_task_vectors(**call)
    with pytest.raises(RuntimeError, match="merge_engine::merge_task_vectors has no derivative"):
        merged.sum().backward()
    with torch.no_grad():
        assert not ops.merge_task_vectors(**call).requires_grad
    fisher = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="fisher requires grad, and this op writes into it"):
        ops.accumulate_fisher(fisher, rand(3), 1.0)
    with torch.no_grad():
        ops.accumulate_fisher(fisher, torch.ones(3), 1.0)
    assert torch.equal(fisher.detach(), torch.ones(3))


def test_nan_in_a_cutoffs_input_is_named_alike_on_every_backend(kernels):
    with pytest.raises(ValueError, match=r"^input has 1 NaN value\(s\); a magnitude ordering is undefined$"):
        ops.magnitude_cutoff(torch.tensor([1.0, float("nan"), 2.0]), 1)


def test_in_place_ops_refuse_targets_that_require_grad(kernels):
    layers = [rand(4, 3).requires_grad_(), rand(4, 3, seed=1).requires_grad_()]
    with pytest.raises(RuntimeError, match="accumulate_gram: gram requires grad"):
        ops.accumulate_gram(torch.zeros(3, 3, requires_grad=True), rand(2, 3))
    with pytest.raises(RuntimeError, match="swap_blocks_: tensors requires grad"):
        ops.swap_blocks_(layers, torch.tensor([[0, 0, 1, 1]]), 0, 2)
    with pytest.raises(RuntimeError, match="scatter_add_blocks_: targets requires grad"):
        ops.scatter_add_blocks_(layers, 0, rand(4, 3), torch.tensor([1, 0]), torch.tensor([0, 1]), 0, 2)


def test_meta_tensors_give_results_of_the_right_shape_and_dtype():
    x = rand(6, 4, dtype=torch.bfloat16).to("meta")
    merged = ops.merge_task_vectors(**task_vector_call(base=x, experts=[x, x]))
    assert merged.is_meta and merged.shape == x.shape and merged.dtype == x.dtype
    for result in (ops.slerp(0.3, x, x), ops.weighted_sum([x, x], [0.5, 0.5]), ops.trim_by_magnitude(x, 0.5)):
        assert result.is_meta and result.shape == x.shape and result.dtype == x.dtype


WRITTEN = 9  # the seed make() is given for the tensor a call writes (and 8 for a second one)


def writing_calls(make):
    """Every out overload and in-place op as a call of no arguments; make(shape, seed) makes its tensors, the
    ones it writes with seed WRITTEN or WRITTEN - 1."""
    base, e1, g, f1, f2 = (make((4, 3), seed) for seed in range(5))
    return {
        "merge_task_vectors": lambda: ops.merge_task_vectors(base, [e1, g], [0.5, 0.5], [0.5, 0.5], "magnitude",
                                                             out=make((4, 3), WRITTEN)),
        "fisher_merge": lambda: ops.fisher_merge([base, e1], [f1.abs(), f2.abs()], [1.0, 1.0], [0.0, 0.0],
                                                 out=make((4, 3), WRITTEN)),
        "weighted_sum": lambda: ops.weighted_sum([base, e1], [0.5, 0.5], out=make((4, 3), WRITTEN)),
        "slerp": lambda: ops.slerp(0.3, base, e1, out=make((4, 3), WRITTEN)),
        "accumulate_fisher": lambda: ops.accumulate_fisher(make((4, 3), WRITTEN), g, 0.5),
        "accumulate_gram": lambda: ops.accumulate_gram(make((3, 3), WRITTEN), g),
        "scatter_add_blocks_": lambda: ops.scatter_add_blocks_([make((4, 3), WRITTEN), make((4, 3), WRITTEN - 1)], 0,
                                                               g, torch.tensor([1, 0]), torch.tensor([0, 1]), 0, 2),
    }


WRITING = ["merge_task_vectors", "fisher_merge", "weighted_sum", "slerp", "accumulate_fisher", "accumulate_gram",
           "scatter_add_blocks_"]


@pytest.mark.parametrize("name", WRITING)
def test_ops_that_write_refuse_inputs_that_require_grad_alike(kernels, name):
    """As ATen's out= variants: what they write carries no derivative, so an input that requires grad is refused
    outside torch.no_grad() (the references' arithmetic would otherwise leave out a gradient nobody computed, or an
    autograd history growing with each accumulation, where the compiled kernels leave none)."""
    def make(shape, seed):  # the inputs require grad, the tensors written do not
        return rand(*shape, seed=seed).requires_grad_(seed < WRITTEN - 1)
    with pytest.raises(RuntimeError, match=f"{name}: .* requires grad, and this op has no derivative"):
        writing_calls(make)[name]()
    with torch.no_grad():
        writing_calls(make)[name]()


@pytest.mark.parametrize("name", WRITING)
def test_ops_that_write_refuse_inference_tensors_outside_inference_mode_alike(kernels, name):
    """As torch's in-place ops: an inference tensor is not written outside torch.inference_mode(), by the compiled
    kernels (which write through a data pointer torch cannot check) as by the references."""
    def inference_rand(shape, seed):
        with torch.inference_mode():
            return rand(*shape, seed=seed)
    with pytest.raises(RuntimeError, match=f"{name}: .* is an inference tensor"):
        writing_calls(inference_rand)[name]()
    with torch.inference_mode():
        writing_calls(inference_rand)[name]()


@pytest.mark.parametrize("name", WRITING[:4])
def test_meta_and_fake_outs_unlike_the_result_are_refused(name):
    """The out overloads' fakes check out as the real kernels do: shape propagation refuses what a run refuses."""
    for shape, dtype in (((3, 4), torch.float32), ((4, 3), torch.float64)):
        def make(s, seed, device):
            return torch.empty(shape if seed == WRITTEN else s, dtype=dtype if seed == WRITTEN else torch.float32,
                               device=device)
        with pytest.raises(ValueError, match=rf"{name}: out must be a torch.float32 tensor of shape \[4, 3\]"):
            writing_calls(lambda s, seed: make(s, seed, "meta"))[name]()
        with FakeTensorMode(), pytest.raises(ValueError, match=rf"{name}: out must be a torch.float32 tensor"):
            writing_calls(lambda s, seed: make(s, seed, "cpu"))[name]()
    writing_calls(lambda s, seed: torch.empty(s, device="meta"))[name]()  # an out like the result
