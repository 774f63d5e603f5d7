"""The ComfyUI stand-ins behave like ComfyUI 0.3.64 where the pack relies on them.

tests/cf_testing/stub_scenario.py (run by cf_testing/stub_record.py) makes the same calls on either
implementation. Its record from a real ComfyUI 0.3.64 is stored next to it; the stand-ins must reproduce it
exactly. The real-ComfyUI suite (tests/integration/test_real_comfyui_stubs.py) re-runs the scenario on a live
ComfyUI against the same file.
"""

import json
import sys

from cf_testing.comfyui import STUBS_DIR
from cf_testing.stub_record import RECORDED, run_scenario


def test_stand_ins_match_recorded_comfyui(tmp_path):
    expected = json.loads(RECORDED.read_text())
    actual = run_scenario(sys.executable, str(STUBS_DIR), tmp_path)
    differences = {
        k: (actual.get(k), expected.get(k))
        for k in set(actual) | set(expected)
        if actual.get(k) != expected.get(k)
    }
    assert not differences, f"stand-in vs ComfyUI 0.3.64: {differences}"
