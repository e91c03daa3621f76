"""The Python bindings of the C++ CPU kernels (csrc/cpu/bindings.cpp): each kernel runs without the GIL."""
import pytest
import torch

from merge_engine.ops import backends
from tests.csrc.kernel_checks import another_thread_ran_during

if not backends.kernels_enabled():
    pytest.skip("compiled kernels disabled by MERGE_ENGINE_KERNELS=0", allow_module_level=True)

pytestmark = pytest.mark.cpu_kernels

N = 1 << 22  # elements: a kernel call long enough for a waiting thread to wake while it runs


def kernel_calls(ext):
    """name -> (kernel, its arguments), the arguments made beforehand: torch's own ops let the GIL go."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(N, generator=g).bfloat16() for _ in range(2))
    blocks = [torch.randn(1024, 4096, generator=g).bfloat16() for _ in range(4)]
    layers, sources = torch.randint(0, 4, (1024,), generator=g), torch.randperm(1024, generator=g)
    return {
        "merge_task_vectors": (ext.merge_task_vectors, (x, [y], [1.0], 0, [], [], [1.0], [], False, False, False, 1.0,
                                                        0, 0)),
        "delta_cutoffs": (ext.delta_cutoffs, (x, y, [N // 3], True)),
        "philox_uniforms": (ext.philox_uniforms, (0, N, 0, 1, 2)),
        "fisher_merge": (ext.fisher_merge, ([x, y], [y.abs(), x.abs()], [1.0, 1.0], [0.0, 0.0])),
        "accumulate_fisher": (ext.accumulate_fisher, (x.float(), y, 0.5)),
        "accumulate_gram": (ext.accumulate_gram, (torch.zeros(256, 256), torch.randn(1024, 256, generator=g), None)),
        "gather_blocks": (ext.gather_blocks, (blocks, 0, layers, sources, 0, 1)),
        "scatter_add_blocks": (ext.scatter_add_blocks, (blocks, 0, blocks[0], layers, sources, 0, 1)),
        "swap_blocks": (ext.swap_blocks, (blocks, torch.tensor([[0, i, 1, i] for i in range(1024)]), 0, 1)),
    }


@pytest.mark.parametrize("name", ["merge_task_vectors", "delta_cutoffs", "philox_uniforms", "fisher_merge",
                                  "accumulate_fisher", "accumulate_gram", "gather_blocks", "scatter_add_blocks",
                                  "swap_blocks"])
def test_kernels_let_other_python_threads_run(ext, name):
    # before, they held the GIL throughout: a merge's read and write threads, another merge in the process and the
    # caller's threads all stopped while a kernel computed
    kernel, arguments = kernel_calls(ext)[name]
    kernel(*arguments)  # (first-call costs out of the way)
    assert another_thread_ran_during(lambda: kernel(*arguments)), f"{name} holds the GIL while it computes"
