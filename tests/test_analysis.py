"""Tests of lora_lightning.analysis: §7.2 subspace similarity and §7.3 / Table 7 amplification."""

from __future__ import annotations

import math

import pytest
import torch

from lora_lightning.analysis import (
    amplification_report,
    delta_weight,
    plot_subspace_similarity,
    right_singular_subspace,
    subspace_similarity,
    subspace_similarity_grid,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _e(n: int, idx: int) -> torch.Tensor:
    v = torch.zeros(n, dtype=torch.float64)
    v[idx] = 1.0
    return v


# ---------------------------------------------------------------- right_singular_subspace


def test_right_singular_subspace_shape_orthonormal_and_ordered():
    a = _randn(8, 50, seed=0).float()
    u = right_singular_subspace(a, 5)
    assert u.shape == (50, 5) and u.dtype == torch.float64
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    # top-1 direction of a matrix with one dominant row direction
    x = _e(6, 2) * 10.0
    a2 = torch.stack([x, _e(6, 0), _e(6, 4) * 0.5])
    top = right_singular_subspace(a2, 1)[:, 0]
    assert abs(float(top @ _e(6, 2))) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- subspace_similarity: exact cases


def test_phi_hand_computed_e1e2_vs_e1e3():
    # A1 rows span {e1, e2}, top right singular vector e1 (singular values 2 > 1).
    a1 = torch.stack([2 * _e(4, 0), _e(4, 1)])
    # A2 rows span {e1, e3}, top direction (e1 + e3)/sqrt2, second (e1 - e3)/sqrt2.
    a2 = torch.stack([2 * (_e(4, 0) + _e(4, 2)) / math.sqrt(2), (_e(4, 0) - _e(4, 2)) / math.sqrt(2)])
    # phi(2,2) = ||[e1 e2]^T [e1 e3]||_F^2 / 2 = 1/2
    assert subspace_similarity(a1, a2, 2, 2) == pytest.approx(0.5, abs=1e-12)
    # phi(1,1) = (e1 . (e1+e3)/sqrt2)^2 / 1 = 1/2
    assert subspace_similarity(a1, a2, 1, 1) == pytest.approx(0.5, abs=1e-12)
    # phi(1,2): e1 lies inside span{e1, e3} -> 1
    assert subspace_similarity(a1, a2, 1, 2) == pytest.approx(1.0, abs=1e-12)
    # phi(2,1): ||[e1 e2]^T (e1+e3)/sqrt2||^2 / 1 = 1/2
    assert subspace_similarity(a1, a2, 2, 1) == pytest.approx(0.5, abs=1e-12)
    expected = torch.tensor([[0.5, 1.0], [0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(subspace_similarity_grid(a1, a2), expected, atol=1e-12, rtol=0)


def test_phi_with_itself_is_one():
    a = _randn(8, 64, seed=1)
    for i in range(1, 9):
        assert subspace_similarity(a, a, i, i) == pytest.approx(1.0, abs=1e-10)
    # nested subspaces: phi(A, A, i, j) = 1 for every (i, j)
    torch.testing.assert_close(
        subspace_similarity_grid(a, a), torch.ones(8, 8, dtype=torch.float64), atol=1e-10, rtol=0
    )


def test_phi_against_orthogonal_complement_is_zero():
    a1 = _randn(8, 64, seed=2)
    q, _ = torch.linalg.qr(a1.T)  # 64 x 8 basis of A1's row space
    proj_out = torch.eye(64, dtype=torch.float64) - q @ q.T
    a2 = _randn(16, 64, seed=3) @ proj_out  # rows in the orthogonal complement
    grid = subspace_similarity_grid(a1, a2)
    assert grid.shape == (8, 16)
    assert float(grid.abs().max()) < 1e-12
    assert subspace_similarity(a1, a2, 8, 16) < 1e-12


def test_grid_matches_direct_definition_random():
    a1 = _randn(8, 40, seed=4)
    a2 = _randn(16, 40, seed=5)
    grid = subspace_similarity_grid(a1, a2)
    assert grid.shape == (8, 16) and grid.dtype == torch.float64
    for i in range(1, 9):
        u1 = right_singular_subspace(a1, i)
        for j in range(1, 17):
            u2 = right_singular_subspace(a2, j)
            ref = float(torch.linalg.matrix_norm(u1.T @ u2) ** 2) / min(i, j)
            assert grid[i - 1, j - 1].item() == pytest.approx(ref, abs=1e-12)
            assert subspace_similarity(a1, a2, i, j) == pytest.approx(ref, abs=1e-12)
    assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0
    # truncated grid is the top-left block; swapping the arguments transposes it
    torch.testing.assert_close(subspace_similarity_grid(a1, a2, max_i=3, max_j=5), grid[:3, :5])
    torch.testing.assert_close(subspace_similarity_grid(a2, a1), grid.T, atol=1e-12, rtol=0)


def test_invariance_to_scaling_and_row_mixing():
    a = _randn(8, 96, seed=6)
    # scaling keeps every singular vector: phi = 1 for all i = j
    for i in range(1, 9):
        assert subspace_similarity(a, 3.7 * a, i, i) == pytest.approx(1.0, abs=1e-10)
    # A -> M A (invertible M) keeps the row space: phi(A, MA, r, r) = 1
    m = _randn(8, 8, seed=7) + 3 * torch.eye(8, dtype=torch.float64)
    assert abs(float(torch.linalg.det(m))) > 1e-3
    assert subspace_similarity(a, m @ a, 8, 8) == pytest.approx(1.0, abs=1e-10)
    # and mixing does change the individual directions in general (so the test above is not vacuous)
    assert subspace_similarity(a, m @ a, 1, 1) < 0.999
    # dtype does not matter: float32 input gives the same phi (computed in float64)
    assert subspace_similarity(a.float(), (m @ a).float(), 8, 8) == pytest.approx(1.0, abs=1e-5)


def test_random_gaussian_subspaces_share_little():
    k, r = 384, 8
    a1 = torch.randn(r, k, generator=_gen(10))
    a2 = torch.randn(r, k, generator=_gen(11))
    phi = subspace_similarity(a1, a2, r, r)
    assert phi < 0.1  # expectation r/k ~ 0.02
    assert phi > 0.0
    assert float(subspace_similarity_grid(a1, a2).max()) < 0.1


def test_rank_deficient_index_warns():
    a = torch.stack([_e(10, 0), 2 * _e(10, 0), _e(10, 3)])  # rank 2, 3 rows
    with pytest.warns(RuntimeWarning, match="numerical rank 2"):
        subspace_similarity(a, a, 3, 3)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(4, 10), torch.randn(4, 10), 0, 1), r"i=0 is out of range"),
        ((torch.randn(4, 10), torch.randn(4, 10), 5, 1), r"1 <= i <= 4"),
        ((torch.randn(4, 10), torch.randn(6, 10), 1, 7), r"1 <= j <= 6"),
        ((torch.randn(4, 10), torch.randn(4, 10), 1.0, 1), r"i must be an int"),
        ((torch.randn(4, 10), torch.randn(4, 12), 1, 1), r"same number of columns k"),
        ((torch.randn(10), torch.randn(4, 10), 1, 1), r"A1 must be a 2-D matrix"),
        ((torch.randn(4, 10), torch.full((4, 10), float("nan")), 1, 1), r"A2 contains NaN"),
    ],
)
def test_subspace_similarity_invalid_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        subspace_similarity(*args)


def test_grid_and_subspace_invalid_inputs():
    with pytest.raises(ValueError, match=r"1 <= max_i <= 4"):
        subspace_similarity_grid(torch.randn(4, 10), torch.randn(4, 10), max_i=5)
    with pytest.raises(ValueError, match=r"same number of columns k"):
        subspace_similarity_grid(torch.randn(4, 10), torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"1 <= i <= 3"):
        right_singular_subspace(torch.randn(3, 10), 4)


# ---------------------------------------------------------------- plot


def test_plot_writes_png(tmp_path):
    a1 = _randn(8, 64, seed=12)
    a2 = torch.cat([a1[:2], _randn(62, 64, seed=13)])  # r=64 sharing two directions with a1
    grid = subspace_similarity_grid(a1, a2)
    out = plot_subspace_similarity(grid, tmp_path / "sub" / "phi.png", title="A(r=8) vs A(r=64)")
    data = out.read_bytes()
    assert out.exists() and len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    small = plot_subspace_similarity(subspace_similarity_grid(a1, a1), tmp_path / "small.png", "self")
    assert small.stat().st_size > 1000
    with pytest.raises(ValueError, match=r"2-D"):
        plot_subspace_similarity(torch.zeros(3), tmp_path / "bad.png", "bad")


# ---------------------------------------------------------------- §7.3 amplification


def test_amplification_hand_computed_diagonal():
    w = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    s = 7.0
    # ΔW = s e1 e1^T -> U = e1, V = e1 -> ||U^T W V|| = W[0, 0] = 5
    rep = amplification_report(s * torch.outer(_e(5, 0), _e(5, 0)), w, r=1)
    assert rep["proj_delta_w"] == pytest.approx(5.0, abs=1e-12)
    assert rep["delta_w_norm"] == pytest.approx(s, abs=1e-12)
    assert rep["amplification_factor"] == pytest.approx(s / 5.0, abs=1e-12)
    assert rep["proj_w_top_r"] == pytest.approx(5.0, abs=1e-12)
    assert rep["w_norm"] == pytest.approx(math.sqrt(55.0), abs=1e-12)
    # ΔW along W's weakest direction: projection W[4, 4] = 1, amplification s / 1
    rep = amplification_report(s * torch.outer(_e(5, 4), _e(5, 4)), w, r=1)
    assert rep["proj_delta_w"] == pytest.approx(1.0, abs=1e-12)
    assert rep["amplification_factor"] == pytest.approx(s, abs=1e-12)


def test_amplification_hand_computed_rank2_general_w():
    w = _randn(6, 5, seed=20)
    # ΔW = 3 e1 e2^T + 1 e3 e3^T: U = [e1, e3], V = [e2, e3] -> U^T W V = W[[0, 2]][:, [1, 2]]
    dw = 3 * torch.outer(_e(6, 0), _e(5, 1)) + torch.outer(_e(6, 2), _e(5, 2))
    rep = amplification_report(dw, w, r=2)
    expected = float(torch.linalg.matrix_norm(w[[0, 2]][:, [1, 2]]))
    assert rep["proj_delta_w"] == pytest.approx(expected, abs=1e-12)
    assert rep["delta_w_norm"] == pytest.approx(math.sqrt(10.0), abs=1e-12)
    assert rep["proj_delta_w_self"] == pytest.approx(math.sqrt(10.0), abs=1e-12)
    assert (rep["d"], rep["k"], rep["r"]) == (6.0, 5.0, 2.0)


def test_amplification_paper_scenario_weak_direction():
    # W = sum_i sigma_i u_i v_i^T with decaying sigma; ΔW = 10 u_10 v_10^T amplifies a direction W has
    # but does not emphasise (sigma_10 = 0.1): projection 0.1, amplification 100 (cf. 21.5 in Table 7).
    d, k = 40, 30
    u, _ = torch.linalg.qr(_randn(d, k, seed=21))
    v, _ = torch.linalg.qr(_randn(k, k, seed=22))
    sigma = torch.logspace(1, -3, k, dtype=torch.float64)
    sigma[9] = 0.1
    sigma, _ = sigma.sort(descending=True)
    idx = int((sigma == 0.1).nonzero()[0])
    w = u @ torch.diag(sigma) @ v.T
    dw = 10.0 * torch.outer(u[:, idx], v[:, idx])
    rep = amplification_report(dw, w, r=1)
    assert rep["proj_delta_w"] == pytest.approx(0.1, rel=1e-9)
    assert rep["amplification_factor"] == pytest.approx(100.0, rel=1e-9)
    assert rep["proj_w_top_r"] == pytest.approx(float(sigma[0]), rel=1e-12)


def test_top_r_projection_dominates():
    w = _randn(48, 32, seed=23)
    s_w = torch.linalg.svdvals(w)
    for r, seed in [(1, 24), (4, 25), (8, 26)]:
        dw = _randn(48, r, seed=seed) @ _randn(r, 32, seed=seed + 100)
        rep = amplification_report(dw, w, r=r)
        assert rep["proj_w_top_r"] == pytest.approx(float(s_w[:r].pow(2).sum().sqrt()), rel=1e-12)
        assert rep["proj_w_top_r"] >= rep["proj_delta_w"]
        assert rep["proj_w_top_r"] >= rep["proj_random"]
        assert rep["proj_w_top_r"] <= rep["w_norm"] + 1e-12
        assert rep["amplification_factor"] == pytest.approx(rep["delta_w_norm"] / rep["proj_delta_w"])


def test_random_projection_scale_and_seeding():
    d, k, r = 96, 64, 4
    # a non-isotropic W (strong top direction) — the expectation ||W||_F^2 r^2/(d k) holds for any W
    w = _randn(d, k, seed=30) + 20.0 * torch.outer(_randn(d, seed=31), _randn(k, seed=32)) / math.sqrt(d * k)
    dw = _randn(d, r, seed=33) @ _randn(r, k, seed=34)
    rep = amplification_report(dw, w, r=r, generator=_gen(0), random_trials=200)
    expected = rep["w_norm"] * r / math.sqrt(d * k)
    assert 0.6 * expected < rep["proj_random"] < 1.05 * expected  # E||.|| <= sqrt(E||.||^2) = expected
    assert rep["proj_random"] < rep["proj_w_top_r"] / 5
    # seeded: same generator seed -> same number, default (None) is deterministic too
    a = amplification_report(dw, w, r=r, generator=_gen(5))["proj_random"]
    b = amplification_report(dw, w, r=r, generator=_gen(5))["proj_random"]
    c = amplification_report(dw, w, r=r, generator=_gen(6))["proj_random"]
    assert a == b and a != c
    assert amplification_report(dw, w, r=r)["proj_random"] == amplification_report(dw, w, r=r)["proj_random"]


def test_amplification_zero_projection_is_inf():
    w = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    dw = torch.outer(_e(3, 2), _e(3, 2))
    assert amplification_report(dw, w, r=1)["amplification_factor"] == math.inf


@pytest.mark.parametrize(
    "dw, w, r, match",
    [
        (torch.randn(5, 4), torch.randn(4, 5), 1, r"same shape"),
        (torch.randn(5, 4), torch.randn(5, 4), 0, r"r=0 is out of range"),
        (torch.randn(5, 4), torch.randn(5, 4), 5, r"1 <= r <= 4"),
        (torch.zeros(5, 4), torch.randn(5, 4), 1, r"all zeros.*B = 0"),
        (torch.randn(5, 4), torch.full((5, 4), float("inf")), 1, r"w contains NaN or Inf"),
        (torch.randn(20), torch.randn(5, 4), 1, r"delta_w must be a 2-D matrix"),
    ],
)
def test_amplification_invalid_inputs(dw, w, r, match):
    with pytest.raises(ValueError, match=match):
        amplification_report(dw, w, r)


def test_amplification_warns_when_r_exceeds_delta_rank():
    dw = torch.outer(_randn(8, seed=40), _randn(6, seed=41))
    with pytest.warns(RuntimeWarning, match="numerical rank 1"):
        amplification_report(dw, _randn(8, 6, seed=42), r=3)


# ---------------------------------------------------------------- delta_weight


def test_delta_weight_formula_and_dtype():
    a = torch.randn(4, 10, generator=_gen(50))  # r x d_in
    b = torch.randn(7, 4, generator=_gen(51))  # d_out x r
    dw = delta_weight(a, b, 2.5)
    assert dw.shape == (7, 10) and dw.dtype == torch.float32
    torch.testing.assert_close(dw, 2.5 * (b @ a))
    dw64 = delta_weight(a.half(), b.half(), 0.5, dtype=torch.float64)
    assert dw64.dtype == torch.float64
    torch.testing.assert_close(dw64, 0.5 * (b.half().double() @ a.half().double()))
    # parameters with grad are detached
    p = torch.nn.Parameter(a.clone())
    assert not delta_weight(p, b, 1.0).requires_grad
    # rank of ΔW is at most r, and it feeds amplification_report directly
    rep = amplification_report(dw, torch.randn(7, 10, generator=_gen(52)), r=4)
    assert rep["proj_delta_w_self"] == pytest.approx(rep["delta_w_norm"], rel=1e-6)


def test_delta_weight_invalid_inputs():
    a = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"rank mismatch"):
        delta_weight(a, torch.randn(7, 3), 1.0)
    with pytest.raises(ValueError, match=r"rank mismatch"):
        delta_weight(torch.randn(7, 4), a, 1.0)  # swapped arguments
    with pytest.raises(ValueError, match=r"2-D"):
        delta_weight(torch.randn(4), torch.randn(7, 4), 1.0)
    with pytest.raises(ValueError, match=r"float32 or torch.float64"):
        delta_weight(a, torch.randn(7, 4), 1.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"scaling must be a finite number"):
        delta_weight(a, torch.randn(7, 4), float("nan"))


def test_shared_top_direction_line_counts_matrices_above_the_threshold_and_reads_the_init():
    from experiments.subspace import shared_top_direction_lines

    cells = [("Wq 0", 0.7, 0.01), ("Wq 1", 0.5, 0.002), ("Wv 0", 0.9, 0.003), ("Wv 1", 0.1, 0.0)]
    (line,) = shared_top_direction_lines(cells, "r=8 vs r=64", "paper")
    assert "in 2 of 4 matrices (Wq 0, Wv 0)" in line  # 0.5 is not above 0.5
    assert "median 0.60" in line and "at most 0.010, so what is shared was made by training" in line
    (line,) = shared_top_direction_lines([("Wq 0", 0.7, 0.69)], "x", "paper")
    assert "already reaches 0.690" in line
    (line,) = shared_top_direction_lines([("Wq 0", 0.2, None)], "x", "paper")
    assert "in 0 of 1 matrices (none)" in line and "not reproducible" in line
