"""charforge.common: the values the pack and the driver share (retry policy, config path, model folders, presets)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from charforge.common.characters import GenerationParams, default_size
from charforge.common.config_file import config_path
from charforge.common.model_folders import COMFY_MODEL_FOLDERS, PACK_MODEL_FOLDERS, all_model_folders
from charforge.common.retry import Backoff, retry_after_seconds


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(" 2.5 ") == 2.5
    assert retry_after_seconds("-3") == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("") is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)


def test_backoff_is_jittered_exponential_and_capped():
    policy = Backoff(attempts=4, base=1.0, cap=20.0, jitter=0.5)
    rng = random.Random(1)
    for retry in range(8):
        delay = policy.delay(retry, rng=rng.random)
        assert min(20.0, 2**retry) * 0.5 <= delay <= min(20.0, 2**retry)
    assert Backoff(base=1.0, jitter=0.0).delay(3) == 8.0
    assert Backoff(base=1.0, jitter=1.0).delay(3, rng=lambda: 0.5) == 4.0  # full jitter
    assert policy.retries == 3 and not policy.is_last(2) and policy.is_last(3)


def test_backoff_takes_retry_after_but_never_waits_past_the_cap():
    policy = Backoff(base=1.0, cap=20.0)
    assert policy.delay(0, retry_after=7.0) == 7.0
    assert policy.delay(5, retry_after=0.0) == 0.0
    assert policy.delay(0, retry_after=120.0) == 20.0


def test_backoff_refuses_settings_that_cannot_work():
    with pytest.raises(ValueError, match="attempt"):
        Backoff(attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=1.5)


def test_config_path_honours_charforge_config_then_xdg_then_home():
    assert config_path({"CHARFORGE_CONFIG": "/etc/cf.yaml", "XDG_CONFIG_HOME": "/x"}) == Path("/etc/cf.yaml")
    assert config_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/charforge/config.yaml")
    assert config_path({}) == Path.home() / ".config" / "charforge" / "config.yaml"


def test_the_pack_and_the_driver_read_the_same_config_file(no_comfy, monkeypatch, tmp_path):
    from charforge import bridge
    from charforge.driver.config import resolve_server

    monkeypatch.delenv("CHARFORGE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "charforge").mkdir(parents=True)
    (tmp_path / "xdg" / "charforge" / "config.yaml").write_text(
        f"models:\n  dir: {tmp_path / 'models'}\nprofiles:\n  studio:\n    server: http://studio:8188\n"
    )
    assert str(resolve_server(profile="studio").url).startswith("http://studio:8188")
    assert str(tmp_path / "models" / "loras") in bridge.model_folders("loras")


def test_yaml_aliases_are_refused_in_batch_specs_and_the_config_file(tmp_path):
    from charforge.driver.batch import BatchError, load_batch
    from charforge.driver.config import load_config_file
    from charforge.driver.errors import ConfigError

    bomb = "a: &a [1, 2]\nb: [*a, *a]\n"
    (tmp_path / "sweep.yaml").write_text(bomb)
    with pytest.raises(BatchError, match="aliases"):
        load_batch(tmp_path / "sweep.yaml")
    (tmp_path / "config.yaml").write_text(bomb)
    with pytest.raises(ConfigError, match="aliases"):
        load_config_file(tmp_path / "config.yaml")


def test_every_model_folder_is_in_the_one_table():
    table = all_model_folders()
    assert [key for key in table if key not in COMFY_MODEL_FOLDERS] == [f.key for f in PACK_MODEL_FOLDERS]
    assert table["diffusion_models"] == ("unet", "diffusion_models") and table["blip"] == ("blip",)


def test_preset_sizes_follow_the_base_model():
    assert default_size("sdxl") == 1024 and default_size("sd15") == 512 and default_size("") == 512
    assert (GenerationParams().width, GenerationParams().sampler) == (
        1024,
        "euler",
    )  # a preset's own defaults


def test_common_imports_nothing_heavy():
    code = (
        "import sys, charforge.common.characters, charforge.common.config_file, charforge.common.model_folders, "
        "charforge.common.retry, charforge.common.safe_yaml; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL', 'yaml') "
        "or (m.startswith('charforge.') and not m.startswith('charforge.common'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
