"""SD3 / SD3.5 bases for training: every file layout loads the same model, the variant comes from the
tensors, and the conditioning is what diffusers' StableDiffusion3Pipeline computes."""

from __future__ import annotations

import pytest
import torch

from charforge.engine.library.flow_layouts import single_file_state
from charforge.engine.models import sd3_files
from charforge.engine.train.flow import sd3
from charforge.engine.train.flow.flux import MissingPartError
from charforge.engine.train.flow.objective import FlowSettings
from charforge.engine.train.models import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")  # cf_testing/threads.py


@pytest.fixture(scope="module")
def tiny(tiny_sd35):
    return tiny_sd35  # cf_testing/model_fixtures.py: built once per test run


def _load(tiny, files):
    return sd3.load_sd3(
        files,
        dtype="fp32",
        config_dir=tiny.config_dir,
        tokenizer_candidates=[tiny.clip_vocab],
        t5_tokenizer_candidates=[tiny.t5_tokenizer],
    )


def _layouts(tiny):
    parts = {"clip_l": str(tiny.clip_l), "clip_g": str(tiny.clip_g), "t5": str(tiny.t5xxl)}
    return {
        "checkpoint with encoders": sd3.SD3Files(str(tiny.checkpoint)),
        "checkpoint without encoders": sd3.SD3Files(str(tiny.checkpoint_no_encoders), **parts),
        "separate files": sd3.SD3Files(str(tiny.mmdit), vae=str(tiny.vae), **parts),
    }


def _assert_same_weights(module, reference, what):
    ours, theirs = module.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs), (what, sorted(set(ours) ^ set(theirs))[:5])
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, (what, different[:5])


def test_every_layout_loads_the_weights_diffusers_loads(tiny):
    """Single file with / without encoders and separate files give the diffusers folder's modules bit for
    bit; the folder itself loads as diffusers' own pipeline does."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny.diffusers_dir), local_files_only=True)
    reference = {
        "transformer": pipe.transformer,
        "vae": pipe.vae,
        "clip_l": pipe.text_encoder,
        "clip_g": pipe.text_encoder_2,
        "t5": pipe.text_encoder_3,
    }
    for name, files in {**_layouts(tiny), "diffusers folder": tiny.diffusers_dir}.items():
        model = _load(tiny, files)
        assert model.arch == "sd35-medium" and model.family == "sd3"
        ours = {"transformer": model.transformer, "vae": model.vae, **model.text_encoders}
        for part, module in ours.items():
            _assert_same_weights(module, reference[part], f"{name}: {part}")
        assert list(model.transformer.config["dual_attention_layers"]) == [0]


def test_conditioning_is_the_pipelines(tiny):
    """Context (77 CLIP + 256 T5 tokens, CLIP-L|CLIP-G padded to the T5 width) and pooled vector equal
    StableDiffusion3Pipeline.encode_prompt's; the empty caption too (what caption dropout trains on)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny.diffusers_dir), local_files_only=True)
    model = _load(tiny, _layouts(tiny)["separate files"])
    captions = ["a photo of sks person smiling in the park", ""]
    with torch.no_grad():
        expected, _, expected_pooled, _ = pipe.encode_prompt(
            captions, captions, captions, do_classifier_free_guidance=False
        )
        text = model.encode_text(captions, "cpu", FlowSettings())
        context, pooled = sd3.joint_conditioning(text)
    assert context.shape == (2, 77 + sd3.T5_LENGTH, 128) and pooled.shape == (2, 96)
    assert torch.equal(context, expected) and torch.equal(pooled, expected_pooled)
    # Only the asked encoders run: the trainer caches the frozen ones and recomputes an adapted one.
    assert set(model.encode_text(captions, "cpu", FlowSettings(), ["clip_l"])) == {"clip_l", "clip_l_pooled"}
    shorter = model.encode_text(captions, "cpu", FlowSettings(t5_max_length=77), ["t5"])["t5"]
    assert shorter.shape[1] == 77


def test_prediction_is_the_transformer_at_sigma_times_1000(tiny):
    model = _load(tiny, tiny.diffusers_dir)
    text = model.encode_text(["sks person"], "cpu", FlowSettings())
    context, pooled = sd3.joint_conditioning(text)
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.25])
    with torch.no_grad():
        ours = model.predict(noisy, sigma, text, FlowSettings())
        theirs = model.transformer(
            hidden_states=noisy,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=sigma * 1000,
        ).sample
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("arch", sd3_files.VARIANTS)
def test_full_size_variants_are_told_apart_by_their_tensors(arch):
    """A full-size MMDiT of each variant (meta device: shapes only), in ComfyUI's layout with the checkpoint
    prefix, gives its variant and exactly the shipped diffusers config."""
    import json

    from diffusers import SD3Transformer2DModel

    shipped = json.loads((sd3.CONFIG_DIR / "transformer" / f"{arch}.json").read_text())
    shipped.pop("_class_name")
    with torch.device("meta"):
        model = SD3Transformer2DModel(**shipped)
    comfy = single_file_state("sd3", model.state_dict())
    shapes = {sd3_files.TRANSFORMER_PREFIX + k: tuple(v.shape) for k, v in comfy.items()}
    assert sd3_files.sd3_variant(shapes) == arch
    config = sd3_files.transformer_config(shapes)
    assert {**config, "dual_attention_layers": list(config["dual_attention_layers"])} == shipped
    # Without the prefix (a diffusion_models file) the same.
    assert (
        sd3_files.sd3_variant({k.removeprefix(sd3_files.TRANSFORMER_PREFIX): v for k, v in shapes.items()})
        == arch
    )


def test_refusals_say_what_is_wrong_and_where_parts_go(tiny, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(other))
    with pytest.raises(UnsupportedModelError, match="not an SD3 / SD3.5 model.*double_blocks"):
        _load(tiny, sd3.SD3Files(str(other)))
    with pytest.raises(MissingPartError, match="T5-XXL.*models/text_encoders"):
        _load(
            tiny,
            sd3.SD3Files(str(tiny.checkpoint_no_encoders), clip_l=str(tiny.clip_l), clip_g=str(tiny.clip_g)),
        )
    with pytest.raises(MissingPartError, match="VAE.*models/vae"):
        _load(
            tiny,
            sd3.SD3Files(
                str(tiny.mmdit), clip_l=str(tiny.clip_l), clip_g=str(tiny.clip_g), t5=str(tiny.t5xxl)
            ),
        )


def test_clip_l_without_projection_uses_the_unprojected_pooled_output(tiny, tmp_path):
    """A CLIP-L file made for Flux.1 has no text_projection: its pooled output is passed through unprojected
    (what ComfyUI gives SD3 from CLIP-L), with the hidden states unchanged."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny.clip_l))
    state.pop("text_projection.weight")
    bare = tmp_path / "clip_l_no_projection.safetensors"
    save_file(state, str(bare))
    parts = {"clip_g": str(tiny.clip_g), "t5": str(tiny.t5xxl), "vae": str(tiny.vae)}
    with_projection = _load(tiny, sd3.SD3Files(str(tiny.mmdit), clip_l=str(tiny.clip_l), **parts))
    without = _load(tiny, sd3.SD3Files(str(tiny.mmdit), clip_l=str(bare), **parts))
    with torch.no_grad():
        a = with_projection.encode_text(["sks person"], "cpu", FlowSettings(), ["clip_l"])
        b = without.encode_text(["sks person"], "cpu", FlowSettings(), ["clip_l"])
        unprojected = (
            without.text_encoders["clip_l"]
            .text_model(
                with_projection.tokenizers["clip_l"](
                    ["sks person"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                ).input_ids
            )
            .pooler_output
        )
    assert torch.equal(a["clip_l"], b["clip_l"])
    assert torch.equal(b["clip_l_pooled"], unprojected)


@pytest.mark.parametrize("arch", sd3_files.VARIANTS)
def test_preflight_flops_match_a_count_on_the_meta_device(arch):
    """The flow preflight's FLOPs of a 1024² SD3 LoRA step (by formula: 4,096 image + 333 text tokens) agree
    with torch's FlopCounterMode on the full-size MMDiT (meta device: shapes only; attention is the batched
    matmuls, the layers the addmms); step = 2 x linear + 3 x attention with a frozen base."""
    import json

    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from charforge.engine.train.config import TrainConfig, with_overrides
    from charforge.engine.train.flow.preflight import step_flops

    config = json.loads((sd3.CONFIG_DIR / "transformer" / f"{arch}.json").read_text())
    config.pop("_class_name")
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config)
        inputs = {
            "hidden_states": torch.empty(1, 16, 128, 128),
            "encoder_hidden_states": torch.empty(1, 77 + sd3.T5_LENGTH, 4096),
            "pooled_projections": torch.empty(1, 2048),
            "timestep": torch.empty(1),
        }
    with FlopCounterMode(display=False) as counter:
        transformer(**inputs)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention, forward = counts["aten.bmm"], counter.get_total_flops()
    model = sd3.SD3Model(arch, "meta", transformer, None, {}, {}, torch.bfloat16)
    estimated_forward, estimated_step = step_flops(model, with_overrides(TrainConfig(), {"resolution": 1024}))
    assert estimated_forward == pytest.approx(forward, rel=2e-3)
    assert estimated_step == pytest.approx(2 * (forward - attention) + 3 * attention, rel=2e-3)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "scaled_fp8"])
def test_fp8_t5_and_a_diffusers_named_vae_file(tiny, tmp_path, scaled):
    """ComfyUI's fp8 T5-XXL files (plain e4m3, or scaled: ``weight x scale_weight``) load close to the fp32
    encoder, and a VAE file in diffusers' names loads the same VAE as the LDM-named one."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny.t5xxl))
    fp8 = {}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.ndim == 2 and "embed" not in key and key != "shared.weight":
            scale = tensor.abs().max() / 448 if scaled else torch.tensor(1.0)
            fp8[key] = (tensor / scale).to(torch.float8_e4m3fn)
            if scaled:
                fp8[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            fp8[key] = tensor
    if scaled:
        fp8["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    t5_fp8 = tmp_path / "t5xxl_fp8.safetensors"
    save_file(fp8, str(t5_fp8))
    parts = {"clip_l": str(tiny.clip_l), "clip_g": str(tiny.clip_g)}
    vae_diffusers = tiny.diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors"
    reference = _load(tiny, sd3.SD3Files(str(tiny.mmdit), t5=str(tiny.t5xxl), vae=str(tiny.vae), **parts))
    model = _load(tiny, sd3.SD3Files(str(tiny.mmdit), t5=str(t5_fp8), vae=str(vae_diffusers), **parts))
    _assert_same_weights(model.vae, reference.vae, "diffusers-named VAE")
    with torch.no_grad():
        ours = model.encode_text(["a photo of sks person"], "cpu", FlowSettings(), ["t5"])["t5"]
        theirs = reference.encode_text(["a photo of sks person"], "cpu", FlowSettings(), ["t5"])["t5"]
    relative = float((ours - theirs).norm() / theirs.norm())
    assert 0 < relative < 0.1, relative  # really rounded to e4m3 (3 mantissa bits), and close


def test_samples_are_the_pipelines_images(tiny):
    """A training sample (cached conditioning, no text encoders) is the image StableDiffusion3Pipeline makes
    with its own encoders for the same prompt, empty negative prompt, guidance, steps and seed."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline

    from charforge.engine.train.config import SampleSettings

    model = _load(tiny, tiny.diffusers_dir)
    with torch.no_grad():
        text = model.encode_text(["a photo of sks person"], "cpu", FlowSettings())
    model.release_text_encoders()
    ours = model.sample(text, 3, 64, SampleSettings(steps=3, guidance=4.0), torch.device("cpu"))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny.diffusers_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a photo of sks person",
        negative_prompt="",
        num_inference_steps=3,
        guidance_scale=4.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    assert ours.size == (64, 64)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_open_clip_named_clip_g_file_loads_the_same_encoder(tiny, tmp_path):
    """A CLIP-G file in OpenCLIP's layout (``transformer.resblocks.N.attn.in_proj_weight`` ..., as SDXL files
    store bigG; written here by the single-file writer) loads the same encoder as the Hugging Face-named one."""
    from safetensors.torch import load_file, save_file

    from charforge.engine.models.single_file import clip_to_open_clip

    open_clip = tmp_path / "clip_g_open_clip.safetensors"
    save_file(clip_to_open_clip(load_file(str(tiny.clip_g))), str(open_clip))
    parts = {"clip_l": str(tiny.clip_l), "t5": str(tiny.t5xxl), "vae": str(tiny.vae)}
    reference = _load(tiny, sd3.SD3Files(str(tiny.mmdit), clip_g=str(tiny.clip_g), **parts))
    model = _load(tiny, sd3.SD3Files(str(tiny.mmdit), clip_g=str(open_clip), **parts))
    _assert_same_weights(model.text_encoders["clip_g"], reference.text_encoders["clip_g"], "OpenCLIP clip_g")
