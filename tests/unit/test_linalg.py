"""Linear algebra on plain matrices against torch.linalg.svd in float64: block power
iteration and the atlas's top-k helpers."""

from __future__ import annotations

import math

import pytest
import torch

from tests.reference import principal_angles
from tl_powersteer import linalg
from tl_powersteer.linalg import MatrixOperator, block_power_iteration, canonical_signs


def matrix_with_spectrum(singular_values: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = singular_values.numel()
    U = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    return U @ torch.diag(singular_values.double()) @ V.T


@pytest.fixture
def decaying() -> torch.Tensor:
    return matrix_with_spectrum(torch.logspace(1, -2, 40), n=60)


def test_matches_exact_svd(decaying: torch.Tensor) -> None:
    res = block_power_iteration(decaying, k=5, tol=1e-10, angle_tol=1e-8, max_iters=200)
    U, S, Vh = torch.linalg.svd(decaying, full_matrices=False)
    torch.testing.assert_close(res.singular_values, S[:5], rtol=1e-10, atol=0)
    assert principal_angles(res.vectors, Vh[:5]).max() < 1e-8
    for i in range(5):
        assert torch.allclose(res.vectors[i].abs(), Vh[i].abs(), atol=1e-6)
        assert torch.allclose(res.left_vectors[i].abs(), U[:, i].abs(), atol=1e-6)


def test_triplets_are_consistent(decaying: torch.Tensor) -> None:
    res = block_power_iteration(decaying, k=4, tol=1e-8)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(res.vectors @ res.vectors.T, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(res.left_vectors @ res.left_vectors.T, eye, atol=1e-12, rtol=0)
    Jv = res.vectors @ decaying.T
    torch.testing.assert_close(
        Jv, res.singular_values[:, None] * res.left_vectors, atol=1e-10, rtol=0
    )
    # The reported residual is the adjoint-side one, computed here from the dense matrix.
    JTu = res.left_vectors @ decaying
    expected = (JTu - res.singular_values[:, None] * res.vectors).norm(dim=1) / res.singular_values
    torch.testing.assert_close(res.residuals, expected, atol=1e-10, rtol=1e-6)


def test_singular_values_descending(decaying: torch.Tensor) -> None:
    res = block_power_iteration(decaying, k=6)
    assert torch.all(res.singular_values[:-1] >= res.singular_values[1:])


def test_deterministic_for_seed(decaying: torch.Tensor) -> None:
    a = block_power_iteration(decaying, k=3, seed=7, max_iters=3)
    b = block_power_iteration(decaying, k=3, seed=7, max_iters=3)
    c = block_power_iteration(decaying, k=3, seed=8, max_iters=3)
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.singular_values, b.singular_values)
    assert not torch.equal(a.vectors, c.vectors)


def test_sign_convention(decaying: torch.Tensor) -> None:
    res = block_power_iteration(decaying, k=4, tol=1e-10)
    pivots = res.vectors.gather(1, res.vectors.abs().argmax(1, keepdim=True))
    assert torch.all(pivots > 0)
    flipped = torch.tensor([[0.1, -0.9, 0.3], [0.5, 0.2, -0.1]])
    assert canonical_signs(flipped).tolist() == [-1.0, 1.0]


def test_oversampling_speeds_up_flat_spectrum() -> None:
    flat = torch.cat([torch.linspace(2.0, 1.6, 8), torch.linspace(1.5, 0.1, 32)])
    A = matrix_with_spectrum(flat, n=50, seed=3)
    plain = block_power_iteration(A, k=8, block_size=8, tol=1e-6, max_iters=500)
    over = block_power_iteration(A, k=8, block_size=12, tol=1e-6, max_iters=500)
    assert over.converged and plain.converged
    assert over.iterations < plain.iterations


def test_stops_at_max_iters_and_counts_products(decaying: torch.Tensor) -> None:
    res = block_power_iteration(decaying, k=3, block_size=5, tol=1e-15, max_iters=4)
    assert res.iterations == 4 and not res.converged and res.stop_rule == "max_iters"
    assert res.n_matvec == res.n_rmatvec == 4 * 5
    assert res.history.shape == (4, 3)


def test_converges_and_reports_iterations(decaying: torch.Tensor) -> None:
    res = block_power_iteration(decaying, k=3, tol=1e-6, max_iters=100)
    assert res.converged and 2 <= res.iterations < 100 and res.stop_rule == "tol"
    assert bool((res.error_bounds <= 1e-6).all())
    # history[i] holds the Ritz values of iteration i + 1: the last ones are returned.
    assert res.history.shape == (res.iterations, 3)
    assert torch.equal(res.history[-1], res.singular_values)


def test_rank_deficient_operator() -> None:
    A = matrix_with_spectrum(torch.tensor([3.0, 2.0, 0.0, 0.0, 0.0, 0.0]), n=8)
    res = block_power_iteration(A, k=2, tol=1e-10)
    torch.testing.assert_close(res.singular_values, torch.tensor([3.0, 2.0], dtype=torch.float64))


def test_accepts_operator_objects(decaying: torch.Tensor) -> None:
    a = block_power_iteration(MatrixOperator(decaying), k=2, seed=1)
    b = block_power_iteration(decaying, k=2, seed=1)
    assert torch.equal(a.vectors, b.vectors)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be between 1 and"),
        ({"k": 41}, "k must be between 1 and"),
        ({"k": 3, "block_size": 2}, "block_size must be"),
        ({"k": 3, "tol": 0.0}, "tol must be a positive"),
        ({"k": 3, "tol": 1.0}, "tol must be a positive number below 1"),
        ({"k": 3, "tol": "1e-4"}, "tol must be a positive"),
        ({"k": 3, "angle_tol": 0.0}, "angle_tol must be None or a number of radians"),
        ({"k": 3, "angle_tol": math.pi / 2}, "angle_tol must be None or a number"),
        ({"k": 3, "angle_tol": float("nan")}, "angle_tol must be None or a number"),
        ({"k": 3, "max_iters": 0}, "max_iters must be at least 1"),
    ],
)
def test_bad_arguments(decaying: torch.Tensor, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        block_power_iteration(decaying, **kwargs)


def test_bad_operator_type() -> None:
    with pytest.raises(TypeError, match="matvec and rmatvec"):
        block_power_iteration([[1.0, 2.0]], k=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="k must be an int"):
        block_power_iteration(torch.eye(3), k=1.5)  # type: ignore[arg-type]


SPECTRA = {
    "flat": 1 + 0.1 * torch.linspace(1, 0, 48),
    "decaying": torch.logspace(1, -2, 48),
    "slowly decaying": (1 + torch.arange(48.0)) ** -0.5,
    "clustered": torch.cat(
        [torch.full((3,), 5.0), torch.full((4,), 3.0), torch.linspace(2, 0.1, 41)]
    ),
    # k = 6 falls inside a ten-fold singular value: no top-6 subspace is defined.
    "degenerate across k": torch.cat([torch.full((10,), 2.0), torch.linspace(1, 0.1, 38)]),
}
K = 6


def true_errors(res: linalg.PowerIterationResult, J: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Relative σ errors and the largest top-k angle, against a float64 SVD of ``J``."""
    S, Vh = torch.linalg.svd(J.double(), full_matrices=False)[1:]
    k = res.singular_values.numel()
    errors = (res.singular_values.double() - S[:k]).abs() / S[:k]
    return errors, float(principal_angles(res.vectors.double(), Vh[:k]).max())


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
@pytest.mark.parametrize("seed", [0, 1])
def test_singular_values_meet_tol_on_known_spectra(name: str, tol: float, seed: int) -> None:
    J = matrix_with_spectrum(SPECTRA[name], n=60, seed=seed)
    res = block_power_iteration(J, K, tol=tol, max_iters=1000, seed=seed)
    assert res.converged and res.stop_rule == "tol"
    assert bool((res.error_bounds <= tol).all())
    errors, angle = true_errors(res, J)
    assert bool((errors <= tol).all()), errors
    assert bool((errors <= res.error_bounds).all())
    assert angle <= res.angle_bound
    if name == "degenerate across k":
        assert res.angle_bound == math.pi / 2


@pytest.mark.parametrize("name", list(SPECTRA))
def test_bounds_never_fall_below_the_true_errors(name: str) -> None:
    J = matrix_with_spectrum(SPECTRA[name], n=60, seed=2)
    for iterations in range(1, 31):
        res = block_power_iteration(J, K, tol=1e-15, max_iters=iterations, seed=2)
        errors, angle = true_errors(res, J)
        assert bool((errors <= res.error_bounds).all()), (iterations, errors, res.error_bounds)
        assert angle <= res.angle_bound, (iterations, angle, res.angle_bound)
    # One iterate from a random start is no evidence of convergence: nothing is claimed.
    first = block_power_iteration(J, K, max_iters=1, seed=2)
    assert bool(torch.isinf(first.error_bounds).all()) and first.angle_bound == math.pi / 2


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_stops_soon_after_the_accuracy_is_reached(name: str, tol: float) -> None:
    J = matrix_with_spectrum(SPECTRA[name], n=60, seed=0)
    exact = torch.linalg.svdvals(J)[:K]
    res = block_power_iteration(J, K, tol=tol, max_iters=1000)
    # The run's own history is what each shorter run would have returned.
    full = block_power_iteration(J, K, tol=1e-15, max_iters=res.iterations)
    met = ((full.history - exact).abs() / exact <= tol).all(dim=1)
    oracle = int(met.int().argmax()) + 1
    assert bool(met[oracle - 1 :].all())
    # Never before the accuracy is there; soon after it, except on a flat spectrum, where
    # no gap is seen until late and the bound falls behind the error (by about 2x).
    slack = oracle * 1.5 if name == "flat" else 2
    assert oracle <= res.iterations <= oracle + slack


@pytest.mark.parametrize("name", ["flat", "slowly decaying", "clustered"])
def test_rayleigh_ritz_over_three_iterates_stops_sooner_than_over_two(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    J = matrix_with_spectrum(SPECTRA[name], n=60, seed=0)
    three = block_power_iteration(J, K, tol=1e-6, max_iters=1000)
    monkeypatch.setattr(linalg, "RITZ_ITERATES", 2)
    two = block_power_iteration(J, K, tol=1e-6, max_iters=1000)
    assert three.converged and two.converged
    assert three.iterations < two.iterations
    errors, _ = true_errors(three, J)
    assert bool((errors <= 1e-6).all())


def test_angle_tol_asks_for_the_subspace(decaying: torch.Tensor) -> None:
    loose = block_power_iteration(decaying, K, tol=1e-2)
    both = block_power_iteration(decaying, K, tol=1e-2, angle_tol=1e-9)
    assert loose.stop_rule == "tol" and both.stop_rule == "angle_tol"
    assert both.iterations > loose.iterations and both.angle_bound <= 1e-9
    assert true_errors(both, decaying)[1] <= 1e-9 < true_errors(loose, decaying)[1]
    # A tight tol met at the same iteration as a loose angle_tol names both.
    tight = block_power_iteration(decaying, K, tol=1e-12, angle_tol=1.5)
    assert tight.stop_rule in ("tol", "tol and angle_tol")


def test_float32_operators_meet_tol_down_to_their_rounding() -> None:
    J = matrix_with_spectrum(SPECTRA["slowly decaying"], n=60).float()
    res = block_power_iteration(J, K, tol=1e-4, max_iters=200)
    assert res.converged and res.singular_values.dtype == torch.float32
    errors, _ = true_errors(res, J)
    assert bool((errors <= 1e-4).all()) and bool((errors <= res.error_bounds).all())
    # Below 64 times float32's rounding (relative to σ₁) no bound goes: the run says so.
    capped = block_power_iteration(J, K, tol=1e-6, max_iters=40)
    assert not capped.converged and float(capped.error_bounds.min()) > 64 * 1.19e-7


def test_more_vectors_than_the_rank_stop_on_zeros() -> None:
    J = matrix_with_spectrum(torch.tensor([3.0, 2.0, 1.0, 0, 0, 0, 0, 0, 0, 0]), n=12)
    res = block_power_iteration(J, k=5, block_size=6, tol=1e-10, max_iters=50)
    assert res.converged and res.stop_rule == "tol" and res.iterations <= 3
    torch.testing.assert_close(
        res.singular_values[:3], torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64),
        rtol=1e-10, atol=0,
    )  # fmt: skip
    # The zeros are zero to working precision; their vectors are any of the null space.
    assert float(res.singular_values[3:].max()) <= 8 * math.sqrt(2.3e-16) * 3
    assert res.angle_bound == math.pi / 2


def test_principal_angles_reference() -> None:
    theta = 1e-4
    A = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    B = torch.tensor([[torch.cos(torch.tensor(theta)), torch.sin(torch.tensor(theta)), 0.0]])
    torch.testing.assert_close(principal_angles(A, B), torch.tensor([theta], dtype=torch.float64))
    assert principal_angles(A, -A).item() == 0.0
    with pytest.raises(ValueError, match="equal size"):
        principal_angles(torch.eye(3)[:2], torch.eye(3)[:1])


def test_shared_basis_holds_every_low_rank_sketch_exactly() -> None:
    gen = torch.Generator().manual_seed(0)

    def low_rank(rows: int, rank: int, cols: int = 30) -> torch.Tensor:
        left = torch.randn(rows, rank, generator=gen, dtype=torch.float64)
        return left @ torch.randn(rank, cols, generator=gen, dtype=torch.float64)

    # Three Jacobians of rank 3 with unrelated row spaces: a basis of 9 columns holds all.
    Js = [low_rank(40, 3) for _ in range(3)]
    sketches = [torch.randn(40, 12, generator=gen, dtype=torch.float64).T @ J for J in Js]
    basis = linalg.shared_basis(sketches, 9)
    assert basis.shape == (30, 9) and basis.dtype == torch.float64
    torch.testing.assert_close(basis.T @ basis, torch.eye(9, dtype=torch.float64))
    for J in Js:
        sig, nxt, V = linalg.top_k_in_basis(J @ basis, basis, k=2)
        S, Vh = torch.linalg.svd(J, full_matrices=False)[1:]
        torch.testing.assert_close(sig, S[:2], rtol=1e-10, atol=0)
        torch.testing.assert_close(nxt, S[2], rtol=1e-10, atol=0)
        assert principal_angles(V, Vh[:2]).max() < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_k_of_a_dense_jacobian_is_float64_accurate(dtype: torch.dtype) -> None:
    # Heavy-tailed like a layer Jacobian's spectrum; σ_5 close to σ_6, where a step on
    # the top k + 1 directions alone would mix them.
    gen = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(300, 80, generator=gen, dtype=torch.float64)).Q
    W = torch.linalg.qr(torch.randn(80, 80, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.cat(
        [torch.tensor([9.0, 5.0, 3.0, 2.0, 1.98, 1.9799]), torch.linspace(1.5, 0.1, 74)]
    )
    J = ((U * spectrum.double()) @ W.T).to(dtype)
    sig, nxt, V = linalg.top_k_svd(J, k=4)
    # The reference: a float64 SVD of the very matrix given (rounded to its dtype).
    S, Vh = torch.linalg.svd(J.double(), full_matrices=False)[1:]
    assert sig.dtype == nxt.dtype == V.dtype == torch.float64
    # float32 eigenvectors are orthonormal to ~1e-7 only: unless made orthonormal in
    # float64 before the Rayleigh-Ritz step, σ would be off by about that much.
    torch.testing.assert_close(sig, S[:4], rtol=1e-10, atol=0)
    torch.testing.assert_close(nxt, S[4], rtol=1e-10, atol=0)
    assert principal_angles(V, Vh[:4]).max() < (1e-8 if dtype == torch.float64 else 1e-4)


def test_rows_of_a_left_basis_give_the_exact_top_k() -> None:
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(40, 4, generator=gen, dtype=torch.float64) @ torch.randn(
        4, 30, generator=gen, dtype=torch.float64
    )
    # A left basis built from J's own top directions holds its column space: Qᵀ J is exact.
    left = linalg.top_directions(J, 4)
    Q = linalg.shared_basis([left.T], 6)
    sig, nxt, V, W = linalg.top_k_of_rows(Q.T @ J, k=3)
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    torch.testing.assert_close(sig, S[:3], rtol=1e-10, atol=0)
    torch.testing.assert_close(nxt, S[3], rtol=1e-10, atol=0)
    assert principal_angles(V, Vh[:3]).max() < 1e-8
    # J's top left directions within Q, in order (where the Krylov step starts), and those
    # of Z = J, each times its singular value (what the refining basis is built from).
    assert principal_angles((Q @ W[:, :4]).T, U[:, :4].T).max() < 1e-8
    torch.testing.assert_close(left.norm(dim=0), S[:4], rtol=1e-10, atol=0)
    assert principal_angles((left / S[:4]).T, U[:, :4].T).max() < 1e-8


def test_shared_basis_weighs_every_target_equally() -> None:
    gen = torch.Generator().manual_seed(1)
    # A large Jacobian with a flat spectrum and a tiny one of rank 1: unscaled, the tiny
    # one's direction would fall below the large one's top 4 and out of a 5-column basis.
    large = torch.randn(40, 30, generator=gen, dtype=torch.float64) * 1e3
    tiny = torch.randn(40, 1, generator=gen, dtype=torch.float64) @ torch.randn(
        1, 30, generator=gen, dtype=torch.float64
    )
    psi = torch.randn(40, 20, generator=gen, dtype=torch.float64)
    sketches = [psi.T @ large, psi.T @ tiny]
    exact = torch.linalg.svdvals(tiny)[0]

    def error(basis: torch.Tensor) -> float:
        sig = linalg.top_k_in_basis(tiny @ basis, basis, k=1)[0]
        return float((exact - sig[0]) / exact)

    unscaled = torch.linalg.svd(torch.cat(sketches).T, full_matrices=False).U[:, :5]
    assert error(unscaled) > 0.1
    assert 0 <= error(linalg.shared_basis(sketches, 5)) < 1e-3
    # A target whose Jacobian is zero adds nothing and no NaN; short stacks are completed.
    basis = linalg.shared_basis([torch.zeros(2, 30, dtype=torch.float64)], 6)
    assert basis.shape == (30, 6) and bool(torch.isfinite(basis).all())
    torch.testing.assert_close(basis.T @ basis, torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streamed_kl_equals_the_whole_vocabularys_kl(dtype: torch.dtype) -> None:
    """Slices of uneven sizes, one slice or many, a base shared across rows: the KL of
    float64 softmaxes over the whole vocabulary, to the logits' rounding. The first
    slices' estimate of the normalising shift is far off (they hold little of the mass),
    which the final correction must undo."""
    gen = torch.Generator().manual_seed(0)
    vocab = 5000
    base = torch.randn(3, vocab, generator=gen, dtype=torch.float64) * 4
    steered = base[None] + torch.randn(4, 3, vocab, generator=gen, dtype=torch.float64)
    steered[..., -7:] += 9.0  # most of the mass in the last slice
    z, b = steered.to(dtype), base.to(dtype)
    logp, logq = z.double().log_softmax(-1), b.double().log_softmax(-1)
    exact = (logp.exp() * (logp - logq)).sum(-1)
    base_lse = b.double().logsumexp(-1)
    for size in (vocab, 1024, 333):
        slices = ((z[..., i : i + size], b[:, i : i + size]) for i in range(0, vocab, size))
        found = linalg.streamed_kl(slices, base_lse)
        assert found.dtype == torch.float64 and found.shape == (4, 3)
        # float32: the rounding of float32 logits themselves, as in scales.kl_divergence.
        tolerance = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(found, exact, rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="at least one slice"):
        linalg.streamed_kl(iter([]), base_lse)
