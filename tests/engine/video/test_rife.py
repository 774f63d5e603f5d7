"""RIFE frame interpolation: a full-size RIFE 4.7-architecture IFNet with random weights, saved in the real
checkpoints' key layout, loaded through the real loader and run through the Interpolate Frames node.

The expected key layout below is written out from the published architecture, not taken from our module:
ComfyUI-Frame-Interpolation's ``vfi_models/rife/rife_arch.py`` (``IFNet(arch_ver="4.7")``, into which that pack
loads ``rife47.pth`` and ``rife49.pth`` with ``load_state_dict`` strict) and Practical-RIFE 4.7's
``train_log/IFNet_HDv3.py`` (saved as ``flownet.pkl`` with ``module.`` prefixes): 124 tensors.
"""

import pytest
import torch
from safetensors.torch import save_file

from cf_testing.comfyui import run_node
from charforge import bridge
from charforge.engine.control import Cancelled, Control
from charforge.engine.video import interpolated_count, rife
from charforge.nodes import video as video_nodes
from charforge.nodes.video import InterpolateFrames


def expected_layout() -> dict[str, tuple[int, ...]]:
    keys = {
        "encode.0.weight": (16, 3, 3, 3),
        "encode.0.bias": (16,),
        "encode.1.weight": (16, 4, 4, 4),
        "encode.1.bias": (4,),  # ConvTranspose2d: (in, out, k, k)
    }
    for i, (c, cin) in enumerate(((192, 15), (128, 20), (96, 20), (64, 20))):
        keys[f"block{i}.conv0.0.0.weight"] = (c // 2, cin, 3, 3)
        keys[f"block{i}.conv0.0.0.bias"] = (c // 2,)
        keys[f"block{i}.conv0.1.0.weight"] = (c, c // 2, 3, 3)
        keys[f"block{i}.conv0.1.0.bias"] = (c,)
        for r in range(8):
            keys[f"block{i}.convblock.{r}.conv.weight"] = (c, c, 3, 3)
            keys[f"block{i}.convblock.{r}.conv.bias"] = (c,)
            keys[f"block{i}.convblock.{r}.beta"] = (1, c, 1, 1)
        keys[f"block{i}.lastconv.0.weight"] = (c, 24, 4, 4)
        keys[f"block{i}.lastconv.0.bias"] = (24,)
    return keys


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(7)
    model = rife.IFNet()
    with torch.no_grad():  # non-trivial betas, so a swapped or missing beta would change results
        for name, p in model.named_parameters():
            if name.endswith("beta"):
                p.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(state, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rife")
    plain = folder / "rife49.pth"  # ComfyUI-Frame-Interpolation's files: bare keys
    torch.save(state, plain)
    flownet = folder / "flownet.pkl"  # Practical-RIFE's train_log: DataParallel "module." prefixes
    torch.save({f"module.{k}": v for k, v in state.items()}, flownet)
    sft = folder / "rife47.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(sft))
    return {"plain": plain, "flownet": flownet, "sft": sft}


@pytest.fixture
def frames():
    torch.manual_seed(3)
    return torch.rand(3, 64, 64, 3)


def test_key_layout_matches_the_real_checkpoints(state):
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_layout()
    assert 5_000_000 < sum(v.numel() for v in state.values()) < 6_000_000


@pytest.mark.parametrize("kind", ["plain", "flownet", "sft"])
def test_loader_reads_every_layout(files, state, kind):
    loaded = rife.load_rife(files[kind], device="cpu")
    assert loaded.version == "4.7" and loaded.dtype == torch.float32
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("multiplier", [2, 4])
def test_interpolation_keeps_originals_in_place(files, frames, multiplier):
    loaded = rife.load_rife(files["plain"], device="cpu")
    out = rife.interpolate_rife(frames, loaded, multiplier)
    assert (
        out.shape == (interpolated_count(3, multiplier), 64, 64, 3) == ((3 - 1) * multiplier + 1, 64, 64, 3)
    )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    for i in range(3):
        assert torch.equal(out[i * multiplier], frames[i])
    for j in range(len(out)):
        if j % multiplier:  # in-betweens are new frames
            assert not any(torch.allclose(out[j], f, atol=1e-3) for f in frames)
    if multiplier == 4:  # different timesteps give different frames
        assert not torch.allclose(out[1], out[3], atol=1e-4)


def test_zero_flow_network_blends_neighbours_and_crops(state, frames):
    """Zeroed flow heads: no motion, mask logit 0 -> every in-between is the mean of its neighbours."""
    model = rife.IFNet()
    model.load_state_dict(state)
    with torch.no_grad():
        for block in (model.block0, model.block1, model.block2, model.block3):
            block.lastconv[0].weight.zero_()
            block.lastconv[0].bias.zero_()
    loaded = rife.LoadedRIFE(model.eval(), "4.7", "zero", torch.device("cpu"), torch.float32)
    odd = frames[:, :40, :56]  # padded to 64 x 64 inside, cropped back
    out = rife.interpolate_rife(odd, loaded, 2, loop=True)
    assert out.shape == (6, 40, 56, 3)
    torch.testing.assert_close(out[1], (odd[0] + odd[1]) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[5], (odd[2] + odd[0]) / 2, atol=1e-5, rtol=0)  # loop: last -> first


def test_flow_scale_warp_direction_and_mask(state, frames):
    """Block 0 predicts a constant flow at 1/8 size (bias 0.5 -> 4 px once scaled back), block 3 a mask that
    picks frame A: the in-between is frame A sampled 4 px to the right, wherever that stays inside the frame."""
    model = rife.IFNet()
    model.load_state_dict(state)
    with torch.no_grad():
        for block in (model.block0, model.block1, model.block2, model.block3):
            block.lastconv[0].weight.zero_()
            block.lastconv[0].bias.zero_()
        model.block0.lastconv[0].bias[0:4] = 0.5  # pixel shuffle: output channel 0 (A's x flow) = inputs 0..3
        model.block3.lastconv[0].bias[16:20] = 30.0  # output channel 4: the mask logit; sigmoid(30) ~ 1
    loaded = rife.LoadedRIFE(model.eval(), "4.7", "shift", torch.device("cpu"), torch.float32)
    out = rife.interpolate_rife(frames[:2], loaded, 2)
    torch.testing.assert_close(out[1][:, :60], frames[0][:, 4:], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        out[1][:, 60:], frames[0][:, 63:].expand(64, 4, 3), atol=1e-4, rtol=0
    )  # border


def test_ensemble_is_symmetric_in_time(files, frames):
    """Ensemble averages every block with the reversed pair, so (A, B, t) and (B, A, 1 - t) give the same frame;
    a single pass with random weights does not."""
    model = rife.load_rife(files["plain"], device="cpu").model
    a, b = frames[0].permute(2, 0, 1)[None], frames[1].permute(2, 0, 1)[None]
    t = torch.full((1, 1, 1, 1), 0.25)
    with torch.no_grad():
        forward, backward = model(a, b, t, ensemble=True), model(b, a, 1 - t, ensemble=True)
        torch.testing.assert_close(forward, backward, atol=1e-5, rtol=0)
        assert not torch.allclose(model(a, b, t), model(b, a, 1 - t), atol=1e-3)


def test_batching_ensemble_progress_and_cancel(files, frames):
    loaded = rife.load_rife(files["plain"], device="cpu")
    calls = []
    one = rife.interpolate_rife(
        frames, loaded, 2, batch_size=1, control=Control(on_progress=lambda d, t, text: calls.append((d, t)))
    )
    many = rife.interpolate_rife(frames, loaded, 2, batch_size=8)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=0)
    assert calls == [(0, 2), (1, 2), (2, 2)]
    both = rife.interpolate_rife(frames, loaded, 2, ensemble=True)
    assert torch.isfinite(both).all() and not torch.allclose(both[1], one[1], atol=1e-4)

    with pytest.raises(Cancelled):
        rife.interpolate_rife(frames, loaded, 2, control=Control(should_stop=lambda: True))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_stays_close_to_fp32(files, frames, dtype):
    full = rife.interpolate_rife(frames[:2], rife.load_rife(files["plain"], device="cpu"), 2)
    half = rife.load_rife(files["plain"], device="cpu", dtype=dtype)
    assert half.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    out = rife.interpolate_rife(frames[:2], half, 2)
    assert out.dtype == torch.float32 and torch.equal(out[0], frames[0])
    assert (out - full).abs().max() < 0.05


def test_version_detection_names_what_the_file_is(state, tmp_path):
    assert rife.detect_version(state) == "4.7"
    cases = {
        "foreign": ({"conv.weight": torch.zeros(4, 3, 3, 3)}, "not a RIFE IFNet"),
        "v4.10": ({**state, "encode.0.weight": torch.zeros(32, 3, 3, 3)}, "4.10"),
        "v4.26": ({**state, "block4.conv0.0.0.weight": torch.zeros(16, 28, 3, 3)}, "4.22"),
        "v4.6": ({k: v for k, v in state.items() if not k.startswith("encode.")}, "4.6 or earlier"),
        "shape": ({**state, "block2.lastconv.0.weight": torch.zeros(96, 20, 4, 4)}, "wrong shape"),
        "missing": ({k: v for k, v in state.items() if k != "block3.convblock.7.beta"}, "missing"),
    }
    for name, (sd, words) in cases.items():
        with pytest.raises(rife.UnsupportedRIFEError, match=words):
            rife.detect_version(sd)
        path = tmp_path / f"{name}.pth"
        torch.save(sd, path)
        with pytest.raises(rife.UnsupportedRIFEError, match=f"{name}.pth.*Supported: RIFE 4.7"):
            rife.load_rife(path, device="cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(rife.UnsupportedRIFEError, match="junk.pth"):
        rife.load_rife(tmp_path / "junk.pth", device="cpu")


def test_node_picks_the_rife_file(comfy_env, files, state, frames, monkeypatch):
    frames = frames[:2]  # one pair keeps the node runs cheap
    bridge.register_model_folders()
    folder = comfy_env.base_dir / "models" / "frame_interpolation"
    folder.mkdir(parents=True, exist_ok=True)
    assert InterpolateFrames.INPUT_TYPES()["optional"]["interpolator"][0] == ["auto", "optical flow"]
    flow_out, _ = run_node(InterpolateFrames, frames=frames, multiplier="2", fps=8.0, loop=False).result

    (folder / "rife49.pth").write_bytes(files["plain"].read_bytes())
    torch.save({**state, "block4.lastconv.0.bias": torch.zeros(52)}, folder / "rife426.pth")  # unsupported
    pack = comfy_env.base_dir / "custom_nodes" / "ComfyUI-Frame-Interpolation" / "ckpts" / "rife"
    pack.mkdir(parents=True)
    (pack / "rife47.pth").write_bytes(files["plain"].read_bytes())
    monkeypatch.setattr(bridge, "comfyui_root", lambda: comfy_env.base_dir)
    choices = InterpolateFrames.INPUT_TYPES()["optional"]["interpolator"]
    assert choices[0] == [
        "auto",
        "optical flow",
        "rife426.pth",
        "rife49.pth",
        "[ComfyUI-Frame-Interpolation] rife47.pth",
    ]
    assert choices[1]["default"] == "auto"

    comfy_env.progress.clear()
    out, fps = run_node(
        InterpolateFrames, frames=frames, multiplier="4", fps=8.0, loop=False, interpolator="rife49.pth"
    ).result
    assert out.shape == (5, 64, 64, 3) and fps == 32.0
    assert comfy_env.progress and comfy_env.progress[-1].value == comfy_env.progress[-1].total == 3
    expected = rife.interpolate_rife(frames, rife.load_rife(files["plain"], device="cpu"), 4)
    torch.testing.assert_close(out, expected)

    # auto skips the unsupported newer file and uses rife49; the pack's copy works by name too
    auto, _ = run_node(InterpolateFrames, frames=frames, multiplier="2", fps=8.0, loop=False).result
    assert not torch.allclose(auto, flow_out, atol=1e-3)
    torch.testing.assert_close(
        auto, rife.interpolate_rife(frames, rife.load_rife(files["plain"], device="cpu"), 2)
    )
    pack_out, _ = run_node(
        InterpolateFrames,
        frames=frames,
        multiplier="2",
        fps=8.0,
        loop=False,
        interpolator="[ComfyUI-Frame-Interpolation] rife47.pth",
    ).result
    torch.testing.assert_close(pack_out, auto)
    flow_again, _ = run_node(
        InterpolateFrames, frames=frames, multiplier="2", fps=8.0, loop=False, interpolator="optical flow"
    ).result
    torch.testing.assert_close(flow_again, flow_out)
    with pytest.raises(rife.UnsupportedRIFEError, match="rife426.pth.*4.22"):
        run_node(
            InterpolateFrames, frames=frames, multiplier="2", fps=8.0, loop=False, interpolator="rife426.pth"
        )
    assert video_nodes.resolve_interpolator_file("rife49.pth") == str(folder / "rife49.pth")
