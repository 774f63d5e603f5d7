"""``replicate:`` server strings, profiles and the token (driver/config.py), offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from charforge.driver.config import parse_replicate_server, resolve_replicate, resolve_server
from charforge.driver.errors import ConfigError
from charforge.driver.secrets import mask


def test_server_strings() -> None:
    assert parse_replicate_server("replicate:comfyui/any-comfyui-workflow") == (
        "comfyui/any-comfyui-workflow",
        None,
    )
    assert parse_replicate_server("replicate:o/m:0a1b2c3d4e") == ("o/m", "0a1b2c3d4e")
    assert parse_replicate_server("http://127.0.0.1:8188") is None
    for bad in ("replicate:nomodel", "replicate:o/m:NOT-HEX", "replicate:o/m/extra"):
        with pytest.raises(ConfigError, match="replicate:OWNER/MODEL"):
            parse_replicate_server(bad)
    with pytest.raises(ConfigError, match="is a Replicate model, not a ComfyUI server"):
        resolve_server("replicate:o/m", env={}, config_path=Path("/nonexistent"))


def test_profiles_and_token(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "replicate:\n  poll_interval: 0.5\nprofiles:\n  rep:\n    replicate:\n      model: o/m\n"
        "      version: abcdef12\n      token_env: MY_TOKEN\n      hardware: gpu-l40s\n"
        "  comfy:\n    server: http://127.0.0.1:8188\n",
        encoding="utf-8",
    )
    env = {"MY_TOKEN": "r8_from_my_token_var", "REPLICATE_API_TOKEN": "r8_general"}
    settings = resolve_replicate("rep", env=env, config_path=config)
    assert settings is not None
    assert (settings.model, settings.version, settings.server) == (
        "o/m",
        "abcdef12",
        "replicate:o/m:abcdef12",
    )
    assert settings.token is not None and settings.token.reveal() == "r8_from_my_token_var"
    assert settings.options == {"poll_interval": 0.5, "hardware": "gpu-l40s"}
    assert "r8_from_my_token_var" not in repr(settings) and mask("key r8_from_my_token_var") == "key ***"
    plain = resolve_replicate("replicate:x/y", env={"REPLICATE_API_TOKEN": "r8_general"}, config_path=config)
    assert plain is not None and plain.token is not None and plain.token.reveal() == "r8_general"
    assert resolve_replicate("comfy", env=env, config_path=config) is None
    assert resolve_replicate("http://127.0.0.1:8188", env=env, config_path=config) is None
    with pytest.raises(ConfigError, match="MY_TOKEN"):
        resolve_replicate("rep", env={}, config_path=config)
