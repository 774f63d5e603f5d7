"""The training step is ready for the GPU: one graph for torch.compile, no waiting for the device, inputs kept there.

On the CPU, with U-Nets cut to one block of each kind the real configs use (the graph breaks come from code
paths, not from how many blocks repeat them):

- dynamo traces `Trainer.denoising_loss` (noising, the U-Net with the peft LoRA, min-SNR and mask weights,
  the loss) as one graph without breaks, in fp32 and in the GPU recipe (bf16 autocast, checkpointing);
- steps compiled with ``torch.compile`` train to the same LoRA as eager steps;
- ``train()`` reads nothing back from the device but the losses, once every ``loss_every`` steps, and still
  reports every step with its own loss, in order, also when the run is stopped between two reads;
- a step reads none of the host-side caches: latents, text outputs, size ids and masks come from the
  device tables `setup()` filled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from cf_testing.train_data import tiny_train_config
from charforge.engine.control import Cancelled, Control
from charforge.engine.train import loop
from charforge.engine.train.data import TrainingData, read_kohya_folder
from charforge.engine.train.loop import Trainer
from charforge.engine.train.models import load_base_model

pytestmark = pytest.mark.usefixtures("one_thread")  # cf_testing/threads.py

# One block of each kind the tiny (and real) configs have: cross-attention and plain levels both ways, the
# mid block, SD1.5's convolution projections, SDXL's linear ones and its size / pooled-text conditioning.
MINIMAL_UNET = {
    "sd15": {
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 32],
        "layers_per_block": 1,
        "attention_head_dim": 2,
    },
    "sdxl": {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1],
        "attention_head_dim": [2, 4],
    },
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two captioned images, one with a mask file."""
    root = tmp_path_factory.mktemp("compile_data") / "img" / "1_sks person"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"sks person, photo {name}")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :40] = 255
    Image.fromarray(mask).save(root / "a_mask.png")
    return root.parent


def _trainer(tiny, dataset, precision: str = "no", **overrides) -> Trainer:
    """A set-up trainer on `tiny`'s model with its U-Net cut to MINIMAL_UNET (random weights, seeded)."""
    from diffusers import UNet2DConditionModel

    config = tiny_train_config(**{"mixed_precision": precision, "masked_loss": True, **overrides})
    model = load_base_model(tiny.diffusers_dir, dtype="bf16" if precision == "bf16" else "fp32")
    torch.manual_seed(0)
    unet_config = {**dict(model.unet.config), **MINIMAL_UNET[model.arch]}
    unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    model.unet = UNet2DConditionModel(**unet_config).to(model.dtype).requires_grad_(False)
    trainer = Trainer(model, TrainingData.prepare(read_kohya_folder(dataset), config.data), config)
    trainer.setup()
    return trainer


def _step_inputs(trainer: Trainer, index: int = 0) -> tuple:
    """The arguments `micro_batch_loss` passes to the loss function for micro-batch `index`."""
    captured: list[tuple] = []
    eager = trainer._loss_fn

    def capture(*args):
        captured.append(args)
        return eager(*args)

    trainer._loss_fn = capture
    try:
        with torch.no_grad():
            trainer.micro_batch_loss(index)
    finally:
        trainer._loss_fn = eager
    return captured[0]


# --------------------------------------------------------------------------------------------------
# One graph


def test_the_sd15_fp32_step_is_one_graph_without_breaks(tiny_sd15, dataset):
    """SD1.5 in fp32 here; SDXL in the GPU recipe (bf16 autocast, checkpointing) is traced once, for both its
    one-graph and its compiled == eager checks, by the next test."""
    trainer = _trainer(tiny_sd15, dataset)
    inputs = _step_inputs(trainer)
    assert inputs[-1] is not None  # the mask path is traced too
    torch._dynamo.reset()
    explained = torch._dynamo.explain(trainer.denoising_loss)(*inputs)
    reasons = [f"{b.reason} at {b.user_stack[-1] if b.user_stack else '?'}" for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1
    assert explained.op_count > 50  # the U-Net itself is in the graph, not only the loss around it


# --------------------------------------------------------------------------------------------------
# Compiled == eager


def test_compiled_gpu_recipe_steps_are_one_graph_and_train_the_eager_lora(tiny_sdxl, dataset):
    """Two optimizer steps through ``torch.compile`` (forward and backward) against eager ones, in the GPU
    recipe (bf16 autocast, gradient checkpointing).

    ``setup()`` compiles the same function with the default inductor backend on CUDA. Here the backend is
    ``aot_eager``: the same dynamo graph and AOT-autograd forward/backward split as inductor, without
    generating and building C++ kernels, which takes minutes on two shared CPU cores. The one trace also
    serves the one-graph check: ``fullgraph=True`` raises at a graph break, naming its reason, and the
    recording backend sees every graph dynamo makes.
    """
    from torch._dynamo.backends.debugging import aot_eager

    recipe = {"precision": "bf16", "gradient_checkpointing": True, "steps": 2, "loss_every": 2}
    eager = _trainer(tiny_sdxl, dataset, **recipe)
    compiled = _trainer(tiny_sdxl, dataset, **recipe)
    graphs: list[torch.fx.GraphModule] = []

    def recorded(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    step = torch.compile(compiled.denoising_loss, backend=recorded, fullgraph=True)
    masks: list[bool] = []

    def masked_step(*args):
        masks.append(args[-1] is not None)
        return step(*args)

    compiled._loss_fn = masked_step
    eager.train()
    compiled.train()
    assert masks and all(masks)  # the mask path is traced too
    [graph] = graphs  # one graph for every step
    # The U-Net itself is in the graph, not only the loss around it (operations counted as explain counts).
    assert sum(node.op == "call_function" for node in graph.graph.nodes) > 50
    assert compiled.last_loss == pytest.approx(eager.last_loss, rel=1e-5)
    expected, got = eager.lora_network().state_dict(), compiled.lora_network().state_dict()
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in got.items() if "lora_B" in k)  # it trained
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# No waiting for the device


class _HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (``item()``, ``float(t)``, ``bool(t)``, ``tolist()``,
    ``.cpu()``, ``.numpy()``): on a GPU each one waits for every kernel queued before it."""

    def __init__(self):
        super().__init__()
        self.scalar_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    """A `_HostReads` whose count also includes the tensor methods that copy to the host in one call."""
    mode = _HostReads()
    copies = {"count": 0}
    for name in ("tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            copies["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    mode.copies = copies  # type: ignore[attr-defined]
    return mode


def _fused_optimizer(trainer: Trainer) -> None:
    """The CUDA optimizer (fused AdamW) on the CPU: torch's per-tensor CPU AdamW reads its step count with
    ``item()``, a CPU-only path that the GPU run never takes."""
    assert trainer.optimizer is not None
    groups = [{"params": g["params"], "lr": g["lr"]} for g in trainer.optimizer.param_groups]
    trainer.optimizer = torch.optim.AdamW(groups, weight_decay=trainer.config.optim.weight_decay, fused=True)
    trainer.scheduler = loop.build_scheduler(trainer.optimizer, trainer.config.optim, trainer.config.steps)


def test_steps_read_back_only_the_loss_every_n_steps(tiny_sd15, dataset, host_reads, monkeypatch):
    """6 steps with ``loss_every=2``: four reads (after the first step, then steps 3 and 5, and the last),
    one copy each, and every step reported in order with the loss an every-step read gives."""
    monkeypatch.setattr(loop, "REPORT_SECONDS", float("inf"))  # no read for time's sake on a loaded machine
    trainer = _trainer(tiny_sd15, dataset, steps=6, loss_every=2)
    _fused_optimizer(trainer)
    reports = []
    copies_before = host_reads.copies["count"]  # setup's caching copies to the host on purpose
    with host_reads:
        trainer.train(on_step=reports.append)
    assert host_reads.scalar_reads == 0
    assert host_reads.copies["count"] - copies_before == 4  # one tolist() per read, nothing else
    with host_reads:  # the count does see a read (what a per-step float(loss) would add)
        float(torch.ones(()) * 2)
    assert host_reads.scalar_reads == 1

    every_step = _trainer(tiny_sd15, dataset, steps=6, loss_every=1)
    _fused_optimizer(every_step)
    expected = []
    every_step.train(on_step=expected.append)
    assert [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    assert [r.loss for r in reports] == [r.loss for r in expected]
    assert [r.lr for r in reports] == [r.lr for r in expected]
    assert trainer.last_loss == expected[-1].loss


def test_a_stop_between_reads_still_reports_the_finished_steps(tiny_sd15, dataset, monkeypatch):
    monkeypatch.setattr(loop, "REPORT_SECONDS", float("inf"))
    trainer = _trainer(tiny_sd15, dataset, steps=10, loss_every=4)
    finished = []
    control = Control(should_stop=lambda: len(finished) >= 3)
    reports = []
    with pytest.raises(Cancelled):
        trainer.train(on_step=reports.append, control=control, after_step=finished.append)
    assert trainer.step == 3
    assert [r.step for r in reports] == [1, 2, 3]  # 2 and 3 were not read back before the stop
    assert reports[-1].loss == trainer.state_dict()["loss"]


def test_a_non_finite_loss_names_its_step(tiny_sd15, dataset, monkeypatch):
    monkeypatch.setattr(loop, "REPORT_SECONDS", float("inf"))
    trainer = _trainer(tiny_sd15, dataset, steps=6, loss_every=3)
    eager = trainer._loss_fn
    assert eager is not None
    monkeypatch.setattr(
        trainer, "_loss_fn", lambda *a: eager(*a) * (float("nan") if trainer.step == 1 else 1)
    )
    reports = []
    with pytest.raises(FloatingPointError, match="the loss became nan at step 2"):
        trainer.train(on_step=reports.append)
    assert [r.step for r in reports] == [1]


# --------------------------------------------------------------------------------------------------
# Inputs stay on the device


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_steps_take_their_inputs_from_the_device_tables(arch, tiny_sd15, tiny_sdxl, dataset, monkeypatch):
    """After setup, no step reads the host caches (or encodes text again): latents, text outputs, SDXL's
    size ids and the masks were copied to the device once."""
    trainer = _trainer(tiny_sdxl if arch == "sdxl" else tiny_sd15, dataset, steps=3, flip=True)
    assert trainer._latent_table and trainer._text_table and trainer._mask_table

    def host_read(*args, **kwargs):
        raise AssertionError("a training step read a host-side cache")

    for name in ("latent", "text", "time_ids", "mask"):
        monkeypatch.setattr(TrainingData, name, host_read)
    monkeypatch.setattr(loop, "encode_prompts", host_read)
    monkeypatch.setattr("charforge.engine.train.data.prepare_image", host_read)
    trainer.train()
    assert trainer.step == 3


def test_shuffled_captions_are_encoded_every_step(tiny_sd15, dataset, monkeypatch):
    """The counter-case (so the check above can fail): shuffled captions differ per step, nothing is cached,
    and the step encodes them through the patched `encode_prompts`."""
    trainer = _trainer(tiny_sd15, dataset, steps=1, shuffle_caption=True)
    assert not trainer._text_table
    calls = []
    original = loop.encode_prompts
    monkeypatch.setattr(loop, "encode_prompts", lambda *a, **k: calls.append(1) or original(*a, **k))
    trainer.train()
    assert calls
