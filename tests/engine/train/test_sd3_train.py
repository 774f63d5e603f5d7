"""SD3 / SD3.5 LoRA training on tiny models of the real architecture: it learns, one step is what a
hand-written diffusers + peft flow-matching step computes, a resumed run equals an uninterrupted one, and
the LoRA files load (diffusers layout in StableDiffusion3Pipeline, kohya layout through the library's
key layouts) with the trained effect."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cf_testing import train_data as td
from charforge.engine.library import flow_layouts
from charforge.engine.library.formats import read_lora
from charforge.engine.models import sd3_files
from charforge.engine.train.config import TrainConfig
from charforge.engine.train.data import TrainingData, items_from_pairs, read_kohya_folder
from charforge.engine.train.export import lora_metadata
from charforge.engine.train.flow import sd3
from charforge.engine.train.flow.export import export_flow_lora
from charforge.engine.train.flow.objective import FlowSettings
from charforge.engine.train.flow.trainer import FlowTrainer

pytestmark = [pytest.mark.usefixtures("one_thread")]  # cf_testing/threads.py

SIGMAS = [0.1, 0.3, 0.5, 0.7, 0.9]


@pytest.fixture(scope="module")
def tiny(tiny_sd35):
    return tiny_sd35  # cf_testing/model_fixtures.py: built once per test run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_data") / "img"
    return td.kohya_folder(root, ["a photo of sks person smiling", "sks person in the park"])


def sd3_config(**overrides) -> TrainConfig:
    return td.tiny_train_config(**{"min_snr_gamma": 0.0, **overrides})


def _trainer(tiny, dataset, config):
    model = sd3.load_sd3(tiny.diffusers_dir, dtype="fp32")
    trainer = FlowTrainer(model, TrainingData.prepare(read_kohya_folder(dataset), config.data), config)
    trainer.setup()
    return trainer


def test_training_measurably_learns(tiny, tmp_path):
    image = td.pattern_image(tmp_path / "one.png")
    config = sd3_config(steps=40, **td.LEARNING_SETTINGS)
    model = sd3.load_sd3(tiny.diffusers_dir, dtype="fp32")
    data = TrainingData.prepare(items_from_pairs([(str(image), "a photo of sks person")]), config.data)
    trainer = FlowTrainer(model, data, config)
    trainer.setup()
    assert all(te is None for te in model.text_encoders.values())  # cached, then all three encoders dropped
    base_loss, lora_loss = td.losses_before_and_after(trainer, SIGMAS)
    # Measured 0.78 of the base (1.57 -> 1.22); the tiny MMDiT's un-adapted output layer (adaLN + proj_out)
    # keeps it from going much lower in so few steps.
    assert lora_loss < 0.8 * base_loss, (base_loss, lora_loss)


def test_presets_cover_both_streams_and_the_second_attention(tiny):
    model = sd3.load_sd3(tiny.diffusers_dir, dtype="fp32")
    attention = set(model.lora_targets("attention"))
    everything = set(model.lora_targets("all_linear"))
    # Block 1 is the last: its context stream is pre-only (no to_add_out, no ff_context); only block 0 has attn2.
    assert "transformer_blocks.0.attn.to_add_out" in attention
    assert "transformer_blocks.1.attn.to_add_out" not in attention
    assert {f"transformer_blocks.0.attn2.to_{p}" for p in "qkv"} <= attention
    assert not any(n.startswith("transformer_blocks.1.attn2") for n in attention)
    # block 0: 8 joint + 4 attn2; block 1: q/k/v/out + add k/v (its text queries feed nothing: no LoRA)
    assert len(attention) == 12 + 6 and "transformer_blocks.1.attn.add_q_proj" not in attention
    assert everything - attention == {
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.0.proj",
        "transformer_blocks.0.ff_context.net.2",
        "transformer_blocks.1.ff.net.0.proj",
        "transformer_blocks.1.ff.net.2",
    }
    assert not any("norm1" in n or "embed" in n for n in everything)  # modulation / embeddings never


def test_step_equals_a_hand_written_diffusers_peft_flow_matching_step(tiny, dataset):
    """One micro-batch through the trainer == the same batch through StableDiffusion3Pipeline's own prompt
    encoding, the VAE, SD3's shifted logit-normal σ and the transformer with peft LoRA: same loss and the
    same LoRA gradients."""
    from diffusers import StableDiffusion3Pipeline

    config = sd3_config(batch_size=2, rank=4, alpha=2.0, targets="attention")
    trainer = _trainer(tiny, dataset, config)
    loss = trainer.micro_batch_loss(0)
    loss.backward()

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny.diffusers_dir), local_files_only=True)
    transformer = pipe.transformer.requires_grad_(False)
    attention = {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    }  # fmt: skip
    targets = [
        n
        for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
        and n.startswith("transformer_blocks.")
        and n.split(".", 2)[2] in attention
    ]
    targets.remove("transformer_blocks.1.attn.add_q_proj")  # the last block's text queries feed nothing
    td.peft_lora(transformer, targets, config.seed)
    captions, pixels = td.first_batch(trainer)
    with torch.no_grad():
        raw = pipe.vae.encode(pixels).latent_dist.mean
        x0 = (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        context, _, pooled, _ = pipe.encode_prompt(
            captions, captions, captions, do_classifier_free_guidance=False
        )
    generator = torch.Generator().manual_seed((config.seed * 1_000_003 + 0) % (2**63))
    noise = torch.randn(x0.shape, generator=generator)
    u = torch.sigmoid(torch.randn((x0.shape[0],), generator=generator))
    sigma = 3.0 * u / (1 + 2.0 * u)  # SD3's shift 3.0
    s = sigma[:, None, None, None]
    prediction = transformer(
        hidden_states=(1 - s) * x0 + s * noise,
        encoder_hidden_states=context,
        pooled_projections=pooled,
        timestep=sigma * 1000,
        return_dict=False,
    )[0]
    reference = torch.nn.functional.mse_loss(prediction, noise - x0)
    reference.backward()

    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    assert len(td.assert_lora_grads_close(trainer.model.transformer, transformer)) == 2 * len(targets)


def test_preconditioned_outputs_weight_the_velocity_error_by_sigma_squared(tiny, dataset):
    """``precondition_outputs`` (diffusers' SD3 option) compares x0 estimates x_σ − σ·v with x0: the same batch's
    loss is the plain velocity loss times σ², σ being the one the step drew (SD3's 3.0 shift by default)."""
    plain = _trainer(tiny, dataset, sd3_config(batch_size=1))
    preconditioned = _trainer(tiny, dataset, sd3_config(batch_size=1, precondition_outputs=True))
    with torch.no_grad():
        velocity_loss, x0_loss = plain.micro_batch_loss(0), preconditioned.micro_batch_loss(0)
    generator = plain._generator(0)
    torch.randn((1, 16, 8, 8), generator=generator)  # the noise is drawn first
    u = torch.sigmoid(torch.randn((1,), generator=generator))
    sigma = float(3.0 * u / (1 + 2.0 * u))
    assert float(x0_loss) == pytest.approx(sigma**2 * float(velocity_loss), rel=1e-5)


def test_stop_and_resume_equals_an_uninterrupted_run(tiny, dataset):
    # LoRA dropout (global RNG), flips, caption dropout (the empty caption's cached conditioning), two
    # micro-batches per step, a warm-up + cosine schedule.
    config = sd3_config(**td.RESUME_SETTINGS)
    straight, resumed = td.straight_and_resumed(lambda: _trainer(tiny, dataset, config))
    td.assert_same_lora(straight.network, resumed.network)
    assert resumed.last_loss == straight.last_loss


# --------------------------------------------------------------------------------------------------
# The trained LoRA as files


@pytest.fixture(scope="module")
def trained(tiny, dataset, tmp_path_factory):
    """A few steps on every linear layer of the joint blocks (every LoRA matrix non-zero), written in both
    layouts with the SD3.5 metadata."""
    config = sd3_config(steps=3, learning_rate=2e-2, targets="kohya", alpha=2.0)
    trainer = _trainer(tiny, dataset, config)
    trainer.train()
    folder = tmp_path_factory.mktemp("sd3_lora")
    meta = lora_metadata(
        arch=trainer.model.arch, settings=config.lora, title="alice", trigger_phrase="sks person"
    )
    files = {
        layout: export_flow_lora(
            folder / f"{layout}.safetensors", trainer.network, "sd3", meta, torch.float32, layout
        )
        for layout in ("kohya", "peft")
    }
    return trainer, files


def _modules(trainer) -> dict[str, flow_layouts.Factors]:
    return {
        m.name: flow_layouts.Factors(m.down.detach().clone(), m.up.detach().clone(), torch.tensor(m.alpha))
        for m in trainer.lora_network().modules()
        if m.component == "transformer"
    }


def _output(transformer, text):
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    context, pooled = sd3.joint_conditioning(text)
    with torch.no_grad():
        return transformer(
            hidden_states=noisy,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=torch.tensor([300.0]),
        ).sample


def _merge(transformer, modules: dict[str, flow_layouts.Factors]):
    """Add each module's delta into a clean transformer's weights by hand."""
    layers = dict(transformer.named_modules())
    with torch.no_grad():
        for name, factors in modules.items():
            layers[name].weight += factors.delta().to(layers[name].weight.dtype)
    return transformer


def test_peft_file_loads_in_the_sd3_pipeline_and_equals_a_hand_merge(tiny, trained, caplog):
    """The diffusers / peft file (``transformer.<module>.lora_A/B.weight``) loads in
    StableDiffusion3Pipeline.load_lora_weights with every key used, and its output equals merging the
    trained deltas into the weights by hand, and the peft model's own output."""
    import logging

    from diffusers import StableDiffusion3Pipeline

    trainer, files = trained
    modules = _modules(trainer)
    assert len(modules) == 24 and all(f.up.abs().sum() > 0 for f in modules.values())
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny.diffusers_dir), local_files_only=True)
    text = sd3.load_sd3(tiny.diffusers_dir, dtype="fp32").encode_text(["sks person"], "cpu", FlowSettings())
    base = _output(pipe.transformer, text)
    clean = copy.deepcopy(pipe.transformer)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(files["peft"]))
    # The only warnings allowed: the file has no text-encoder LoRA (diffusers says so for each CLIP).
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(w.startswith("No LoRA keys associated to CLIPTextModelWithProjection") for w in warnings), (
        warnings
    )
    loaded = _output(pipe.transformer, text)
    merged = _output(_merge(clean, modules), text)
    trainer.lora_network().set_enabled(True)
    peft = _output(trainer.model.transformer.eval(), text)
    assert (loaded - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, merged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded, peft, rtol=1e-4, atol=1e-5)


def test_kohya_file_patched_onto_the_single_file_weights_equals_the_hand_merge(tiny, trained):
    """The kohya SD3 file (``lora_unet_joint_blocks_N_x_block_attn_qkv`` ..., fused q/k/v as ComfyUI and
    kohya's tools load it): each ``up @ down`` added to the ComfyUI-layout weight of that name gives, read
    back into diffusers, the hand-merged model; the metadata names the SD3.5 Medium LoRA."""
    from diffusers import SD3Transformer2DModel

    trainer, files = trained
    tensors, metadata = read_lora(files["kohya"])
    stems = {k.split(".")[0] for k in tensors}
    assert {
        "lora_unet_joint_blocks_0_x_block_attn_qkv",
        "lora_unet_joint_blocks_0_x_block_attn2_qkv",
        "lora_unet_joint_blocks_0_context_block_mlp_fc2",
        "lora_unet_joint_blocks_1_context_block_attn_qkv",  # k/v trained, q a zero block
    } <= stems
    assert "lora_unet_joint_blocks_1_context_block_attn_proj" not in stems  # pre-only: no projection
    assert metadata["modelspec.architecture"] == "stable-diffusion-3.5-medium/lora"
    assert (
        metadata["ss_network_module"] == "networks.lora_sd3"
        and metadata["modelspec.trigger_phrase"] == "sks person"
    )

    reference = SD3Transformer2DModel.from_pretrained(
        str(tiny.diffusers_dir / "transformer"), local_files_only=True
    )
    text = sd3.load_sd3(tiny.diffusers_dir, dtype="fp32").encode_text(["sks person"], "cpu", FlowSettings())
    comfy = flow_layouts.single_file_state("sd3", reference.state_dict())
    with torch.no_grad():
        for stem in stems:
            name = stem.removeprefix("lora_unet_")
            weight = next(
                k for k in comfy if k.endswith(".weight") and k[: -len(".weight")].replace(".", "_") == name
            )
            down, up = tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"]
            comfy[weight] = comfy[weight] + float(tensors[stem + ".alpha"]) / down.shape[0] * (up @ down)
    patched = sd3_files.build_transformer(comfy)
    merged = _merge(copy.deepcopy(reference), _modules(trainer))
    torch.testing.assert_close(_output(patched, text), _output(merged, text), rtol=1e-4, atol=1e-5)


def test_clip_l_lora_trains_with_the_others_cached_and_loads_in_the_pipeline(tiny, dataset, tmp_path, caplog):
    """With a CLIP-L LoRA, CLIP-G and T5-XXL are cached then dropped and CLIP-L runs every step; the peft file's
    ``text_encoder.`` part loads in StableDiffusion3Pipeline.load_lora_weights and gives its prompt encoding
    the trained CLIP-L's."""
    import logging

    from diffusers import StableDiffusion3Pipeline

    config = sd3_config(steps=2, learning_rate=5e-2, train_text_encoder=True, text_encoder_lr=5e-2)
    trainer = _trainer(tiny, dataset, config)
    encoders = trainer.model.text_encoders
    assert encoders["clip_g"] is None and encoders["t5"] is None and encoders["clip_l"] is not None
    trainer.train()
    clip_lora = trainer.lora_network().parameters("text_encoder")
    assert clip_lora and any(p.abs().sum() > 0 for p in clip_lora)
    meta = lora_metadata(arch=trainer.model.arch, settings=config.lora, title="alice")
    path = export_flow_lora(
        tmp_path / "peft.safetensors", trainer.network, "sd3", meta, torch.float32, "peft"
    )

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny.diffusers_dir), local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # CLIP-G (text_encoder_2) has no LoRA in the file; nothing else may be reported.
    assert all(w.startswith("No LoRA keys associated to CLIPTextModelWithProjection") for w in warnings), (
        warnings
    )
    assert len(warnings) <= 1
    with torch.no_grad():
        trainer.lora_network().set_enabled(False)
        base = trainer.model.encode_text(["sks person"], "cpu", FlowSettings(), ["clip_l"])
        trainer.lora_network().set_enabled(True)
        ours = trainer.model.encode_text(["sks person"], "cpu", FlowSettings(), ["clip_l"])
        theirs = pipe._get_clip_prompt_embeds("sks person", device="cpu", clip_model_index=0)
    torch.testing.assert_close(theirs[0], ours["clip_l"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs[1], ours["clip_l_pooled"], rtol=1e-4, atol=1e-5)
    assert (ours["clip_l"] - base["clip_l"]).abs().max() > 1e-3  # the LoRA changed CLIP-L


def test_bf16_recipe_runs_with_the_lora_in_fp32(tiny, dataset):
    """The GPU recipe (bf16 base, bf16 autocast, fp32 LoRA and optimizer state) on the CPU: finite losses, the
    base stays bf16 and the LoRA fp32, and the timestep reaches the MMDiT unrounded."""
    config = sd3_config(steps=2, mixed_precision="bf16")
    model = sd3.load_sd3(tiny.diffusers_dir, dtype="bf16")
    trainer = FlowTrainer(model, TrainingData.prepare(read_kohya_folder(dataset), config.data), config)
    trainer.setup()
    seen = []
    hook = model.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True
    )
    try:
        trainer.train()
    finally:
        hook.remove()
    assert np.isfinite(trainer.last_loss)
    assert model.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.lora_network().parameters())
    assert seen and all(t.dtype == torch.float32 for t in seen)


def test_fp8_base_step_stays_close_to_the_bf16_base_step(tiny, dataset):
    """The same batch with the MMDiT's block weights stored in fp8 (e4m3, bf16 compute) and in bf16: loss
    within 2 %, LoRA gradients within 10 % (relative norm of the difference)."""
    results = []
    for fp8 in (False, True):
        config = sd3_config(mixed_precision="bf16", fp8_base=fp8, learning_rate=1e-2, steps=3)
        model = sd3.load_sd3(tiny.diffusers_dir, dtype="bf16")
        trainer = FlowTrainer(model, TrainingData.prepare(read_kohya_folder(dataset), config.data), config)
        trainer.setup()
        trainer.train(until=2)  # B non-zero: gradients reach the down matrices too
        loss = trainer.micro_batch_loss(4)
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.transformer.named_parameters() if "lora_" in n}
        results.append((float(loss.detach()), grads))
        if fp8:
            weights = [m.weight for m in model.transformer.modules() if type(m).__name__ == "Fp8Linear"]
            assert weights and all(w.dtype == torch.float8_e4m3fn for w in weights)
    (loss16, grads16), (loss8, grads8) = results
    assert loss8 == pytest.approx(loss16, rel=0.02)
    flat16 = torch.cat([g.flatten() for g in grads16.values()])
    flat8 = torch.cat([grads8[k].flatten() for k in grads16])
    assert float((flat8 - flat16).norm() / flat16.norm()) < 0.10
