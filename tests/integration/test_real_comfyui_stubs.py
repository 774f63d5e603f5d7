"""Opt-in: the recorded ComfyUI behaviour the stand-ins are held to still matches a live ComfyUI."""

import json

import pytest

from cf_testing.real_comfyui import comfyui_dir, comfyui_python

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(comfyui_dir() is None, reason="set COMFYUI_DIR to run the real-ComfyUI suite"),
]


def test_real_comfyui_matches_the_recording(tmp_path):
    from cf_testing.stub_record import RECORDED, run_scenario

    comfy = comfyui_dir()
    actual = run_scenario(comfyui_python(comfy), str(comfy), tmp_path, cwd=comfy)
    expected = json.loads(RECORDED.read_text())
    differences = {
        k: (actual.get(k), expected.get(k))
        for k in set(actual) | set(expected)
        if actual.get(k) != expected.get(k)
    }
    assert not differences, f"this ComfyUI differs from the recorded 0.3.64 behaviour: {differences}"
