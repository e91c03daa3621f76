"""TSV-Merge and ISO-C (merge_engine/ops/spectral.py): their defining properties, and agreement with
independent fp64 computations on the same stored inputs.

Error bounds. u is the unit roundoff of the compute dtype (2^-24 for fp32, 2^-53 for fp64). LAPACK's
SVD is backward stable (LAPACK Users' Guide, section 4.9): singular values move by at most
E = p u ||D||_2 and singular vectors turn by at most E / gap, with p = p(m, n) "a modestly growing
function"; we take p = max(m, n). On top of this:
- forming D_t = W_t - W_base rounds once (u ||D_t||_F), the ISO-C sum T times (T u || sum |D_t| ||_F);
- TSV, to first order, moves each task's kept triplets in two ways. Their subspaces tilt by at most
  E_t / (s_k - s_k+1) (Wedin), so the U_k or V_k block moves by eta_t <= sqrt(2k) E_t / (s_k - s_k+1)
  in the Frobenius norm (0 when k = r); the polar factor of a full-rank X then moves by at most
  3 ||dX|| / sigma_min(X) (Li 1995 gives 2 / (sigma_r + sigma_r') for the Frobenius norm). And they
  rotate within their subspaces by some R, however close the singular values: polar(X R) =
  polar(X) R, so delta changes by U_perp (R S R^T - S) V_perp^T, at most 2 E_t; with E_t for S
  itself, 3 max E_t;
- the final products round once per term (K u s_max for K terms), the output once (u |out|) and the
  cast to the storage dtype once more (one ulp there).
Each comparison below also asserts that its bound is small next to the result, so it can fail.
"""
import math

import pytest
import torch

from merge_engine import ops
from merge_engine.ops.spectral import mean_task_arithmetic, tsv_factors, tsv_rank

SHAPES = [(7, 13), (33, 5), (12, 12)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def unit(dtype):
    return 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24


def stored(shape, tasks, dtype, seed, scale=0.1):
    """A base and `tasks` experts near it, rounded to the storage dtype."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    experts = [base + scale * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(tasks)]
    return base.to(dtype), [e.to(dtype) for e in experts]


def task_vectors64(base, experts):
    b = base.double()
    return b, [e.double() - b for e in experts]


def output_tolerance(b, delta, want, delta_bound, dtype, u):
    """delta's bound, plus rounding base + delta and casting to the storage dtype."""
    return delta_bound + u * (b.abs() + delta.abs()) + torch.finfo(dtype).eps * want.abs() + torch.finfo(dtype).tiny


def assert_within(got, want, tol):
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"max error {err.max():.3e}, where the bound is {tol.flatten()[err.argmax()]:.3e}"


# ---- TSV-Merge ----

def tsv_reference(base, experts, k, alpha):
    """TSV in fp64 laid out as the paper's code does: task i's top k in block i of zero-padded m x r
    and r x n factors (the padding's zero singular values drop its columns)."""
    b, ds = task_vectors64(base, experts)
    m, n = b.shape
    r = min(m, n)
    u_all, s_all, vh_all = torch.zeros(m, r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64), \
        torch.zeros(r, n, dtype=torch.float64)
    for i, d in enumerate(ds):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        u_all[:, i * k:(i + 1) * k], s_all[i * k:(i + 1) * k], vh_all[i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k]
    pu, _, qu = torch.linalg.svd(u_all, full_matrices=False)
    pv, _, qv = torch.linalg.svd(vh_all, full_matrices=False)
    delta = alpha * (pu @ qu) @ torch.diag(s_all) @ (pv @ qv)
    return b, delta, b + delta


def tsv_delta_bound(base, experts, k, alpha, u):
    _, ds = task_vectors64(base, experts)
    p = max(ds[0].shape)
    us, vhs, errors, eta2, s_max = [], [], [], 0.0, 0.0
    for d in ds:
        uu, s, vh = torch.linalg.svd(d, full_matrices=False)
        e = p * u * s[0] + u * torch.linalg.norm(d)
        if k < len(s):
            eta2 += 2 * k * (e / (s[k - 1] - s[k])) ** 2
        us.append(uu[:, :k])
        vhs.append(vh[:k])
        errors.append(e)
        s_max = max(s_max, s[0])
    sigma_u = torch.linalg.svdvals(torch.cat(us, 1)).min()
    sigma_v = torch.linalg.svdvals(torch.cat(vhs, 0)).min()
    tilt = s_max * 3 * math.sqrt(eta2) * (1 / sigma_u + 1 / sigma_v)
    return abs(alpha) * (tilt + 3 * max(errors) + len(ds) * k * u * s_max)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tasks,rank_fraction,alpha", [(2, None, 1.0), (3, 0.2, 0.7), (4, 0.15, -0.5)])
def test_tsv_matches_fp64_computation(shape, dtype, tasks, rank_fraction, alpha):
    base, experts = stored(shape, tasks, dtype, seed=sum(shape) + tasks)
    k = tsv_rank(min(shape), tasks, rank_fraction)
    got = ops.tsv_merge(base, experts, rank_fraction, alpha)
    assert got.dtype == dtype and got.shape == base.shape
    b, delta, want = tsv_reference(base, experts, k, alpha)
    bound = tsv_delta_bound(base, experts, k, alpha, unit(dtype))
    # the bound is loose where the concatenated factors are ill-conditioned (up to 3% of delta here),
    # still far below the 40-80% that skipping Procrustes costs on these inputs
    assert bound < 5e-2 * delta.abs().max()
    assert_within(got, want, output_tolerance(b, delta, want, bound, dtype, unit(dtype)))


@pytest.mark.parametrize("shape", SHAPES)
def test_tsv_of_one_expert_at_full_rank_is_the_expert(shape):
    """U and V are already orthonormal, so Procrustes keeps them and U S V^T rebuilds D: the error is
    the SVD's backward error p u ||D||, twice that for the two polar factors, and K u s_max for the
    product, plus the output rounding."""
    base, (expert,) = stored(shape, 1, torch.float32, seed=1)
    got = ops.tsv_merge(base, [expert], 1.0)
    b, (d,) = task_vectors64(base, [expert])
    u = unit(torch.float32)
    bound = (3 * max(shape) + min(shape)) * u * torch.linalg.matrix_norm(d, 2)
    assert_within(got, expert.double(), output_tolerance(b, d, expert.double(), bound, torch.float32, u))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tasks", [2, 3])
def test_tsv_delta_is_orthonormal_factors_times_the_tasks_top_singular_values(shape, tasks):
    """delta = U_perp S V_perp^T with orthonormal U_perp and V_perp, so its singular values are the
    T k kept ones (k capped at r // T even at rank_fraction 1) and the rest are zero.
    Orthonormality of a computed polar factor holds to 4 p u (two orthonormal SVD factors); the
    singular values then move by 8 p u s_max, plus K u s_max for the product, p u s_max for the
    tasks' own fp32 SVDs and u ||out||_F for the output rounding."""
    base, experts = stored(shape, tasks, torch.float32, seed=7 * tasks)
    k = tsv_rank(min(shape), tasks, 1.0)
    assert k == min(shape) // tasks
    b, ds = task_vectors64(base, experts)
    u_perp, s, v_perp_t = tsv_factors([d.float() for d in ds], k)
    p, u = max(shape), unit(torch.float32)
    eye = torch.eye(tasks * k, dtype=torch.float64)
    assert (u_perp.double().T @ u_perp.double() - eye).abs().max() <= 4 * p * u
    assert (v_perp_t.double() @ v_perp_t.double().T - eye).abs().max() <= 4 * p * u
    want = torch.cat([torch.linalg.svdvals(d)[:k] for d in ds]).sort(descending=True).values
    out = ops.tsv_merge(base, experts, 1.0)
    got = torch.linalg.svdvals(out.double() - b)
    tol = (9 * p + tasks * k) * u * want[0] + u * torch.linalg.norm(out.double())
    assert (got[:tasks * k] - want).abs().max() <= tol
    assert (got[tasks * k:] <= tol).all()


def test_tsv_of_tasks_in_orthogonal_subspaces_is_task_arithmetic():
    """Row and column spaces mutually orthogonal: the concatenated factors are already orthonormal,
    so nothing rotates and delta = sum_t D_t. Each task has rank 2 but keeps k = r // T = 3, so its
    third component is numerical noise that must be dropped (its singular vectors are arbitrary).
    Error: as for one expert, (3p + K) u s_max, with the output rounding."""
    m, n, tasks, rank = 12, 10, 3, 2
    g = torch.Generator().manual_seed(3)
    left = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    base = torch.randn(m, n, generator=g, dtype=torch.float64)
    experts = []
    for t in range(tasks):
        cols = slice(t * rank, (t + 1) * rank)
        s = 1 + 2 * torch.rand(rank, generator=g, dtype=torch.float64)
        experts.append((base + (left[:, cols] * s) @ right[:, cols].T).float())
    base = base.float()
    assert tsv_rank(n, tasks, 1.0) == 3
    b, ds = task_vectors64(base, experts)
    want = b + 0.5 * sum(ds)
    u, s_max = unit(torch.float32), max(torch.linalg.matrix_norm(d, 2) for d in ds)
    bound = 0.5 * (3 * max(m, n) + tasks * 3) * u * s_max
    assert_within(ops.tsv_merge(base, experts, 1.0, 0.5), want,
                  output_tolerance(b, want - b, want, bound, torch.float32, u))


def test_zero_task_vectors_contribute_nothing():
    base, experts = stored((9, 14), 2, torch.float32, seed=5)
    assert torch.equal(ops.tsv_merge(base, [base.clone(), base.clone()]), base)
    assert torch.equal(ops.iso_c(base, [base.clone(), base.clone()]), base)
    # rank_fraction 0.2 keeps max(1, int(1.8)) = 1 per task for T = 2 and 3 alike (cap 4 and 3)
    assert torch.equal(ops.tsv_merge(base, experts + [base.clone()], 0.2), ops.tsv_merge(base, experts, 0.2))


def test_tsv_falls_back_to_the_mean_when_tasks_outnumber_the_rank():
    base, experts = stored((2, 9), 3, torch.float32, seed=6)
    assert tsv_rank(2, 3, None) == 0
    assert torch.equal(ops.tsv_merge(base, experts, None, 0.8), mean_task_arithmetic(base, experts, 0.8))


# ---- ISO-C ----

def iso_c_reference(base, experts, alpha):
    b, ds = task_vectors64(base, experts)
    u, s, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    delta = alpha * u @ torch.diag(torch.full_like(s, s.sum().item() / len(s))) @ vh
    return b, delta, b + delta


def iso_c_delta_bound(base, experts, alpha, u):
    _, ds = task_vectors64(base, experts)
    s = torch.linalg.svdvals(sum(ds))
    e = max(ds[0].shape) * u * s[0] + len(ds) * u * torch.linalg.norm(sum(d.abs() for d in ds))
    return abs(alpha) * (e + s.mean() * 3 * e / s[-1] + len(s) * u * s.mean())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tasks,alpha", [(1, 1.0), (3, 0.4), (5, -1.3)])
def test_iso_c_matches_fp64_computation(shape, dtype, tasks, alpha):
    base, experts = stored(shape, tasks, dtype, seed=sum(shape) * tasks)
    got = ops.iso_c(base, experts, alpha)
    assert got.dtype == dtype and got.shape == base.shape
    b, delta, want = iso_c_reference(base, experts, alpha)
    bound = iso_c_delta_bound(base, experts, alpha, unit(dtype))
    assert bound < 1e-3 * delta.abs().max()
    assert_within(got, want, output_tolerance(b, delta, want, bound, dtype, unit(dtype)))


@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_delta_has_a_flat_spectrum_at_alpha_times_the_mean(shape):
    """Singular values of out - base: alpha * mean(S) each, to the bound above in the 2-norm
    (it bounds the 2-norm change of delta) plus u ||out||_F for the output rounding."""
    base, experts = stored(shape, 3, torch.float32, seed=11)
    alpha = 0.6
    out = ops.iso_c(base, experts, alpha)
    b, ds = task_vectors64(base, experts)
    got = torch.linalg.svdvals(out.double() - b)
    want = alpha * torch.linalg.svdvals(sum(ds)).mean()
    tol = iso_c_delta_bound(base, experts, alpha, unit(torch.float32)) + unit(torch.float32) * torch.linalg.norm(
        out.double())
    assert (got - want).abs().max() <= tol < 1e-3 * want


@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_of_one_isotropic_expert_is_the_expert(shape):
    """D = c Q with Q orthonormal: the spectrum is already flat. Error: the SVD's backward error and
    the product's rounding, (p + r) u c, plus the output rounding."""
    g = torch.Generator().manual_seed(2)
    m, n = shape
    q = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=g, dtype=torch.float64)).Q
    q = q if m >= n else q.T
    base = torch.randn(shape, generator=g, dtype=torch.float64).float()
    expert = (base.double() + 0.3 * q).float()
    b, (d,) = task_vectors64(base, [expert])
    u = unit(torch.float32)
    bound = (max(shape) + min(shape)) * u * torch.linalg.matrix_norm(d, 2)
    assert_within(ops.iso_c(base, [expert]), expert.double(),
                  output_tolerance(b, d, expert.double(), bound, torch.float32, u))


# ---- both ----

@pytest.mark.parametrize("shape", [(), (5,), (3, 4, 2), (0, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_matrices_get_alpha_times_the_mean_task_vector(shape, dtype):
    """base + alpha mean(D_t) in fp32: T + 2 roundings of terms up to |b| + |alpha| max|D_t|, then the cast."""
    base, experts = stored(shape, 3, dtype, seed=4)
    b, ds = task_vectors64(base, experts)
    want = b + 0.9 * sum(ds) / 3
    scale = b.abs() + 0.9 * torch.stack(ds).abs().amax(0) if ds[0].numel() else b
    tol = 5 * unit(dtype) * scale + torch.finfo(dtype).eps * want.abs()
    for got in (ops.tsv_merge(base, experts, None, 0.9), ops.iso_c(base, experts, 0.9)):
        assert got.dtype == dtype and got.shape == base.shape
        assert_within(got, want, tol)


def test_bad_arguments_are_refused():
    base, experts = stored((4, 6), 2, torch.float32, seed=0)
    for call, match in [
        (lambda: ops.tsv_merge(base, []), "at least one expert"),
        (lambda: ops.iso_c(base, [experts[0], experts[1][:3]]), r"expert 1 is torch.float32 \[3, 6\]"),
        (lambda: ops.iso_c(base, [experts[0].double()]), "expert 0 is torch.float64"),
        (lambda: ops.tsv_merge(base, experts, 0.0), r"rank_fraction must be in \(0, 1\]"),
        (lambda: ops.tsv_merge(base, experts, 1.5), r"rank_fraction must be in \(0, 1\]"),
        (lambda: ops.iso_c(base, experts, math.inf), "alpha must be finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_ops_are_registered_with_shape_functions():
    base = torch.empty(7, 13, device="meta")
    assert torch.ops.merge_engine.tsv_merge(base, [base, base], 0.5, 1.0).shape == (7, 13)
    assert torch.ops.merge_engine.iso_c(base, [base], 1.0).device.type == "meta"
