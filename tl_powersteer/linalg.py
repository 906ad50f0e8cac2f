"""Linear algebra on bare tensors: block power iteration with Rayleigh-Ritz for the top
singular triplets of a linear operator, and the top-k helpers of the atlas.

Nothing here knows about transformers.

For an operator J (``n_out x d``) known only through products ``J @ V`` and ``J.T @ U``,
we iterate on the Gram operator JᵀJ with an oversampled orthonormal block Q (``d x b``)::

    Y = J Q                       # b forward products
    Y = Uy diag(s) Wᵀ             # Rayleigh-Ritz on span(Q), a b x b problem
    Z = Jᵀ Y = JᵀJ Q              # b adjoint products
    Q ← qr(Z)

The Ritz triplets of span(Q) are ``v = Q W``, ``σ = s`` and ``u = Uy``, so ``J v = σ u``
holds to rounding error by construction; ``Z`` gives the other side for free,
``Jᵀ u = Z w / σ``, and the reported residual ``‖Jᵀu − σv‖ / σ`` measures how far a
triplet is from a true singular triplet (it bounds the angle to the exact vector by
residual / spectral gap). Oversampling (block b = k + 4 by default) makes the top-k
converge at rate (σ_{b+1}/σ_i)² per step instead of (σ_{k+1}/σ_i)², which matters on
the flat spectra of transformer layer Jacobians. The Rayleigh-Ritz step actually runs over
the span of the last three iterates, a block Krylov space whose products are all at hand.

Sign convention: singular vectors have no natural sign. Every right vector is flipped so
that its entry of largest magnitude is positive (the first such entry on ties), and its
left vector is flipped with it, so results are reproducible across runs and machines.

Example, on a plain matrix:

>>> import torch
>>> from tl_powersteer.linalg import block_power_iteration
>>> A = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64))
>>> res = block_power_iteration(A, k=2, seed=0)
>>> [round(s, 6) for s in res.singular_values.tolist()]
[5.0, 3.0]
>>> res.vectors.abs().argmax(dim=1).tolist()
[0, 1]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from .checks import check_seed, is_int, is_number, plain_ints

__all__ = [
    "LinearOperator",
    "MatrixOperator",
    "PowerIterationResult",
    "block_power_iteration",
    "canonical_signs",
    "check_iteration_args",
    "spectrum_problem",
    "shared_basis",
    "streamed_kl",
    "top_directions",
    "top_k_in_basis",
    "top_k_of_rows",
    "top_k_svd",
]


# Rayleigh-Ritz runs over the span of this many latest iterates, at least 2: one alone
# gives no evidence for the error bounds (measured: docs/concepts/power-iteration.md).
RITZ_ITERATES = 3


@runtime_checkable
class LinearOperator(Protocol):
    """Anything that multiplies blocks of column vectors by J and by Jᵀ."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matvec(self, V: Float[Tensor, "d b"]) -> Float[Tensor, "n b"]: ...

    def rmatvec(self, U: Float[Tensor, "n b"]) -> Float[Tensor, "d b"]: ...


class MatrixOperator:
    """A dense matrix seen as a ``LinearOperator`` (for tests and small problems)."""

    def __init__(self, matrix: Float[Tensor, "n d"]):
        if matrix.ndim != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix

    @property
    def shape(self) -> tuple[int, int]:
        n, d = self.matrix.shape
        return int(n), int(d)

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matvec(self, V: Float[Tensor, "d b"]) -> Float[Tensor, "n b"]:
        return self.matrix @ V

    def rmatvec(self, U: Float[Tensor, "n b"]) -> Float[Tensor, "d b"]:
        return self.matrix.T @ U


@dataclass
class PowerIterationResult:
    """Top-k singular triplets found by ``block_power_iteration``: J ≈ U diag(s) Vᵀ.

    ``residuals[i]`` is ``max(‖J vᵢ − σᵢ uᵢ‖, ‖Jᵀ uᵢ − σᵢ vᵢ‖) / σᵢ``; the first term is
    rounding-level by construction, so this is the adjoint-side residual.
    ``error_bounds[i]`` bounds the relative error of ``singular_values[i]`` and
    ``angle_bound`` the largest principal angle (radians) between span(``vectors``) and
    the exact top-k right singular subspace (π/2 while no spectral gap is seen);
    ``stop_rule`` is the rule that ended the run: ``"tol"``, ``"angle_tol"`` (the one met
    last, or ``"tol and angle_tol"`` when both were met at once) or ``"max_iters"``.
    """

    vectors: Float[Tensor, "k d"]
    singular_values: Float[Tensor, " k"]
    left_vectors: Float[Tensor, "k n"]
    residuals: Float[Tensor, " k"]
    iterations: int
    converged: bool
    n_matvec: int
    n_rmatvec: int
    history: Float[Tensor, "iterations k"]
    error_bounds: Float[Tensor, " k"]
    angle_bound: float
    stop_rule: str


def canonical_signs(vectors: Float[Tensor, "k d"]) -> Float[Tensor, " k"]:
    """±1 per row, making each row's largest-magnitude entry (first on ties) positive."""
    idx = vectors.abs().argmax(dim=1, keepdim=True)
    pivot = vectors.gather(1, idx).squeeze(1)
    return torch.where(pivot < 0, -1.0, 1.0).to(vectors.dtype)


def spectrum_problem(singular_values: Tensor, vectors: Tensor) -> str | None:
    """What is wrong with top-k singular values ``[..., k]`` and their vectors
    ``[..., k, d]``, or None: the values must be finite, non-negative and descending, the
    vectors finite."""
    s = singular_values.double()
    if not bool(s.isfinite().all()):
        return "singular values that are not finite"
    if bool((s < 0).any()):
        return "negative singular values"
    if s.shape[-1] > 1 and bool((s[..., 1:] > s[..., :-1] * (1 + 1e-6)).any()):
        return "singular values that are not in descending order"
    if not bool(vectors.isfinite().all()):
        return "singular vectors that are not finite"
    return None


def check_iteration_args(
    k: int,
    max_k: int,
    *,
    block_size: int | None,
    tol: float,
    max_iters: int,
    angle_tol: float | None = None,
) -> int:
    """Validate the iteration options before any work; return the block size to use."""
    for name, value in (("k", k), ("max_iters", max_iters)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= k <= max_k:
        raise ValueError(
            f"k must be between 1 and {max_k} (d_model, or the smaller side of the operator), "
            f"got {k}"
        )
    b = min(k + 4, max_k) if block_size is None else block_size
    if not is_int(b) or not k <= b <= max_k:
        raise ValueError(f"block_size must be an int between k={k} and {max_k}, got {b!r}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters}")
    if not is_number(tol) or not 0 < tol < 1:
        raise ValueError(
            f"tol must be a positive number below 1 (the relative accuracy of the singular "
            f"values, e.g. 1e-4), got {tol!r}"
        )
    if angle_tol is not None and (not is_number(angle_tol) or not 0 < angle_tol < math.pi / 2):
        raise ValueError(
            "angle_tol must be None or a number of radians between 0 and pi/2 (the largest "
            f"angle to the exact top-k subspace, e.g. 1e-2), got {angle_tol!r}"
        )
    return b


def _as_operator(op: LinearOperator | Tensor) -> LinearOperator:
    if isinstance(op, Tensor):
        return MatrixOperator(op)
    if not isinstance(op, LinearOperator):
        raise TypeError(
            "expected a torch.Tensor matrix or an object with shape, dtype, device, "
            f"matvec and rmatvec; got {type(op).__name__}"
        )
    return op


@plain_ints
def block_power_iteration(
    operator: LinearOperator | Tensor,
    k: int,
    *,
    block_size: int | None = None,
    tol: float = 1e-4,
    angle_tol: float | None = None,
    max_iters: int = 50,
    seed: int = 0,
) -> PowerIterationResult:
    """Top-``k`` singular triplets of ``operator`` by oversampled block power iteration.

    Every step takes the Rayleigh-Ritz approximations from the span of the last three
    iterates (free: their products are at hand) and bounds their error from the
    residuals; it stops as soon as the bounds meet what was asked for. How the bounds
    are made, and what they assume: ``docs/concepts/power-iteration.md``.

    Args:
        operator: a ``LinearOperator`` or a plain 2-D tensor.
        k: number of singular triplets to return.
        block_size: columns iterated together; default ``k + 4`` (capped at ``d``).
        tol: the relative accuracy of every returned singular value: stop once the error
            bound of each is below ``tol``.
        angle_tol: if given, also stop only once the top-k subspace is within this many
            radians of the exact one (its largest principal angle).
        max_iters: stop after this many iterations even if not converged.
        seed: seeds the random start block; equal seeds give equal results.
    """
    op = _as_operator(operator)
    n, d = op.shape
    b = check_iteration_args(
        k, min(n, d), block_size=block_size, tol=tol, max_iters=max_iters, angle_tol=angle_tol
    )

    check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(d, b, generator=gen, dtype=torch.float64)
    # The small linear algebra runs in float64 whatever the operator's precision: it costs
    # little next to the products, and the bounds need residuals far below rounding of J.
    Q = torch.linalg.qr(start.to(op.device)).Q
    # Unit round-off of the products: a half-precision operator's come back rounded to it.
    rounding = float(torch.finfo(op.dtype).eps)

    n_matvec = n_rmatvec = 0
    iterates: deque[tuple[Tensor, Tensor, Tensor]] = deque(maxlen=RITZ_ITERATES)
    history: list[Tensor] = []
    met_at: dict[str, int] = {}
    wanted = ("tol",) if angle_tol is None else ("tol", "angle_tol")
    iterations = 0
    while True:
        iterations += 1
        Y = op.matvec(Q.to(op.dtype)).double()
        Z = op.rmatvec(Y.to(op.dtype)).double()
        n_matvec += b
        n_rmatvec += b
        iterates.append((Q, Y, Z))
        basis, JB, AB = _krylov_space(iterates, rounding)
        Uy, s, Wt = torch.linalg.svd(JB, full_matrices=False)
        W = Wt.T
        # Residuals of the Gram problem, JᵀJ x − σ² x, one column per Ritz vector.
        R = AB @ W - (basis @ W) * s.square()
        complete = basis.shape[1] >= d
        bounds, angle, zero = _accuracy_bounds(s, R, k, complete=complete, rounding=rounding)
        if len(iterates) == 1 and not complete:
            # One iterate from a random start tells too little of the rest of the
            # spectrum for the gap estimate: its further Ritz values are far from converged.
            bounds, angle = torch.full_like(bounds, math.inf), math.pi / 2
        history.append(s[:k].to("cpu"))
        for rule, met in (("tol", bool(((bounds <= tol) | zero).all())),
                          ("angle_tol", angle_tol is not None and angle <= angle_tol)):  # fmt: skip
            if met:
                met_at.setdefault(rule, iterations)
            else:
                met_at.pop(rule, None)
        converged = all(rule in met_at for rule in wanted)
        if converged or iterations >= max_iters:
            break
        Q = torch.linalg.qr(Z).Q

    top = s[:k]
    V = (basis @ W[:, :k]).T
    U = Uy[:, :k].T
    safe = top.clamp_min(torch.finfo(top.dtype).tiny)
    left_res = (JB @ W[:, :k]).T - top[:, None] * U
    right_res = R[:, :k].T / safe[:, None]
    residuals = torch.maximum(left_res.norm(dim=1), right_res.norm(dim=1)) / safe
    if converged:
        last = max(met_at[rule] for rule in wanted)
        stop_rule = " and ".join(rule for rule in wanted if met_at[rule] == last)
    else:
        stop_rule = "max_iters"

    work = torch.promote_types(op.dtype, torch.float32)
    signs = canonical_signs(V)
    return PowerIterationResult(
        vectors=(V * signs[:, None]).to(work),
        singular_values=top.to(work),
        left_vectors=(U * signs[:, None]).to(work),
        residuals=residuals.to(work),
        iterations=iterations,
        converged=converged,
        n_matvec=n_matvec,
        n_rmatvec=n_rmatvec,
        history=torch.stack(history),
        error_bounds=bounds.to("cpu"),
        angle_bound=angle,
        stop_rule=stop_rule,
    )


def _krylov_space(
    iterates: Sequence[tuple[Tensor, Tensor, Tensor]], rounding: float
) -> tuple[Tensor, Tensor, Tensor]:
    """An orthonormal basis B of the span of the last iterates, with J B and JᵀJ B, from
    the products already made: (Q, J Q, JᵀJ Q) of each iterate.

    span(Q₁, Q₂, Q₃) = span(Q₁, JᵀJ Q₁, (JᵀJ)² Q₁) is a block Krylov space: its Ritz
    vectors converge faster than those of the last Q alone, at no product. A direction
    the iterates barely add (singular value of [Q₁, Q₂, Q₃] below √rounding) is dropped:
    its products would be the difference of nearly equal ones, rounding error amplified.
    """
    if len(iterates) == 1:
        return iterates[0]
    M, JM, AM = (torch.cat(parts, dim=1) for parts in zip(*iterates, strict=True))
    _, sv, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = sv > math.sqrt(rounding) * sv[0]
    C = Vh[keep].T / sv[keep]
    return M @ C, JM @ C, AM @ C


def _accuracy_bounds(
    s: Float[Tensor, " m"],
    R: Float[Tensor, "d m"],
    k: int,
    *,
    complete: bool,
    rounding: float,
) -> tuple[Tensor, float, Tensor]:
    """Bounds on the relative errors of the top-k Ritz values ``s`` and on the angle of
    the top-k Ritz subspace, from the Gram residuals ``R`` of every Ritz vector of the
    space (``complete``: the space is the whole domain). Also returns which of the k are
    zero to working precision.

    For the top i Ritz vectors X_i, JᵀJ in the basis [X_i, X_i⊥] is [[Θ_i, Eᵀ], [E, N]]
    with ‖E‖ = ‖R_i‖. If the largest eigenvalue of N is at most μ_i < θ_i (θ = s²), the
    top-i eigenvalues λ_j of JᵀJ satisfy θ_j ≤ λ_j ≤ θ_j + 2‖E‖² / (η + √(η² + 4‖E‖²)),
    η = θ_i − μ_i (C.-K. Li and R.-C. Li, 2005), and the top-i subspace is within
    arcsin(‖E‖ / η) (Davis-Kahan); without a gap, Weyl still gives
    λ_j ≤ max(θ_j, μ_i) + ‖E‖. μ_i is estimated as the largest θ_j + 2‖r_j‖ over the
    space's further Ritz values: every one has an eigenvalue within ‖r_j‖ of it, so the
    estimate is safe unless the space has missed a direction larger than that, which no
    residual can reveal. Each σ_j takes the best bound over i ≥ j.
    """
    m = s.shape[0]
    G = R.T @ R
    theta = s.square()
    sigma1 = float(s[0])
    # The products' own rounding, about rounding * σ₁ each, is a floor no bound can beat.
    floor = 64 * rounding * sigma1
    theta_err = torch.full((k,), math.inf, dtype=s.dtype, device=s.device)
    angle = math.pi / 2
    reach = theta + 2 * G.diagonal().clamp_min(0).sqrt()
    ceiling = reach.flip(0).cummax(0).values.flip(0)  # ceiling[i] = max of reach[i:]
    for i in range(1, m + 1):
        if i < m:
            mu = float(ceiling[i])
        elif complete:
            mu = 0.0
        else:
            break  # nothing is known of the rest of the spectrum
        E = float(torch.linalg.eigvalsh(G[:i, :i])[-1].clamp_min(0).sqrt())
        j = min(i, k)
        eta = float(theta[i - 1]) - mu
        if eta > 0:
            err = 2 * E**2 / (eta + math.sqrt(eta**2 + 4 * E**2))
            candidate = torch.full((j,), err, dtype=s.dtype, device=s.device)
            if i == k:
                angle = math.asin(min(1.0, (E + floor * sigma1) / eta))
        else:
            candidate = (mu - theta[:j]).clamp_min(0) + E
        theta_err[:j] = torch.minimum(theta_err[:j], candidate)
    top = s[:k]
    # σ_j lies in [s_j, √(θ_j + err)]. Below √rounding·σ₁ a Gram residual resolves
    # nothing, so such a value's error is taken relative to that, and a value whose whole
    # interval lies below a few times it is zero to working precision.
    upper = torch.sqrt(theta[:k] + theta_err)
    sigma_err = theta_err / (upper + top)
    resolution = math.sqrt(rounding) * sigma1
    zero = upper <= 8 * resolution
    return ((sigma_err + floor) / top.clamp_min(resolution)).to("cpu"), angle, zero.to("cpu")


# Directions beyond the k + 1 wanted that the exact method's Rayleigh-Ritz step keeps, so
# that the k + 1 are separated from the rest of the spectrum (σ_{k+1} included).
RITZ_MARGIN = 4


def shared_basis(
    co_range_sketches: Sequence[Float[Tensor, "l d"]], width: int
) -> Float[Tensor, "d width"]:
    """An orthonormal basis of ``min(width, d)`` columns for the rows of every sketch.

    Each co-range sketch W_t = Ψ_tᵀ J_t is scaled to unit Frobenius norm (so a target whose
    Jacobian is small still counts), the scaled sketches are stacked, and the basis is their
    top right singular vectors, completed with further orthonormal directions when the
    stack has fewer than ``width`` rows (more columns only tighten the estimate). In
    float64, on the sketches' device.
    """
    blocks = []
    for W in co_range_sketches:
        W = W.double()
        norm = torch.linalg.matrix_norm(W)
        blocks.append(W / norm if norm > 0 else W)
    stacked = torch.cat(blocks)
    # Complete (d x d) left singular vectors of the stackᵀ only when the stack is too short.
    U = torch.linalg.svd(stacked.T, full_matrices=stacked.shape[0] < width).U
    return U[:, : min(width, U.shape[1])]


def top_k_in_basis(
    Z: Float[Tensor, "n b"], basis: Float[Tensor, "d b"], k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k of J restricted to the basis P, from Z = J P: (σ_1..σ_k, σ_{k+1}, vectors)."""
    sig, nxt, H = top_k_svd(Z, k)
    V = H @ basis.double().T
    return sig, nxt, V * canonical_signs(V)[:, None]


def top_directions(Z: Float[Tensor, "n b"], m: int) -> Float[Tensor, "n m"]:
    """The top m left singular vectors of Z, each times its singular value: Z H for its top
    m right singular vectors H, from the eigenvectors of the small float64 Gram ZᵀZ."""
    Z64 = Z.double()
    evals, evecs = torch.linalg.eigh(Z64.T @ Z64)
    top = evecs[:, evals.argsort(descending=True)[:m]]
    return (Z64 @ top).to(Z.dtype)


def top_k_of_rows(R: Float[Tensor, "l d"], k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k of J from its rows R = Uᵀ J on an orthonormal U: (σ_1..σ_k, σ_{k+1}, right
    vectors with canonical signs, and the left singular vectors W of R: the columns of U W
    are J's top left directions within U, in order)."""
    W, S, Vh = torch.linalg.svd(R.double(), full_matrices=False)
    V = Vh[:k]
    return S[:k], S[k], V * canonical_signs(V)[:, None], W


def top_k_svd(J: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(σ_1..σ_k, σ_{k+1}, top-k right vectors with canonical signs) of J.

    The eigendecomposition of the Gram JᵀJ (d x d) in J's own precision finds the top of
    the spectrum, k + 1 + RITZ_MARGIN directions; a Rayleigh-Ritz step in float64 (an SVD
    of J times those directions) then gives σ and vectors. The directions' error enters σ
    squared, so σ agree with a float64 SVD of J far below J's own rounding, and the vectors
    to J's rounding, at half the cost of a float64 Gram and eigendecomposition (measured:
    docs/concepts/atlas.md).
    """
    work = J if J.dtype in (torch.float32, torch.float64) else J.float()
    evals, evecs = torch.linalg.eigh(work.T @ work)
    top = evecs[:, evals.argsort(descending=True)[: k + 1 + RITZ_MARGIN]].double()
    # Orthonormal in float64: float32 eigenvectors are so only to ~1e-7, which would enter σ.
    Q = torch.linalg.qr(top).Q
    _, S, Vh = torch.linalg.svd(J.double() @ Q, full_matrices=False)
    V = Vh[:k] @ Q.T  # k < d_model, so S holds σ_{k+1} too
    return S[:k], S[k], V * canonical_signs(V)[:, None]


def streamed_kl(
    slices: Iterable[tuple[Float[Tensor, "*rows part"], Float[Tensor, "*rows part"]]],
    base_lse: Float[Tensor, "*rows"],
) -> Float[Tensor, "*rows"]:
    """KL(softmax(z) ‖ softmax(b)) per row, in nats and float64, from the logits (z, b)
    handed over one slice of the vocabulary at a time; ``base_lse`` is logsumexp(b) over
    the whole vocabulary, in float64.

    The logits of a whole vocabulary need not exist at once: an unembedding can be
    applied one slice of its rows at a time, each slice's logits still in cache when they
    are reduced (``steered_runs``' KL passes). Each slice adds, in its own precision
    (float64 if z or b is, else float32), the sum of e^(z − max) · ((z − b) − c) with c
    the running estimate of logsumexp(z) − logsumexp(b); the slices are combined in
    float64 with the estimate each used corrected to the final one, so log p − log q
    stays small where the mass is, as in ``scales.kl_divergence``, and the two agree to
    the logits' rounding.
    """
    tops, sums, moved, shifts = [], [], [], []
    lse = None
    for z, b in slices:
        dtype = torch.float64 if torch.float64 in (z.dtype, b.dtype) else torch.float32
        z, b = z.to(dtype), b.to(dtype)
        top = z.amax(dim=-1)
        weights = (z - top[..., None]).exp_()
        total = weights.sum(dim=-1).double()
        part = top.double() + total.log()
        lse = part if lse is None else torch.logaddexp(lse, part)
        shift = lse - base_lse
        moved.append((z - b).sub_(shift.to(dtype)[..., None]).mul_(weights).sum(dim=-1).double())
        tops.append(top.double())
        sums.append(total)
        shifts.append(shift)
    if lse is None:
        raise ValueError("streamed_kl needs at least one slice of the vocabulary")
    top_all = torch.stack(tops).amax(dim=0)
    scale = torch.stack([(t - top_all).exp() for t in tops])
    mass = torch.stack(sums) * scale
    # Each slice's sum used its own estimate of the shift: Σ w (c_k − c) puts back the rest.
    correction = (mass * (torch.stack(shifts) - (lse - base_lse))).sum(dim=0)
    return ((torch.stack(moved) * scale).sum(dim=0) + correction) / mass.sum(dim=0)
