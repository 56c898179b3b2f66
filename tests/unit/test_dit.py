"""DiT: layout semantics, any-grid weights, conditioning, presets, and that it can learn."""

import pytest
import torch

from actors.workers.parallelize import apply_ac
from models.dit import (
    ATTENTION_MODES,
    LAYOUTS,
    PRESETS,
    Attention,
    DiTBlock,
    DiTConfig,
    SelfAttention,
    build_dit,
    dit_config,
    sincos_3d,
)
from models.patching import PatchGrid

C = 2


def opened(layout: str, **overrides) -> torch.nn.Module:
    """A debug DiT whose zero-initialised layers (adaLN-Zero gates, output) are randomised.

    Fresh, the model outputs exactly zero whatever the input, so a test of what influences
    what could never fail; opening the gates makes every path carry signal.
    """
    torch.manual_seed(0)
    model = build_dit("debug", layout=layout, in_channels=C, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.2)
    return model


def run(model, x, text=None):
    torch.manual_seed(1)
    text = torch.randn(x.shape[0], 3, 64) if text is None else text
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), 0.5), text=text, fps=torch.tensor([24.0]))


def influence(layout: str, frame: int, hw: tuple[int, int]) -> torch.Tensor:
    """|output change| per (frame, patch row, patch col) when one tubelet of the input changes.

    Latents (1, C, T=4, H=4, W=4) with patch (1, 2, 2): a 4 x 2 x 2 token grid.
    """
    model = opened(layout)
    x = torch.randn(1, C, 4, 4, 4)
    x2 = x.clone()
    h, w = hw
    x2[:, :, frame, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2] += torch.randn(C, 2, 2)
    diff = (run(model, x2) - run(model, x)).abs()  # (1, C, T, H, W)
    return diff.reshape(C, 4, 2, 2, 2, 2).amax(dim=(0, 3, 5))  # (T, nh, nw)


def test_spatial_layout_keeps_frames_apart():
    d = influence("spatial", frame=1, hw=(0, 0))
    others = torch.cat([d[:1], d[2:]])
    assert others.max() == 0, "a change in frame 1 leaked into other frames"
    assert d[1, 1, 1] > 1e-4, "spatial attention should mix positions within the frame"


def test_temporal_layout_keeps_positions_apart():
    d = influence("temporal", frame=1, hw=(0, 0))
    mask = torch.ones_like(d, dtype=torch.bool)
    mask[:, 0, 0] = False
    assert d[mask].max() == 0, "a change at position (0, 0) leaked into other positions"
    assert d[3, 0, 0] > 1e-4, "temporal attention should mix frames at one position"


@pytest.mark.parametrize("layout", ["full3d", "factorized", "interleaved"])
def test_mixing_layouts_cross_frames_and_positions(layout):
    d = influence(layout, frame=0, hw=(0, 0))
    assert d[3, 1, 1] > 1e-4, f"{layout}: frame 0, position (0, 0) never reached frame 3, (1, 1)"


def test_block_modes_per_layout():
    modes = {lay: dit_config("debug", layout=lay, depth=4).block_modes() for lay in LAYOUTS}
    assert modes["spatial"] == [("spatial",)] * 4
    assert modes["temporal"] == [("temporal",)] * 4
    assert modes["full3d"] == [("full",)] * 4
    assert modes["factorized"] == [("spatial", "temporal")] * 4
    assert modes["interleaved"] == [("spatial",), ("temporal",)] * 2
    # Latte: the text enters through the spatial blocks; its temporal blocks do not attend to it
    assert dit_config("debug", layout="interleaved", depth=4).block_cross_attends() == [
        True, False, True, False]
    assert dit_config("debug", layout="temporal", depth=2).block_cross_attends() == [True, True]
    blocks = build_dit("debug", layout="interleaved", depth=4).blocks
    assert [b.cross_attn is not None for b in blocks] == [True, False, True, False]


def test_attention_modes_group_tokens_into_their_problems():
    """Token ids on a 3-frame x 4-position grid: each problem holds exactly its mode's unit
    (all tokens, one frame, one position across frames), and `ungroup` undoes `group`."""
    nt, S = 3, 4
    ids = torch.arange(nt * S).reshape(1, nt * S, 1).expand(2, -1, 1)  # (B=2, N, 1)
    frames = [list(range(f * S, (f + 1) * S)) for f in range(nt)]
    positions = [list(range(p, nt * S, S)) for p in range(S)]
    expected = {"full": [list(range(nt * S))], "spatial": frames, "temporal": positions}
    assert set(ATTENTION_MODES) == set(expected)
    for name, mode in ATTENTION_MODES.items():
        grouped = mode.group(ids, nt)  # (B', S', 1)
        assert grouped[: len(expected[name]), :, 0].tolist() == expected[name], name
        assert torch.equal(mode.ungroup(grouped, 2, nt), ids), name


def test_unknown_attention_mode_and_layout_name_themselves():
    """No silent fallthrough: a typo is an error naming it and the known names."""
    known_modes = r"known: full, spatial, temporal"
    with pytest.raises(ValueError, match=rf"unknown attention mode 'diagonal'; {known_modes}"):
        SelfAttention(64, 4, True, "diagonal")
    with pytest.raises(ValueError, match=rf"unknown attention mode 'ful'; {known_modes}"):
        DiTBlock(64, 4, 4.0, ("spatial", "ful"), True)
    known_layouts = "known: spatial, temporal, full3d, factorized, interleaved"
    for call in (DiTConfig(layout="full3D").block_modes, DiTConfig(layout="full3D").validate,
                 lambda: build_dit("debug", layout="full3D")):
        with pytest.raises(ValueError, match=rf"unknown layout 'full3D'; {known_layouts}"):
            call()


@pytest.mark.parametrize("layout", ["full3d", "factorized"])
def test_one_model_runs_on_any_aspect_ratio_and_length(layout):
    model = opened(layout)
    # 16:9, 9:16, 1:1, and sizes that are not multiples of the patch; 1 to 5 latent frames.
    for shape in [(2, 18, 32), (3, 32, 18), (5, 16, 16), (1, 9, 11)]:
        x = torch.randn(1, C, *shape)
        y = run(model, x)
        assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().max() > 0


def test_absolute_positions_add_no_weights_and_tell_every_position_apart():
    """`pos_embed: sincos` adds fixed embeddings (no parameter: a model without it loads the
    same state dict, old exports unchanged) that differ for every (t, h, w) of a grid."""
    plain, absolute = opened("full3d"), opened("full3d", pos_embed="sincos")
    assert plain.state_dict().keys() == absolute.state_dict().keys()
    x = torch.randn(1, C, 3, 8, 8)
    assert (run(plain, x) - run(absolute, x)).abs().max() > 1e-3
    positions = PatchGrid((5, 9, 11), (1, 1, 1)).positions()
    emb = sincos_3d(positions, 96)  # (N, 96)
    assert emb.shape == (5 * 9 * 11, 96)
    assert torch.cdist(emb, emb).add(torch.eye(len(emb)) * 1e3).min() > 0.1  # all distinct
    with pytest.raises(ValueError, match="pos_embed"):
        DiTConfig(pos_embed="learned").validate()


def test_fresh_model_predicts_zero():
    model = build_dit("debug", in_channels=C).eval()
    assert run(model, torch.randn(2, C, 2, 4, 4)).abs().max() == 0  # adaLN-Zero


@pytest.mark.parametrize("pooled_text", [False, True])
def test_null_text_is_what_dropped_text_sees(pooled_text):
    model = opened("full3d", pooled_text=pooled_text)
    x, text = torch.randn(2, C, 2, 4, 4), torch.randn(2, 5, 64)
    t = torch.full((2,), 0.3)
    with torch.no_grad():
        uncond = model(x, t)
        dropped = model(x, t, text=text, drop_text=torch.tensor([True, True]))
        cond = model(x, t, text=text)
    torch.testing.assert_close(dropped, uncond)
    assert (cond - uncond).abs().max() > 1e-4


@pytest.mark.parametrize("pooled_text", [False, True])
def test_text_mask_hides_padding(pooled_text):
    model = opened("full3d", pooled_text=pooled_text)
    x, text = torch.randn(1, C, 2, 4, 4), torch.randn(1, 6, 64)
    mask = torch.tensor([[True, True, True, False, False, False]])
    t = torch.full((1,), 0.3)
    with torch.no_grad():
        padded = model(x, t, text=text, text_mask=mask)
        trimmed = model(x, t, text=text[:, :3])
        garbage = model(x, t, text=torch.cat([text[:, :3], 100 * text[:, 3:]], 1), text_mask=mask)
    torch.testing.assert_close(padded, trimmed)
    torch.testing.assert_close(padded, garbage)


def test_pooled_text_conditions_through_adaln():
    """With cross-attention closed, captions still steer the output through the pooled
    embedding (pooled_text) and not at all without it."""
    x, t = torch.randn(2, C, 2, 4, 4), torch.full((2,), 0.3)
    text = torch.randn(1, 5, 64).expand(2, -1, -1).clone()
    text[1] += torch.randn(5, 64)
    for pooled in (False, True):
        model = opened("full3d", pooled_text=pooled)
        with torch.no_grad():
            for block in model.blocks:
                block.cross_attn.proj.weight.zero_()
                block.cross_attn.proj.bias.zero_()
            out = model(x[:1].expand(2, -1, -1, -1, -1), t, text=text)
        gap = (out[0] - out[1]).abs().max()
        assert (gap > 1e-3) if pooled else (gap == 0), (pooled, gap)


def test_fps_conditions_the_output():
    model = opened("full3d")
    x, t = torch.randn(1, C, 2, 4, 4), torch.full((1,), 0.3)
    with torch.no_grad():
        a, b = model(x, t, fps=torch.tensor([8.0])), model(x, t, fps=torch.tensor([30.0]))
    assert (a - b).abs().max() > 1e-4


def test_activation_checkpointing_gives_the_same_gradients():
    """Applied from outside (parallelize's `apply_ac`): the blocks really recompute in
    backward, the gradients are those of the plain model and the parameter names are too."""
    grads, names, calls = [], [], []
    for ckpt in (False, True):
        model = opened("factorized", text_dropout=0.0).train()
        if ckpt:
            apply_ac(model.blocks)
        forwards: list[int] = []
        model.blocks[0].mlp.register_forward_hook(lambda *_, f=forwards: f.append(1))
        x = torch.randn(1, C, 2, 4, 4, generator=torch.Generator().manual_seed(0))
        text = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(1))
        y = model(x, torch.full((1,), 0.5), text=text, fps=torch.tensor([24.0]), drop_text=None)
        y.square().sum().backward()
        # (the null text gets no gradient: nothing is dropped)
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
        names.append(list(model.state_dict()))
        calls.append(len(forwards))
    assert calls == [1, 2]  # checkpointed: the block ran again in backward
    assert names[0] == names[1]  # checkpoints and exports load with or without it
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # no_grad (sampling): a plain forward, nothing recomputed
        model(x, torch.full((1,), 0.5), text=text)
    assert len(forwards) == 3


def test_attention_is_one_module_for_every_layout():
    """The one place that calls SDPA: swapping it changes every self- and cross-attention."""
    for layout in ("full3d", "factorized", "interleaved"):
        model = opened(layout)
        seen = []
        for m in model.modules():
            if isinstance(m, Attention):
                m.register_forward_hook(lambda mod, args, out, s=seen: s.append(args[0].shape))
        x = torch.randn(1, C, 2, 4, 4)
        run(model, x)
        n_self = sum(len(b.attn) for b in model.blocks)
        n_cross = sum(b.cross_attn is not None for b in model.blocks)
        assert len(seen) == n_self + n_cross, layout


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="layout"):
        build_dit("debug", layout="diagonal")
    with pytest.raises(ValueError, match="heads"):
        build_dit("debug", heads=5)
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        build_dit("debug", widht=64)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        build_dit("XXL")
    assert DiTConfig(patch=[1, 2, 2]).patch == (1, 2, 2)  # YAML lists become tuples


def test_preset_sizes_grow():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):  # count without allocating XL
            counts[name] = sum(p.numel() for p in build_dit(name).parameters())
    assert list(counts.values()) == sorted(counts.values())
    assert 500e6 < counts["XL"] < 1000e6, counts  # DiT-XL is 675M; video adds cross-attention
