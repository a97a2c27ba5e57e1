"""Fixed-seed random projections: two runs give the same vector, and sketches of different tasks are comparable."""

from __future__ import annotations

import math

import torch

_CHUNK = 1 << 16


def l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-12)


def gaussian_project(flat: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """`flat @ R` for R with i.i.d. N(0, 1/dim) entries, drawn chunk by chunk from a generator seeded by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(dim, dtype=torch.float64)
    flat = flat.detach().double().cpu()
    for start in range(0, flat.numel(), _CHUNK):
        piece = flat[start : start + _CHUNK]
        r = torch.randn(piece.numel(), dim, generator=gen, dtype=torch.float64)
        out += piece @ r
    return (out / math.sqrt(dim)).float()


def count_sketch(flat: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Count sketch: coordinate i goes to bucket h(i) with sign s(i), both drawn from a generator seeded by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    flat = flat.detach().double().cpu()
    buckets = torch.randint(0, dim, (flat.numel(),), generator=gen)
    signs = torch.randint(0, 2, (flat.numel(),), generator=gen).double() * 2 - 1
    out = torch.zeros(dim, dtype=torch.float64)
    out.index_add_(0, buckets, flat * signs)
    return out.float()


def project_rows(rows: torch.Tensor, row_ids: torch.Tensor, dim: int, seed: int, method: str) -> torch.Tensor:
    """Sketch of a sparse matrix given by its non-zero `rows` (n, h) and their ids: Σ_r rows[r] @ R_{id(r)}.

    R_id depends only on (`seed`, id), so the sketch of a matrix does not depend on which other rows are present
    and never materialises the (vocabulary x h) matrix: `gaussian` draws R_id (h, dim) with N(0, 1/dim) entries
    from a generator seeded by (seed, id); `countsketch` hashes (id, column) to a bucket and a sign.
    """
    rows = rows.detach().double().cpu()
    row_ids = row_ids.cpu().long()
    h = rows.size(1)
    if method == "gaussian":
        out = torch.zeros(dim, dtype=torch.float64)
        gen = torch.Generator()
        for row, rid in zip(rows, row_ids.tolist(), strict=True):
            gen.manual_seed(seed * 1_000_003 + rid)
            out += row @ torch.randn(h, dim, generator=gen, dtype=torch.float64)
        return (out / math.sqrt(dim)).float()
    # count sketch with a multiply-shift hash of the flat index (wrapping int64 arithmetic is deterministic)
    flat_index = row_ids.unsqueeze(1) * h + torch.arange(h).unsqueeze(0)
    offset = (seed * 0x14057B7EF767814F) % (1 << 62)
    mixed = (flat_index * 0x5851F42D4C957F2D + offset) & 0x7FFFFFFFFFFFFFFF
    buckets = (mixed >> 17) % dim
    signs = ((mixed >> 7) & 1).double() * 2 - 1
    out = torch.zeros(dim, dtype=torch.float64)
    out.index_add_(0, buckets.flatten(), (rows * signs).flatten())
    return out.float()
