"""Embedding rows for tokens a model lacks, from a donor model that has them: the approximation methods of
mergekit-tokensurgeon 0.1.5 (mergekit/tokensurgeon/), computed with the same operations in the same order so that
the rows agree bit for bit, with their random draws taken from a given generator rather than torch's global one.
Least-squares solutions (stb, mp_rope, the barycentric and least_squares weights) are the exception: on the CPU they
come from LAPACK's gelsd rather than torch's default gelsy, whose last bits change from run to run (mergekit's
rows change with them), and so differ from mergekit's in their last bits (about 1e-6 relative on the test models).

Every method gets the rows to approximate as `targets` (donor embeddings, [B, D_donor]) and the tokens both
vocabularies share as `donor_shared` [N, D_donor] and `orig_shared` [N, D_orig] (row i: the same token):

    orthogonal_matching_pursuit   k shared tokens whose donor rows best span each target (greedy, orthogonalised);
                                  the target's coefficients on them, applied to their rows in the model ("omp")
    matching_pursuit_rope         the same with each chosen row rotated to a RoPE position ("mp_rope")
    interpolation_weights         the k nearest shared tokens (euclidean or cosine) and weights by distance,
                                  barycentric or least squares ("common_interpolation")
    landmark_pca                  both spaces' principal axes, aligned by Procrustes on the shared tokens
    token_basis / from_token_basis  a basis of sparse combinations of shared tokens ("stb")
    subword_rows                  the rows of the tokens the model's own tokenizer splits the text into
    john_hewitt_rows              draws from a normal fitted to the model's rows
    under_trained_rows            the rows that look under-trained ("Fishing for Magikarp", arXiv:2405.05417)
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("merge_engine")


def standard_normal(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator) -> torch.Tensor:
    """Standard normal draws from generator, on its device (the CPU's: the same draws whatever --device), then moved
    to device."""
    return torch.randn(shape, dtype=dtype, device=generator.device, generator=generator).to(device)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def least_squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.linalg.lstsq(a, b).solution, the same from run to run: on the CPU by the SVD (gelsd), as rank-revealing
    as torch's default gelsy, whose MKL build gives other last bits with the inputs' alignment and from call to call;
    elsewhere by the only driver CUDA has."""
    return torch.linalg.lstsq(a, b, driver="gelsd" if a.device.type == "cpu" else None).solution


def orthogonal_matching_pursuit(targets: torch.Tensor, atoms: torch.Tensor, k: int, eps: float = 1e-8,
                                reorthogonalize_every: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, k], coefficients [B, k]): for each target, k atoms chosen one at a time as the one most
    correlated with what the chosen ones leave unexplained (the residual after projecting onto their span, kept as
    a Gram-Schmidt QR), then the least-squares coefficients on them (R^-1 Q^T target)."""
    batch, dim = targets.shape
    if k > atoms.shape[0]:
        raise ValueError(f"cannot choose {k} tokens from {atoms.shape[0]} shared ones")
    work = _work_dtype(targets)
    y, a = targets.to(work), atoms.to(work)
    q = torch.zeros((batch, dim, k), dtype=work, device=y.device)
    r = torch.zeros((batch, k, k), dtype=work, device=y.device)
    chosen = torch.zeros((batch, k), dtype=torch.long, device=y.device)
    taken = torch.zeros((batch, a.shape[0]), dtype=torch.bool, device=y.device)
    residual = y.clone()
    for t in range(k):
        atom = a[_choose(residual, a, taken, chosen, t)]
        if t == 0:
            r[:, 0, 0] = atom.norm(dim=1)
            q[:, :, 0] = atom / r[:, 0, 0].clamp(min=eps).unsqueeze(1)
        else:
            projection = torch.bmm(q[:, :, :t].transpose(1, 2), atom.unsqueeze(-1)).squeeze(-1)
            rest = atom - torch.bmm(q[:, :, :t], projection.unsqueeze(-1)).squeeze(-1)
            norm = torch.clamp(torch.norm(rest, dim=1), min=eps)
            r[:, :t, t] = projection
            r[:, t, t] = norm
            q[:, :, t] = rest / norm.unsqueeze(-1)
        # Gram-Schmidt drifts from orthogonal over hundreds of steps; past the width there is no room for more
        # orthonormal columns (the residual is already zero), so no QR of them
        if t > 0 and t % reorthogonalize_every == 0 and t < dim:
            q_new, r_new = torch.linalg.qr(q[:, :, :t + 1], mode="reduced")
            r[:, :t + 1, :t + 1] = torch.bmm(r_new, r[:, :t + 1, :t + 1])
            q[:, :, :t + 1] = q_new
        along = torch.bmm(q[:, :, :t + 1].transpose(1, 2), y.unsqueeze(-1))
        residual = y - torch.bmm(q[:, :, :t + 1], along).squeeze(-1)
    coefficients = torch.linalg.solve_triangular(r[:, :k, :k], torch.bmm(q[:, :, :k].transpose(1, 2),
                                                                         y.unsqueeze(-1)), upper=True).squeeze(-1)
    return chosen, coefficients


def _choose(residual: torch.Tensor, atoms: torch.Tensor, taken: torch.Tensor, chosen: torch.Tensor, t: int
            ) -> torch.Tensor:
    """Each row's next atom: the one not yet taken most correlated (in absolute value) with its residual; recorded
    in chosen[:, t] and taken."""
    score = (residual @ atoms.T).abs()
    score.masked_fill_(taken, -float("inf"))
    new = torch.max(score, dim=1).indices
    chosen[:, t] = new
    taken[torch.arange(residual.shape[0], device=residual.device), new] = True
    return new


def combine_rows(indices: torch.Tensor, coefficients: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum_j coefficients[b, j] rows[indices[b, j]], in fp32, in rows' dtype."""
    return torch.bmm(coefficients.unsqueeze(1).to(torch.float), rows[indices].to(torch.float)).squeeze(1).to(rows.dtype)


# ------------------------------------------------------------------------------------------ RoPE matching pursuit

def _rope_inv_freq(base: float, head_dim: int, device) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float().to(device) / head_dim))


def apply_rope(x: torch.Tensor, position: torch.Tensor, heads: int, base: float) -> torch.Tensor:
    """x [..., heads * head_dim] rotated as transformers' Llama rotates a query at `position` [..., 1]."""
    head_dim = x.shape[-1] // heads
    theta = position.unsqueeze(-1) * _rope_inv_freq(base, head_dim, x.device)
    split = x.view(*x.shape[:-1], heads, head_dim)
    first, second = split[..., :head_dim // 2], split[..., head_dim // 2:]
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).view(*x.shape)


def estimate_rope_position(x0: torch.Tensor, x1: torch.Tensor, heads: int, base: float) -> torch.Tensor:
    """[..., 1]: the position whose rotation of x0 best matches x1, from each frequency pair's angle projected on
    the frequencies."""
    head_dim = x0.shape[-1] // heads
    inv_freq = _rope_inv_freq(base, head_dim, x0.device)
    direction = inv_freq.view(1, 1, head_dim // 2).expand(x0.shape[:-1] + (heads, head_dim // 2))
    direction = direction.reshape(*x0.shape[:-1], -1)
    direction = direction / (torch.norm(direction, dim=-1, keepdim=True) + 1e-8)
    a = x0.view(*x0.shape[:-1], heads, head_dim)
    b = x1.view(*x1.shape[:-1], heads, head_dim)
    half = head_dim // 2
    a_i, a_j, b_i, b_j = a[..., :half], a[..., half:], b[..., :half], b[..., half:]
    theta = torch.atan2(a_i * b_j - a_j * b_i, a_i * b_i + a_j * b_j).reshape(*x0.shape[:-1], -1)
    projection = torch.sum(theta * direction, dim=-1)
    scale = torch.sqrt(torch.tensor(heads, device=x0.device)) * torch.norm(inv_freq)
    return (projection / (scale + 1e-8)).unsqueeze(-1)


def matching_pursuit_rope(targets: torch.Tensor, donor_shared: torch.Tensor, orig_shared: torch.Tensor, k: int,
                          donor_heads: int, orig_heads: int, donor_base: float, orig_base: float,
                          eps: float = 1e-8) -> torch.Tensor:
    """The approximated rows [B, D_orig] (targets' dtype): matching pursuit where each chosen shared row is rotated
    to the RoPE position that best matches the residual (or its negation, the nearer to 0), the coefficients then
    refitted by least squares, and the same rotations applied to the model's rows."""
    batch = targets.shape[0]
    if k > donor_shared.shape[0]:
        raise ValueError(f"cannot choose {k} tokens from {donor_shared.shape[0]} shared ones")
    work, out_dtype = _work_dtype(targets), targets.dtype
    a, b, y = donor_shared.to(work), orig_shared.to(work), targets.to(work)
    chosen = torch.zeros((batch, k), dtype=torch.long, device=y.device)
    coefficients = torch.zeros((batch, k), dtype=work, device=y.device)
    positions = torch.zeros((batch, k), dtype=work, device=y.device)
    taken = torch.zeros((batch, a.shape[0]), dtype=torch.bool, device=y.device)
    residual = y.clone()
    for t in range(k):
        atom = a[_choose(residual, a, taken, chosen, t)]
        forward = estimate_rope_position(atom, residual, donor_heads, donor_base).squeeze(-1)
        backward = estimate_rope_position(atom, -residual, donor_heads, donor_base).squeeze(-1)
        position = torch.where(torch.abs(forward) < torch.abs(backward), forward, backward)
        positions[:, t] = position
        atom = apply_rope(atom, position.unsqueeze(-1), donor_heads, donor_base)
        coefficient = (residual * atom).sum(dim=1) / atom.pow(2).sum(dim=1).clamp(min=eps)
        coefficients[:, t] = coefficient
        residual = residual - coefficient.unsqueeze(1) * atom
    rotated = apply_rope(a[chosen], positions.unsqueeze(-1), donor_heads, donor_base)
    coefficients = least_squares(rotated.transpose(1, 2), y.unsqueeze(-1)).squeeze(-1)
    atoms = apply_rope(b[chosen], positions.unsqueeze(-1), orig_heads, orig_base)
    return (atoms * coefficients.unsqueeze(-1)).sum(dim=1).to(out_dtype)


# --------------------------------------------------------------------------------------- nearest-neighbour weights

WEIGHT_SCHEMES = ("distance_proportional", "barycentric", "least_squares")


def interpolation_weights(targets: torch.Tensor, points: torch.Tensor, k: int, cosine: bool = False,
                          scheme: str = "distance_proportional") -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, k], weights [B, k]) of each target's k nearest shared rows: weights proportional to 1 / distance
    (1 - cosine distance with cosine), or barycentric (sum to 1, least squares), or plain least squares."""
    if cosine:
        norms = targets.norm(p=2, dim=1, keepdim=True), points.norm(p=2, dim=1, keepdim=True)
        distances = 1 - torch.mm(targets, points.t()) / (norms[0] * norms[1].t()).clamp(min=1e-6)
    else:
        distances = torch.cdist(targets, points, p=2)
    indices = torch.topk(distances, k=k, dim=1, largest=False).indices
    near, neighbours = distances.gather(1, indices), points[indices]
    if scheme == "distance_proportional":
        weights = 1 - near if cosine else 1 / near.clamp_min(1e-6)
        return indices, weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
    if scheme == "barycentric":
        return indices, _barycentric_weights(targets, neighbours)
    if scheme == "least_squares":
        return indices, least_squares(neighbours.transpose(1, 2).float(), targets.unsqueeze(-1).float()).squeeze(-1)
    raise ValueError(f"unknown weight scheme {scheme!r} (one of {', '.join(WEIGHT_SCHEMES)})")


def _barycentric_weights(targets: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Least-squares weights of points [B, k, D] for targets under sum(weights) = 1 (a Lagrange-augmented system)."""
    batch, count, _ = points.shape
    device = points.device
    gram = torch.bmm(points, points.transpose(1, 2))
    system = torch.cat([torch.cat([gram, torch.ones((batch, count, 1), device=device)], dim=2),
                        torch.cat([torch.ones((batch, 1, count), device=device),
                                   torch.zeros((batch, 1, 1), device=device)], dim=2)], dim=1)
    rhs = torch.cat([torch.bmm(targets.unsqueeze(1), points.transpose(1, 2)).squeeze(1),
                     torch.ones((batch, 1), device=device)], dim=1)
    return least_squares(system, rhs.unsqueeze(-1)).squeeze(-1)[..., :count]


# ------------------------------------------------------------------------------------------------- landmark PCA

def _principal_axes(x: torch.Tensor, q: int, generator: torch.Generator, niter: int = 2) -> torch.Tensor:
    """V [D, q] of torch.pca_lowrank(x, q, niter) (centred, randomized subspace iteration), its random start drawn
    from generator."""
    a = x - x.mean(dim=(-2,), keepdim=True)
    wide = a.shape[0] < a.shape[1]
    tall = a.mH if wide else a
    basis = torch.linalg.qr(tall @ standard_normal((tall.shape[-1], q), tall.dtype, tall.device, generator)).Q
    for _ in range(niter):
        basis = torch.linalg.qr(tall.mH @ basis).Q
        basis = torch.linalg.qr(tall @ basis).Q
    u, _, vh = torch.linalg.svd(basis.mH @ tall, full_matrices=False)
    return basis @ u if wide else vh.mH


def landmark_pca(targets: torch.Tensor, donor_shared: torch.Tensor, orig_shared: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """The targets carried into the model's space [B, D_orig] (targets' dtype): centred, projected on the donor's
    principal axes, rotated by the Procrustes rotation that best maps the shared tokens' donor coordinates onto
    their model coordinates, and back through the model's axes."""
    dim = min(donor_shared.shape[1], orig_shared.shape[1])
    a, b, y = donor_shared.float(), orig_shared.float(), targets.float()
    mean_a, mean_b = a.mean(dim=0, keepdim=True), b.mean(dim=0, keepdim=True)
    a, b, y = a - mean_a, b - mean_b, y - mean_a
    axes_a = _principal_axes(a, dim, generator)
    axes_b = _principal_axes(b, dim, generator)
    u, _, v = torch.svd(torch.mm(torch.mm(b, axes_b).t(), torch.mm(a, axes_a)))
    rotation = torch.mm(u, v.t())
    return (torch.mm(torch.mm(torch.mm(y, axes_a), rotation), axes_b.t()) + mean_b).to(targets.dtype)


# -------------------------------------------------------------------------------------------- sparse token basis

def token_basis(donor_shared: torch.Tensor, orig_shared: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(donor basis, model basis), each [d, D] with d the smaller width: the principal axes of the narrower space's
    shared rows, each approximated by orthogonal matching pursuit as a combination of k shared tokens, and the
    same combinations of the other space's rows."""
    dim = min(donor_shared.shape[1], orig_shared.shape[1])
    source = donor_shared if donor_shared.shape[1] < orig_shared.shape[1] else orig_shared
    if k > source.shape[0]:
        raise ValueError(f"cannot choose {k} tokens from {source.shape[0]} shared ones")
    centred = (source - source.mean(dim=0)).to(torch.float32)
    covariance = centred.T @ centred / source.shape[0]
    axes = torch.linalg.svd(covariance)[0][:, :dim]
    indices, coefficients = orthogonal_matching_pursuit(axes.t(), centred, k)
    return combine_rows(indices, coefficients, donor_shared), combine_rows(indices, coefficients, orig_shared)


def from_token_basis(targets: torch.Tensor, donor_embed: torch.Tensor, orig_embed: torch.Tensor,
                     basis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The targets' least-squares coordinates in the donor basis (about the donor's mean row), applied to the model
    basis about the model's mean row [B, D_orig] (fp32)."""
    donor_basis, orig_basis = (x.to(torch.float32) for x in basis)
    centred = targets.to(torch.float32) - donor_embed.mean(dim=0)
    coordinates = least_squares(donor_basis.T, centred.T).T
    return coordinates @ orig_basis + orig_embed.mean(dim=0)


# ------------------------------------------------------------------------------------------------------- the rest

SUBWORD_METHODS = ("mean", "sum", "weighted_mean", "first_last")


def subword_rows(orig_embed: torch.Tensor, pieces: list[list[int]], is_head: bool, method: str) -> torch.Tensor:
    """One row per token from the model's rows of its pieces (the ids the model's tokenizer splits its text into),
    accumulated row by row in the embeddings' dtype: their mean, sum, a mean weighted towards the last piece (the
    first for a head), or the last piece (the first for a head). No pieces: zeros."""
    out = torch.zeros(len(pieces), orig_embed.shape[1], device=orig_embed.device, dtype=orig_embed.dtype)
    for row, ids in enumerate(pieces):
        if method in ("mean", "sum"):
            for i in ids:
                out[row] += orig_embed[i]
            if method == "mean" and ids:
                out[row] /= len(ids)
        elif method == "weighted_mean":
            weights = list(range(1, len(ids) + 1))
            for i, weight in zip(ids, weights if is_head else weights[::-1]):
                out[row] += weight * orig_embed[i]
            if ids:
                out[row] /= sum(weights)
        elif method == "first_last":
            if ids:
                out[row] = orig_embed[ids[0] if is_head else ids[-1]]
        else:
            raise ValueError(f"unknown subword method {method!r} (one of {', '.join(SUBWORD_METHODS)})")
    return out


def john_hewitt_rows(orig_embed: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """count draws from the normal with the model rows' mean and covariance (Hewitt, "Initializing new word
    embeddings", 2021), in their dtype; 0.02-scaled standard normal draws where the covariance is not positive
    definite."""
    x = orig_embed.to(torch.float32)
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / x.shape[0]
    if not torch.distributions.constraints.positive_definite.check(covariance).all():
        log.warning("the embeddings' covariance is not positive definite: new rows are small normal draws")
        return standard_normal((count, orig_embed.shape[1]), orig_embed.dtype, orig_embed.device, generator) * 0.02
    draws = standard_normal((count, x.shape[1]), mean.dtype, mean.device, generator)  # (torch's MultivariateNormal)
    return (mean + torch.matmul(torch.linalg.cholesky(covariance), draws.unsqueeze(-1)).squeeze(-1)
            ).to(orig_embed.dtype)


def under_trained_rows(embed: torch.Tensor, head: torch.Tensor | None, unused: set[int],
                       quantile: float = 0.01) -> set[int]:
    """The rows that look under-trained: `unused` (rows no token names, reserved tokens), and with a head the
    embeddings' lowest-norm `quantile`, and the rows nearest the unused rows' mean (cosine above the 1 - quantile
    quantile and above 0.5) in the embeddings and the head. (The mean is taken in the set's iteration order, as
    mergekit takes it: the caller builds `unused` as mergekit builds it.)"""
    bad = set(unused)
    if head is not None:
        norms = embed.norm(dim=1).float()
        bad.update(torch.where(norms < torch.quantile(norms, quantile, dim=0))[0].tolist())
    if not unused:
        return bad
    for matrix in (embed,) if head is None else (embed, head):
        similarity = torch.nn.functional.cosine_similarity(matrix, matrix[list(unused)].mean(dim=0).unsqueeze(0),
                                                           dim=1).float()
        threshold = torch.quantile(similarity, 1 - quantile, dim=0)
        if threshold < 0.5:
            threshold = 0.5
        bad.update(torch.where(similarity > threshold)[0].tolist())
    return bad
