"""The statistic behind LinearStats: the R factor of the shifted, augmented data.

With s a shift (the mean of the first chunk's leading rows), the rows
z = [1, x − s_x, t − s_t] (P = 1 + D + O columns) of all the data have an
upper-triangular R with RᵀR = ZᵀZ (Z = Q·R, Q never formed). R is one pass,
mergeable (the R of two row sets is the R of their stacked R's) and stable: a
least-squares solve from R loses digits in proportion to the condition number
of the data, where the normal equations ZᵀZ lose its square.

Layout: R[0, 0] = √n; R[0, 1:] = √n·(mean − s); R[1:, 1:] is the R factor of the
centred data [X − x̄, T − t̄]. Diagonals are kept ≥ 0, so full-rank data have one R.

The chunk's factor comes from kernels/linear_qr.py on the Triton backend (1 + D + O ≤
64), else from blocked Householder QR in PyTorch (torch.linalg.qr of row blocks, then
of their stacked R's in a fixed-order tree): both deterministic, bitwise, run to run.
"""

from __future__ import annotations

import torch

from .backend import select_ops

SHIFT_ROWS = 1024  # the shift is the mean of this many leading rows (the kernel's too)
FAN_IN = 8  # R factors stacked per QR of the torch path's tree
_CHUNK_ELEMENTS = 1 << 16  # rows × P built and factored at a time by the torch path: 512 KiB of fp64, in cache
_CHUNK_ELEMENTS_CUDA = 1 << 24  # on a GPU: fewer, larger batched QR calls (128 MiB of fp64)


def qr_r(a: torch.Tensor) -> torch.Tensor:
    """The R factor (P × P, diagonal ≥ 0) of a (m × P), zero rows added when m < P."""
    p = a.shape[-1]
    r = torch.linalg.qr(a, mode="r").R
    r.mul_(torch.where(r.diagonal() < 0, -1.0, 1.0).unsqueeze(1))  # rows of R may change sign freely
    if r.shape[0] < p:
        r = torch.cat([r, r.new_zeros(p - r.shape[0], p)])
    return r


def stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The R of the union of the row sets whose R's are a and b (same shift)."""
    return qr_r(torch.cat([a, b]))


def reshift(r: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """R of the same rows shifted by ``new`` instead of ``old``: [1, z − new] = [1, z − old]·C with
    C = [[1, old − new], [0, I]], and R·C is R with only its first row changed (R[1:, 0] = 0)."""
    out = r.clone()
    out[0, 1:] += r[0, 0] * (old - new)
    return out


def leading_shift(x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(D + O,) fp64: the mean of the leading rows, rounded to ``dtype`` (the accumulator's) so that
    it is subtracted exactly as stored."""
    lead = slice(0, min(x.shape[0], SHIFT_ROWS))
    mean = torch.cat([x[lead], t[lead]], 1).to(torch.float64).mean(0)
    return mean if dtype == torch.float64 else mean.to(dtype).to(torch.float64)


def chunk_factor(x: torch.Tensor, t: torch.Tensor, shift: torch.Tensor, *, fp64: bool,
                 backend: str) -> torch.Tensor:
    """R (P × P, fp64) of [1, x − shift[:D], t − shift[D:]]: the Triton pass where the backend
    resolves to Triton and P ≤ 64, blocked torch QR otherwise (on x's device)."""
    ops = select_ops(backend, x.device)
    if ops.name == "triton":
        from .kernels import linear_qr

        if 1 + x.shape[1] + t.shape[1] <= linear_qr.MAX_COLUMNS:
            acc = torch.float64 if fp64 else torch.float32
            return linear_qr.linear_qr(x, t, shift.to(acc), fp64=fp64)
    return torch_factor(x, t, shift, fp64=fp64)


def block_rows(p: int) -> int:
    """Rows per Householder block of the torch path: long enough that LAPACK's blocked QR runs at
    matrix-matrix speed, short enough to stay in cache (scanned on this project's 2-core CPU,
    one thread: 1024 rows best at P = 11, 2048 at P = 69 and 261)."""
    return 1024 if p < 32 else max(2048, 1 << (2 * p - 1).bit_length())


def torch_factor(x: torch.Tensor, t: torch.Tensor, shift: torch.Tensor, *, fp64: bool = True) -> torch.Tensor:
    """R of [1, x − s_x, t − s_t] by blocked Householder QR (fp64, or fp32 blocks folded in fp64)."""
    n, d = x.shape
    p = 1 + d + t.shape[1]
    dtype = torch.float64 if fp64 else torch.float32
    block = block_rows(p)
    elements = _CHUNK_ELEMENTS_CUDA if x.device.type == "cuda" else _CHUNK_ELEMENTS
    chunk = max(block, elements // p // block * block)
    # [1, 0, …] − [0, −s]: the ones column and the shift in one subtraction
    offset = torch.cat([shift.new_full((1,), -1.0), shift]).to(x.device, dtype)
    zero = torch.zeros((min(n, chunk), 1), dtype=x.dtype, device=x.device)
    factors = []
    for start in range(0, n, chunk):
        xs, ts = x[start : start + chunk], t[start : start + chunk]
        m = xs.shape[0]
        # exact upcast, one rounding in the subtraction
        z = torch.cat([zero[:m], xs, ts], 1).to(dtype).sub_(offset)
        full = m // block * block
        if full:
            factors.append(torch.linalg.qr(z[:full].view(-1, block, p), mode="r").R.reshape(-1, p))
        if full < m:
            factors.append(torch.linalg.qr(z[full:], mode="r").R)
    rows = factors[0] if len(factors) == 1 else torch.cat(factors)
    return fold(rows.to(torch.float64), p)


def fold(rows: torch.Tensor, p: int) -> torch.Tensor:
    """The R of stacked rows (m × P): QR of FAN_IN·P-row groups, level by level, in a fixed order."""
    group = FAN_IN * p
    while rows.shape[0] > group:
        k = rows.shape[0] // group * group
        rows = torch.cat([torch.linalg.qr(rows[:k].view(-1, group, p), mode="r").R.reshape(-1, p), rows[k:]])
    return qr_r(rows)


def from_moments(n: int, mean: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """R (P × P) of rows with count n, mean ``mean`` (the shift: R[0, 1:] = 0) and centred
    co-moment matrix ``moments`` (symmetric positive semi-definite): R[1:, 1:] is the R factor of
    its symmetric square root, so RᵀR = ZᵀZ. Reads old (moments) states; digits the moments had
    lost stay lost."""
    p = 1 + mean.shape[0]
    eigenvalues, vectors = torch.linalg.eigh((moments + moments.t()) / 2)
    root = vectors * eigenvalues.clamp_min(0).sqrt()  # root·rootᵀ = moments
    r = torch.zeros((p, p), dtype=torch.float64, device=mean.device)
    r[0, 0] = float(n) ** 0.5
    r[1:, 1:] = qr_r(root.t().contiguous())
    return r
