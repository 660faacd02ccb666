import pytest
import torch

from ipgo.tokens import PromptTokens, TokenConfig, TokenSets, rotate, side_tokens


def test_rotation_gets_gradient_and_changes_tokens():
    sets = TokenSets(TokenConfig(n_prefix=3, n_suffix=2, rank=4, rotation_angles=2), dim=16)
    before, _ = sets([0])
    with torch.no_grad():
        sets.sets[0].prefix.angles.fill_(0.3)
    after, suffix = sets([0])
    assert not torch.allclose(before, after)
    (after.sum() + suffix.sum()).backward()
    assert sets.sets[0].prefix.angles.grad.abs().sum() > 0
    # a rotation turns tokens, it never changes their norm
    assert torch.allclose(before.norm(dim=-1), after.norm(dim=-1), atol=1e-5)


def givens(dim: int, phi: float, odd: bool) -> torch.Tensor:
    """G_k of the module docstring as a matrix: every pair (2j, 2j+1), or (2j+1, 2j+2 mod D), turned by phi."""
    g = torch.eye(dim, dtype=torch.float64)
    c, s = torch.cos(torch.tensor(phi, dtype=torch.float64)), torch.sin(torch.tensor(phi, dtype=torch.float64))
    for j in range(dim // 2):
        a, b = (2 * j + 1, (2 * j + 2) % dim) if odd else (2 * j, 2 * j + 1)
        g[a, a], g[a, b], g[b, a], g[b, b] = c, -s, s, c
    return g


def rotated_by_hand(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Each row of x (n, D) times its own R(theta_i) = G_{a-1}(theta_{i,a-1}) ... G_0(theta_{i,0})."""
    rows = []
    for row, thetas in zip(x.double(), angles.tolist()):
        r = torch.eye(x.shape[-1], dtype=torch.float64)
        for k, phi in enumerate(thetas):
            r = givens(x.shape[-1], phi, odd=k % 2 == 1) @ r
        rows.append(r @ row)
    return torch.stack(rows)


def test_rotation_is_orthogonal_and_mixes_all_pairs():
    x = torch.randn(5, 8)
    angles = torch.rand(5, 3) * 6 - 3  # every token its own angles
    y = rotate(x, angles)
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), atol=1e-5)
    torch.testing.assert_close(y.double(), rotated_by_hand(x, angles), atol=1e-5, rtol=0)
    # batched over sets: (G, n, D) with (G, n, a)
    torch.testing.assert_close(rotate(x.view(1, 5, 8), angles.view(1, 5, 3))[0], y)
    # the odd pairing couples coordinates 1 and 2, which the even pairing keeps apart
    e1 = torch.zeros(1, 8)
    e1[0, 1] = 1
    assert rotate(e1, torch.tensor([[0.0, 0.5]]))[0, 2].abs() > 0.1
    with pytest.raises(ValueError, match="even"):
        rotate(torch.randn(2, 7), torch.zeros(2, 1))


def test_basis_orthonormal_and_coefficients_bounded_after_many_steps():
    config = TokenConfig(n_prefix=4, n_suffix=4, rank=6, bound=0.5)
    sets = TokenSets(config, dim=12, num_sets=2)
    opt = torch.optim.Adam(sets.parameters(), lr=0.2)
    target = torch.randn(2, 4, 12) * 10  # far outside the reachable range: pushes against the bound
    for _ in range(200):
        prefix, suffix = sets([0, 1])
        loss = ((prefix - target) ** 2).sum() + ((suffix + target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sets.project_()
        # the parameters themselves, not the list project_ clamps: every set and side stays in the bound
        assert all(side.coeffs.abs().max() <= 0.5 + 1e-7 for s in sets.sets for side in (s.prefix, s.suffix))
    assert len(sets.coefficients()) == 4  # 2 sets x (prefix, suffix)
    for s in sets.sets:
        from ipgo.tokens import orthonormal_basis

        e = orthonormal_basis(s.prefix.basis)
        assert torch.allclose(e.T @ e, torch.eye(6), atol=1e-5)
    assert any((p.abs() == 0.5).any() for p in sets.coefficients())  # some sit on the bound


def test_coefficient_comes_back_from_the_bound():
    sets = TokenSets(TokenConfig(n_prefix=1, n_suffix=0, rank=2, bound=1.0, rotation_angles=0), dim=4)
    side = sets.sets[0].prefix
    opt = torch.optim.Adam(sets.parameters(), lr=0.1)
    for sign in (1.0, -1.0):  # first drive z to +b, then ask for the opposite direction
        for _ in range(60):
            z = side.coeffs
            loss = -(sign * z).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sets.project_()
        assert torch.allclose(side.coeffs, torch.full_like(side.coeffs, sign))


def test_sets_are_independent_and_seeded():
    config = TokenConfig(n_prefix=2, n_suffix=1, rank=3)
    sets = TokenSets(config, dim=8, num_sets=3)
    p, s = sets([2, 0, 2])
    assert p.shape == (3, 2, 8) and s.shape == (3, 1, 8)
    assert torch.equal(p[0], p[2]) and not torch.equal(p[0], p[1])
    (p[1].sum()).backward()  # only set 0 was used by row 1
    assert sets.sets[0].prefix.coeffs.grad is not None
    assert sets.sets[1].prefix.coeffs.grad is None  # not in the call
    grad = sets.sets[2].prefix.coeffs.grad  # in the call (rows 0 and 2), not in row 1: no gradient from it
    assert grad is None or not grad.any()
    # set k has the same init as a one-set run seeded with seed + k
    alone = TokenSets(TokenConfig(n_prefix=2, n_suffix=1, rank=3, seed=2), dim=8)
    assert torch.equal(alone([0])[0][0], p[0])


def test_zero_length_side_and_notebook_preset():
    sets = TokenSets(TokenConfig(n_prefix=0, n_suffix=3, rank=2), dim=8)
    p, s = sets([0, 0])
    assert p.shape == (2, 0, 8) and s.shape == (2, 3, 8)
    nb = TokenConfig.notebook()
    tokens = PromptTokens(nb, dim=768)
    assert tokens.prefix.basis.shape == (768, 300) and tokens.prefix.bias is not None
    assert tokens.prefix.angles is None  # no rotation: no angles
    # the published notebook: ~0.47 M trainable parameters
    assert 460_000 < sum(p.numel() for p in tokens.parameters()) < 480_000
    with pytest.raises(ValueError, match="rank"):
        TokenSets(TokenConfig(rank=40), dim=32)
    with pytest.raises(ValueError, match="nothing to learn"):
        TokenConfig(n_prefix=0, n_suffix=0)
    with pytest.raises(ValueError, match=r"init_scale must be in \[0, 1\].*outside the bound"):
        TokenConfig(init_scale=1.5)


def test_per_set_clipping_is_per_set():
    sets = TokenSets(TokenConfig(n_prefix=1, n_suffix=1, rank=2), dim=4, num_sets=2)
    p, s = sets([0, 1])
    (100 * p[0].sum() + 0.001 * p[1].sum()).backward()
    small = [q.grad.clone() for q in sets.sets[1].parameters() if q.grad is not None]
    norms = sets.clip_grad_norm_per_set_(1.0)
    assert norms[0] > 1 and norms[1] < 1
    big_after = torch.stack([q.grad.norm() for q in sets.sets[0].parameters() if q.grad is not None]).norm()
    assert abs(float(big_after) - 1.0) < 1e-4
    for before, q in zip(small, [q for q in sets.sets[1].parameters() if q.grad is not None]):
        assert torch.equal(before, q.grad)  # the small one is untouched


def gram_schmidt(w: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning w (D, m), each column the next one of w with the earlier directions taken out:
    the Q of the QR factorisation whose R has a positive diagonal, computed without QR."""
    columns = []
    for v in w.double().T:
        for q in columns:
            v = v - (q @ v) * q
        columns.append(v / v.norm())
    return torch.stack(columns, dim=1)


def test_side_tokens_matches_formula():
    from ipgo.tokens import orthonormal_basis

    g = torch.Generator().manual_seed(0)
    basis, coeffs = torch.randn(1, 6, 3, generator=g), torch.rand(1, 2, 3, generator=g)
    bias, angles = torch.randn(1, 6, generator=g), torch.rand(1, 2, 2, generator=g) * 6 - 3
    e = gram_schmidt(basis[0])
    torch.testing.assert_close(orthonormal_basis(basis)[0].double(), e, atol=1e-5, rtol=0)
    # token_i = R(theta_i) E z_i + c: rotated first, then the bias (which is not rotated)
    expected = rotated_by_hand(coeffs[0].double() @ e.T, angles[0]) + bias[0].double()
    torch.testing.assert_close(side_tokens(basis, coeffs, angles, bias)[0].double(), expected, atol=1e-5, rtol=0)
    # E is continuous in W: a tiny change of W moves it a little (QR alone may flip a column's sign)
    for delta in (1e-4, -1e-4):
        moved = basis.clone()
        moved[0, 0, 0] += delta
        assert (orthonormal_basis(moved) - orthonormal_basis(basis)).abs().max() < 1e-2


@pytest.mark.parametrize("config", [TokenConfig(n_prefix=0, n_suffix=3, rank=2),
                                    TokenConfig(n_prefix=3, n_suffix=0, rank=2, rotation_angles=0, bias=True)])
def test_every_parameter_shapes_the_tokens(config):
    """Multi-device training (DDP) fails on a parameter that never gets a gradient: an empty side has none,
    an unrotated side no angles."""
    sets = TokenSets(config, dim=8)
    prefix, suffix = sets([0])
    (prefix.sum() + suffix.sum()).backward()
    for name, parameter in sets.named_parameters():
        assert parameter.grad is not None, name
    assert len(sets.coefficients()) == 1

