"""The latent kNN search behind ``latent_knn`` and ``latent_knn_cos``.

Reference coordinates eps of training images are kept packed so that one matrix product gives
||r||^2 - 2 e.r for a whole batch. A two-stage search (best columns per block of ``KNN_BLOCK``,
then the exact distances of the candidates) finds the k nearest; where the native kernel
(``outlier_jebm.native``) built, it fuses the product and the selection.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from . import native

KNN_K = 5
KNN_BLOCK = 64  # columns per block in the two-stage nearest-neighbour search
KNN_CHUNK = 64 * KNN_BLOCK  # reference columns per matrix product in the search
TORCH_SEARCH_ROWS = 500  # queries per product in the torch search (the chunk sizes were tuned at 500)
NATIVE_CHUNK = 1024  # reference columns per pass of the fused kernel (1024 x Z floats stay in L2)


class Reference:
    """Posterior means of training images (reference coordinates) for ``latent_knn``.

    Keeps [-2 R^T; ||r||^2] (Z + 1, R'), so that [e, 1] times it is ||r||^2 - 2 e.r for a whole
    batch in one matrix product (the batch's own ||e||^2 does not change which rows are nearest).
    R' pads R to a multiple of ``KNN_BLOCK`` with columns at +inf, which are never nearest; the
    matrix is kept in chunks of ``KNN_CHUNK`` columns, searched one after the other so that each
    (B, chunk) product stays in cache: at B = 500 a product over 16 384 columns (32 MB, the
    size of this machine's L3) took twice as long per column as one over 8 192, and the shared
    search of ``References`` (a product and a transformed copy) ran fastest at 4 096. Up to 1.5
    chunks' worth is searched in one product rather than leave a small last chunk.
    """

    def __init__(self, eps: torch.Tensor):
        self.eps = eps.contiguous()
        pad = (-eps.shape[0]) % KNN_BLOCK
        norms = torch.cat([eps.pow(2).sum(1), eps.new_full((pad,), math.inf)])
        weights = torch.cat([-2.0 * eps.t(), eps.new_zeros(eps.shape[1], pad)], dim=1)
        augmented = torch.cat([weights, norms.unsqueeze(0)])
        self.chunk = augmented.shape[1] if augmented.shape[1] <= KNN_CHUNK * 3 // 2 else KNN_CHUNK
        self.chunks = [augmented[:, s : s + self.chunk].contiguous() for s in range(0, augmented.shape[1], self.chunk)]

    def __len__(self) -> int:
        return self.eps.shape[0]


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Each row divided by its Euclidean norm (a zero row stays zero)."""
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


class References:
    """The reference latents prepared for both searches: points (latent_knn) and directions (latent_knn_cos).

    Both searches share one matrix product -2 e.r per query e and reference row r (the points'
    chunks without their norm row). The points' key adds ||r||^2; the directions' order (nearest
    unit vectors first) is that of -(e.r) / ||r||, i.e. the product times ``1 / (2 ||r||)``.
    Both are one pass over the product with per-column vectors (+inf added on padding
    columns). Neither key subtracts two large numbers to recover e.r, so a query of small norm
    keeps its direction. A zero row has no direction: ``unit_rows`` keeps it at zero, at
    distance 1 from every unit vector, which no column transform can express; a reference
    holding one is searched twice instead (``shared_product`` False).
    """

    def __init__(self, eps: torch.Tensor, top_dim: int = 0):
        self.eps = eps
        # the top layer's own searches (``latent_knn_top``): its columns are the last top_dim of eps
        self.top_dim = top_dim
        self.top = References(eps[:, -top_dim:].contiguous()) if 0 < top_dim < eps.shape[1] else None
        self.points = Reference(eps)
        self.unit = unit_rows(eps)  # for the exact distances of the directions' candidates
        self.shared_product = bool((eps.norm(dim=1) > 1e-12).all())
        self.weights = [chunk[:-1] for chunk in self.points.chunks]  # -2 R^T, a contiguous prefix
        # per column (scale, shift) of both keys over all R' columns; the torch search takes chunk slices
        sq = torch.cat([chunk[-1:] for chunk in self.points.chunks], 1)  # ||r||^2, +inf on padding
        pad = torch.isinf(sq)
        self.key_scale = torch.cat([torch.ones_like(sq), torch.where(pad, 1.0, 0.5 / sq.clamp_min(1e-24).sqrt())])
        self.key_shift = torch.cat([sq, torch.where(pad, sq, 0.0)])  # (2, R'): points, directions
        cuts = [(n * self.points.chunk, n * self.points.chunk + w.shape[1]) for n, w in enumerate(self.weights)]
        self.point_keys = [(None, self.key_shift[:1, a:b]) for a, b in cuts]
        self.direction_keys = [(self.key_scale[1:, a:b], self.key_shift[1:, a:b]) for a, b in cuts]

    @functools.cached_property
    def fused(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The shared search laid out for the fused kernel: -2 R^T packed in strips of 16 columns
        (R'/16, Z, 16), and per column (scale, shift) of the points' and the directions' keys (2, R')."""
        weights = torch.cat(self.weights, 1)
        packed = weights.view(weights.shape[0], -1, 16).permute(1, 0, 2).contiguous()
        return packed, self.key_scale, self.key_shift

    @functools.cached_property
    def directions(self) -> Reference:
        """The directions' own search matrix: built on first use (the fallback, or a direct search)."""
        return Reference(self.unit)

    def __len__(self) -> int:
        return self.eps.shape[0]


class _BestBlocks:
    """One search's state in ``nearest_columns``: per chunk, the m blocks with the smallest minima."""

    def __init__(self) -> None:
        self.minima: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []
        self.block_ids: list[torch.Tensor] = []

    def add(self, blocks: torch.Tensor, m: int, first_block: int, rows: torch.Tensor) -> None:
        low, which = blocks.amin(-1).topk(min(m, blocks.shape[1]), dim=1, largest=False, sorted=False)
        self.minima.append(low)
        self.kept.append(blocks[rows, which])  # (B, m, block), copied out of the buffer
        self.block_ids.append(which + first_block)

    def columns(self, m: int, rows: torch.Tensor) -> torch.Tensor:
        B, block = rows.shape[0], KNN_BLOCK
        low, block_ids = torch.cat(self.minima, 1), torch.cat(self.block_ids, 1)
        best = low.topk(min(m, low.shape[1]), dim=1, largest=False, sorted=False).indices
        candidates = torch.cat(self.kept, 1)[rows, best].reshape(B, best.shape[1] * block)
        pos = candidates.topk(m, dim=1, largest=False, sorted=False).indices
        return block_ids.gather(1, best).gather(1, pos // block) * block + pos % block


Transform = "tuple[torch.Tensor | None, torch.Tensor] | None"


def nearest_columns(
    queries: torch.Tensor,
    chunks: "list[torch.Tensor]",
    chunk: int,
    m: int,
    transforms: "list[list[Transform]] | None" = None,
) -> list[torch.Tensor]:
    """Column indices of the m smallest entries of each row of ``queries @ [chunks...]``, unordered.

    ``chunks`` are the column blocks of one matrix, each ``chunk`` wide but the last.
    ``transforms`` lists one search per entry (default: the product itself); a search has one
    (scale, shift) per chunk and looks at product * scale + shift (scale None: 1), so several
    searches share one product. Exact, without a top-k over whole rows: the m smallest entries
    of a row lie in the m blocks of ``KNN_BLOCK`` columns with the smallest minima. Each
    chunk's product goes into one reused buffer; from it only the chunk's m best blocks are
    kept (their minima and contents). At the end the m best of all kept blocks are chosen and
    searched. Needs m <= the number of real columns (otherwise padding columns would be
    returned) and no autograd (``out=``).
    """
    transforms = transforms or [[None] * len(chunks)]
    B, block = queries.shape[0], KNN_BLOCK
    rows = torch.arange(B, device=queries.device).unsqueeze(1)
    buffer = queries.new_empty(B, chunk)
    scratch = queries.new_empty(B, chunk) if any(t is not None for ts in transforms for t in ts) else None
    searches = [_BestBlocks() for _ in transforms]
    for n, weights in enumerate(chunks):
        width, first = weights.shape[1], n * (chunk // block)
        product = torch.mm(queries, weights, out=buffer[:, :width])
        for search, per_chunk in zip(searches, transforms):
            key = product
            if per_chunk[n] is not None:
                scale, shift = per_chunk[n]
                key = scratch[:, :width]
                if scale is None:
                    torch.add(product, shift, out=key)
                else:
                    torch.addcmul(shift, product, scale, out=key)
            search.add(key.view(B, width // block, block), m, first, rows)
    return [search.columns(m, rows) for search in searches]


def _mean_of_nearest(
    queries: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, k: int, skip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean exact distance to the k nearest of the candidate rows idx (B, m), skipping the input itself (the nearest
    candidate, if nearer than 1e-5) and the row ``skip`` names per query (B,) (-1: none; then m >= k + 2, else
    k + 1); and the row skipped as the input itself (B,) (-1: none)."""
    # a NaN query has NaN keys everywhere and may pick padding columns: keep its index in range
    # (its distances are NaN anyway) so that it cannot fail the other rows of the batch
    idx = idx.clamp_max(rows.shape[0] - 1)
    candidates = rows.index_select(0, idx.reshape(-1)).view(
        *idx.shape, rows.shape[1]
    )  # row copies, not a gather per entry
    dist = (candidates - queries.unsqueeze(1)).pow(2).sum(-1).sqrt()  # exact
    if skip is not None:
        dist = dist.masked_fill(idx == skip.unsqueeze(1), math.inf)
    near, order = dist.sort(dim=1)  # ascending, a skipped row last
    is_self = near[:, :1] < 1e-5
    mean = torch.where(is_self, near[:, 1 : k + 1].mean(1, keepdim=True), near[:, :k].mean(1, keepdim=True))
    self_row = torch.where(is_self, idx.gather(1, order[:, :1]), -1)
    return mean.squeeze(1), self_row.squeeze(1)


def _search_size(k: int, n: int, skip: torch.Tensor | None) -> tuple[int, int]:
    """(k, m): the neighbours averaged and the candidates searched among n reference rows, one more with a skip."""
    extra = int(skip is not None)
    k = min(k, n - 1 - extra)
    return k, k + 1 + extra


@torch.no_grad()
def knn_mean_distance(
    eps: torch.Tensor, reference: "Reference | torch.Tensor", k: int = KNN_K, skip: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean Euclidean distance from each row of eps (B, Z) to its k nearest reference rows.

    A reference row at distance below 1e-5 is the input itself (a training image scored
    against the set it belongs to) and is skipped, as is the row ``skip`` (B,) names per
    query, if given (-1: none). Candidates are picked on ||r||^2 - 2 e.r, then their
    distances are recomputed exactly, so no cancellation error reaches the result.
    """
    return _nearest(eps, reference, k, skip)[0]


def _nearest(
    eps: torch.Tensor, reference: "Reference | torch.Tensor", k: int, skip: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    ref = reference if isinstance(reference, Reference) else Reference(reference)
    k, m = _search_size(k, len(ref), skip)
    lifted = torch.cat([eps, eps.new_ones(eps.shape[0], 1)], dim=1)
    (idx,) = nearest_columns(lifted, ref.chunks, ref.chunk, m)
    return _mean_of_nearest(eps, ref.eps, idx, k, skip)


class Nearest(NamedTuple):
    points: torch.Tensor  # latent_knn (B,)
    directions: torch.Tensor  # latent_knn_cos (B,)
    selves: torch.Tensor  # (B,) the reference row each query is itself (latent_knn's skipped row), -1 where none


@torch.no_grad()
def knn_points_and_directions(
    eps: torch.Tensor, references: References, k: int = KNN_K
) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent_knn`` and ``latent_knn_cos`` from one product against the reference set.

    The same values as ``knn_mean_distance(eps, references.points)`` and
    ``knn_mean_distance(unit_rows(eps), references.directions)``, up to which of two rows at
    (almost) the same distance is taken; each distance is recomputed exactly.
    """
    found = nearest_pair(eps, references, k)
    return found.points, found.directions


@torch.no_grad()
def nearest_pair(
    eps: torch.Tensor, references: References, k: int = KNN_K, skip: torch.Tensor | None = None
) -> Nearest:
    """``knn_points_and_directions`` with the rows each query skipped as itself, and a row ``skip`` (B,) names per
    query left out of both searches (-1: none): a moved copy of a training image must not find the image."""
    if not references.shared_product:
        points, selves = _nearest(eps, references.points, k, skip)
        return Nearest(points, _nearest(unit_rows(eps), references.directions, k, skip)[0], selves)
    k, m = _search_size(k, len(references), skip)
    if native.usable_for(eps):
        packed, scale, shift = references.fused
        idx = native.candidates(eps, packed, scale, shift, m, NATIVE_CHUNK)
        idx_points, idx_directions = idx[:, 0], idx[:, 1]
    else:  # at most TORCH_SEARCH_ROWS queries per product, so that a product chunk stays in cache
        parts = [
            nearest_columns(
                part,
                references.weights,
                references.points.chunk,
                m,
                [references.point_keys, references.direction_keys],
            )
            for part in eps.split(TORCH_SEARCH_ROWS)
        ]  # an empty batch is one empty part
        idx_points, idx_directions = (torch.cat(found) for found in zip(*parts))
    points, selves = _mean_of_nearest(eps, references.points.eps, idx_points, k, skip)
    directions, _ = _mean_of_nearest(unit_rows(eps), references.unit, idx_directions, k, skip)
    return Nearest(points, directions, selves)
