"""The grouped statistics pass and the algebra of grouped moments (count, means and
centred co-moments per group, with a leading group dimension, all fp64).

    GroupedMoments = (n (G,) int64, mean_x (G, D), mean_t (G, O),
                      M_xx (G, D, D), M_tx (G, O, D), M_tt (G, O, O))

The pass (``grouped_moments``) sums each group's rows shifted by one of its rows, s_g,
in fp64: S1 = Σ (z − s_g), S2 = Σ (z − s_g)(z − s_g)ᵀ for z = [x t]; then
mean = s_g + S1/n and M = S2 − S1·S1ᵀ/n. Because s_g lies inside the group's data,
|mean − s_g| is of the order of the group's spread, and S2 carries no large
offset to cancel: each entry of M is within about n·2⁻⁵² (√n·2⁻⁵² typical) of
Σ |z_i − s_g|·|z_j − s_g|, whatever the data's distance from 0.

Two implementations, chosen by linreg_fused.backend.select_ops (the one place that
decides): the Triton kernels of kernels/grouped_stats.py (sorted items, fp64 dots),
and PyTorch's sort-free ``index_add_`` over chunks of CHUNK_ROWS rows (memory
O(CHUNK_ROWS·K² + G·K²), never O(N·K²)). On the CPU ``index_add_`` adds each
group's rows in row order, so both are bitwise reproducible there; on CUDA
``index_add_`` adds with atomics, in an order that can change between runs (the
Triton path, the default there, does not).
"""

from __future__ import annotations

import torch

from .backend import select_ops

GroupedMoments = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

# Rows per scatter: the (rows, K²) fp64 products stay in cache (8192·81·8 B = 5 MB at K = 9);
# measured on the 2-core CPU, 8192 rows was the fastest of 8k..64k.
CHUNK_ROWS = 1 << 13


def empty_moments(n_groups: int, d: int, o: int, device: torch.device) -> GroupedMoments:
    z = lambda *shape: torch.zeros((n_groups, *shape), dtype=torch.float64, device=device)  # noqa: E731
    return (torch.zeros(n_groups, dtype=torch.int64, device=device), z(d), z(o), z(d, d), z(o, d), z(o, o))


def grouped_moments(x: torch.Tensor, t: torch.Tensor, groups: torch.Tensor, n_groups: int,
                    backend: str) -> GroupedMoments:
    """The moments of rows x (N, D), t (N, O) per group id ``groups`` (N,) int64 in [0, n_groups)
    (checked by the caller). No host sync. Not differentiable: rows that require grad are read as data."""
    x, t = x.detach(), t.detach()  # (cat's out= refuses autograd; the moments must not hold the graph)
    counts = torch.bincount(groups, minlength=n_groups)  # integer: exact in any order
    if _use_triton(backend, x.device, x.shape[1] + t.shape[1]):
        from .kernels.grouped_stats import grouped_shifted_sums

        shift, s1, s2 = grouped_shifted_sums(x, t, groups, n_groups, counts)
    else:
        shift, s1, s2 = _shifted_sums_torch(x, t, groups, n_groups)
    return _centre(counts, shift, s1, s2, x.shape[1])


def _use_triton(backend: str, device: torch.device, columns: int) -> bool:
    """The Triton pass where the backend says so; its program holds a K × K accumulator, so wider
    rows (K > MAX_COLUMNS) take PyTorch's pass, as TritonOps.linear_moments does for wide targets."""
    if select_ops(backend, device).name != "triton":
        return False
    from .kernels.grouped_stats import MAX_COLUMNS

    return columns <= MAX_COLUMNS


def _shifted_sums_torch(x, t, groups, n_groups):
    n, d = x.shape
    k = d + t.shape[1]
    rows = torch.arange(n, device=x.device)
    # Each group's first row: an integer minimum, the same in any order.
    first = torch.full((n_groups,), n - 1, dtype=torch.int64, device=x.device)
    first.scatter_reduce_(0, groups, rows, "amin")
    shift = torch.cat([x[first], t[first]], 1).to(torch.float64)
    # One accumulator row per group, [S1 | S2 flattened], and one (rows, K + K²) buffer per chunk:
    # a single index_add_ per chunk, which adds each row's values into its group's row in row order.
    sums = torch.zeros((n_groups, k + k * k), dtype=torch.float64, device=x.device)
    buffer = torch.empty((min(n, CHUNK_ROWS), k + k * k), dtype=torch.float64, device=x.device)
    for start in range(0, n, CHUNK_ROWS):
        g = groups[start : start + CHUNK_ROWS]
        rows = buffer[: g.shape[0]]
        z = rows[:, :k]
        torch.cat([x[start : start + CHUNK_ROWS], t[start : start + CHUNK_ROWS]], 1, out=z)
        z -= shift[g]
        torch.mul(z[:, :, None], z[:, None, :], out=rows[:, k:].view(-1, k, k))
        sums.index_add_(0, g, rows)
    return shift, sums[:, :k], sums[:, k:].view(n_groups, k, k)


def _centre(counts, shift, s1, s2, d) -> GroupedMoments:
    n = counts.to(torch.float64)
    inv = torch.where(counts > 0, 1.0 / n.clamp_min(1.0), 0.0)
    mean = torch.where((counts > 0)[:, None], shift + s1 * inv[:, None], 0.0)
    m = s2 - s1[:, :, None] * (s1 * inv[:, None])[:, None, :]
    m = 0.5 * (m + m.mT)  # exactly symmetric (S2 is; the rank-one term is up to rounding)
    return (counts, mean[:, :d].contiguous(), mean[:, d:].contiguous(), m[:, :d, :d].contiguous(),
            m[:, d:, :d].contiguous(), m[:, d:, d:].contiguous())


def merge_grouped(a: GroupedMoments, b: GroupedMoments) -> GroupedMoments:
    """The moments of the union of two row sets, group by group (Chan, Golub and LeVeque's
    pairwise update, as reference.merge_moments); a group empty on one side takes the other's."""
    n_a, n_b = a[0], b[0]
    n = n_a + n_b
    fa, fb = n_a.to(torch.float64), n_b.to(torch.float64)
    frac_b = torch.where(n > 0, fb / n.clamp_min(1).to(torch.float64), 0.0)
    w = fa * frac_b  # n_a·n_b/n
    out = [n]
    dx, dt = b[1] - a[1], b[2] - a[2]
    for mean_a, mean_b, delta in ((a[1], b[1], dx), (a[2], b[2], dt)):
        merged = mean_a + delta * frac_b[:, None]
        out.append(_pick(n_a, n_b, mean_a, mean_b, merged))
    for i, (u, v) in zip((3, 4, 5), ((dx, dx), (dt, dx), (dt, dt))):
        merged = a[i] + b[i] + w[:, None, None] * u[:, :, None] * v[:, None, :]
        out.append(_pick(n_a, n_b, a[i], b[i], merged))
    return tuple(out)


def _pick(n_a, n_b, va, vb, merged):
    """``merged``, except exactly ``va`` (``vb``) where the other side holds no rows."""
    shape = (-1,) + (1,) * (va.dim() - 1)
    return torch.where((n_b == 0).view(shape), va, torch.where((n_a == 0).view(shape), vb, merged))


def residual_sums(moments: GroupedMoments, w: torch.Tensor, b: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ r² (G, O), Σ r·xᵀ (G, O, D), Σ r (G, O)) per group for r = W_g·x + b_g − t, from the
    moments (see linreg_fused.stats); w (G, O, D), b (G, O) fp64."""
    n, mean_x, mean_t, m_xx, m_tx, m_tt = moments
    nf = n.to(torch.float64)[:, None]
    e = torch.einsum("god,gd->go", w, mean_x) + b - mean_t
    wm = w @ m_xx
    sse = nf * e * e + (w * (wm - 2.0 * m_tx)).sum(-1) + m_tt.diagonal(dim1=1, dim2=2)
    # A tight fit leaves a rounding-level difference of large terms, which may come out below 0: a sum
    # of squares is not (clamped, as a loss and a 1 − SSE/SST above 1 would mislead).
    sse = sse.clamp_min(0.0)
    rx = nf[:, :, None] * e[:, :, None] * mean_x[:, None, :] + wm - m_tx
    return sse, rx, nf * e
