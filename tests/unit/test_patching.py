"""3D patching: round trip, token order vs positions, padding rule, 3D RoPE relativity."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.patching import PatchGrid, patchify, unpatchify
from models.rope import apply_rope, rope_dims, rope_freqs

dims = st.integers(1, 7)
patches = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 2), c=st.integers(1, 3), t=dims, h=dims, w=dims, patch=patches)
def test_roundtrip_any_shape(b, c, t, h, w, patch):
    x = torch.randn(b, c, t, h, w)
    tokens, grid = patchify(x, patch)
    nt, nh, nw = grid.shape
    pt, ph, pw = patch
    assert nt * pt >= t > (nt - 1) * pt  # ceil: padding is less than one patch
    assert tokens.shape == (b, nt * nh * nw, pt * ph * pw * c)
    assert torch.equal(unpatchify(tokens, grid), x)


@settings(max_examples=30, deadline=None)
@given(t=dims, h=dims, w=dims, patch=patches)
def test_token_n_holds_the_cells_at_its_position(t, h, w, patch):
    x = torch.randn(1, 2, t, h, w)
    tokens, grid = patchify(x, patch)
    pos = grid.positions()
    assert pos.shape == (grid.num_tokens, 3)
    n = torch.randint(grid.num_tokens, ()).item()
    (ti, hi, wi), (pt, ph, pw) = pos[n].tolist(), patch
    cells = x[0, :, ti * pt : (ti + 1) * pt, hi * ph : (hi + 1) * ph, wi * pw : (wi + 1) * pw]
    # Real cells of the tubelet appear in the token; the rest of the token is zero padding.
    token = tokens[0, n].reshape(pt, ph, pw, 2).permute(3, 0, 1, 2)  # (C, pt, ph, pw)
    ct, ch, cw = cells.shape[1:]
    assert torch.equal(token[:, :ct, :ch, :cw], cells)
    torch.testing.assert_close(token.abs().sum(), cells.abs().sum())


def test_positions_are_row_major_t_h_w():
    grid = PatchGrid(size=(3, 4, 6), patch=(1, 2, 2))
    assert grid.shape == (3, 2, 3) and grid.tokens_per_frame == 6
    pos = grid.positions()
    assert pos[:4].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]
    assert pos[-1].tolist() == [2, 1, 2]


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        patchify(torch.zeros(2, 3, 4, 4), (1, 2, 2))
    with pytest.raises(ValueError, match="patch"):
        patchify(torch.zeros(1, 1, 2, 4, 4), (0, 2, 2))
    tokens, grid = patchify(torch.zeros(1, 1, 2, 4, 4), (1, 2, 2))
    with pytest.raises(ValueError, match="do not fit grid"):
        unpatchify(tokens[:, :-1], grid)


def test_rope_dims_cover_the_head():
    for head_dim in (16, 64, 72, 128):
        dt, dh, dw = rope_dims(head_dim)
        assert dt + dh + dw == head_dim and dt % 2 == dh % 2 == dw % 2 == 0 and min(dt, dh, dw) > 0


def test_rope_scores_depend_only_on_relative_position():
    # The property that lets one set of weights run on any grid: q.k after RoPE is unchanged
    # when both tokens move by the same (dt, dh, dw).
    q, k = torch.randn(1, 1, 1, 48), torch.randn(1, 1, 1, 48)
    pos = torch.tensor([[0, 1, 2], [3, 0, 5]])
    for shift in ([0, 0, 0], [4, 7, 1], [10, 0, 33]):
        freqs = rope_freqs(pos + torch.tensor(shift), 48)
        qr = apply_rope(q.expand(1, 2, 1, 48), freqs)[0, 0, 0]
        kr = apply_rope(k.expand(1, 2, 1, 48), freqs)[0, 1, 0]
        if shift == [0, 0, 0]:
            ref = qr @ kr
        torch.testing.assert_close(qr @ kr, ref, rtol=1e-5, atol=1e-5)


def test_rope_rotates_each_channel_pair_by_its_angle():
    # The complex-multiply form against the rotation written out: pair j of head channels at
    # position p turns by p_axis * theta^(-2i/dim_axis) for that pair's axis group.
    head_dim, pos = 12, torch.tensor([[0, 0, 0], [1, 2, 3], [7, 5, 11]])
    x = torch.randn(2, 3, 4, head_dim)
    dt, dh, dw = rope_dims(head_dim)
    angles = torch.cat([pos[:, axis, None].double() * 10000.0 ** (-torch.arange(0, d, 2) / d)
                        for axis, d in enumerate((dt, dh, dw))], dim=-1)  # (3, head_dim // 2)
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    want = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rope(x, rope_freqs(pos, head_dim)), want)
    assert torch.equal(apply_rope(x, rope_freqs(torch.zeros_like(pos), head_dim)), x)


def test_rope_compile_form_equals_the_eager_form(monkeypatch):
    # Under torch.compile apply_rope takes the real cos/sin form (Inductor has no complex
    # codegen); both forms must rotate identically, gradients included.
    pos = torch.tensor([[0, 0, 0], [1, 2, 3], [7, 5, 11], [2, 9, 4]])
    freqs = rope_freqs(pos, 12)
    x = torch.randn(2, 4, 3, 12, requires_grad=True)
    eager = apply_rope(x, freqs)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled = apply_rope(x, freqs)
    (g_compiled,) = torch.autograd.grad(compiled.square().sum(), x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)
