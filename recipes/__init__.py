"""Recipes: multi-stage runs that drive ComfyUI servers through the driver *and* use engine code locally.

- `pipeline`: photos -> dataset -> captions -> LoRA -> scored images -> video (``charforge pipeline``)
- `story`: storyboards in simple / reference-guided / base modes (``charforge story``)
- `lora_eval`: a LoRA's strength x prompt x seed grid, scored for identity and text (``charforge lora eval``)
- `cli`: the ``charforge`` command: the driver's command groups and the recipes' (``story``, ``lora``,
  ``character``, ``pipeline``)

Recipes may import the driver, the engine and ``charforge.common``; neither of those imports a recipe
(tests/pack/test_architecture.py). Engine code that needs torch, numpy or Pillow is imported when a recipe
runs, so the ``charforge`` command starts without them.
"""
