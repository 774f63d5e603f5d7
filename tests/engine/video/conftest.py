"""The video engine tests' shared assets: the tiny SD1.5 / SDXL models, motion modules and LoRAs
(`cf_testing.video_models.video_assets`, built once per process); the video model cache is emptied after
each module that used them."""

from __future__ import annotations

import pytest

from cf_testing.video_models import video_assets
from charforge.engine.video.models import unload_video_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    yield video_assets(tmp_path_factory.getbasetemp() / "video_assets")
    unload_video_model()
