"""The dataset report with hostile file names: newline, tab, markup, right-to-left override."""

import json
from pathlib import Path

from PIL import Image

from charforge.engine.dataset import load_folder, write_report
from charforge.engine.dataset.report import visible

NAMES = ["line\nbreak.png", "tab\there.png", "<script>alert(1).png", "\u202egnp.evil.png"]


def test_report_with_newline_tab_markup_and_rtl_names(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, name in enumerate(NAMES):
        Image.new("RGB", (48, 40), (40 * index, 90, 200)).save(photos / name)
    manifest = load_folder(photos, tmp_path / "ds", workers=1)
    assert sorted(e.name for e in manifest.entries) == sorted(NAMES)

    out = write_report(manifest, thumb_size=64, workers=1)  # drawing a label with "\n" used to raise

    data = json.loads(Path(out["json"]).read_text(encoding="utf-8"))
    assert sorted(row["name"] for row in data["images"]) == sorted(NAMES)  # JSON keeps the real names
    page = Path(out["html"]).read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1).png" in page
    assert "\u202e" not in page and "\\u202egnp.evil.png" in page
    assert "line\\nbreak.png" in page and "tab\\there.png" in page
    assert len(out["sheets"]) == 1


def test_visible_escapes_only_invisible_characters():
    assert visible("Élodie été 東京.png") == "Élodie été 東京.png"
    assert visible("a\nb\rc\td\x00e\u2028f\u200fg") == "a\\nb\\rc\\td\\x00e\\u2028f\\u200fg"
    assert visible(visible("a\nb")) == "a\\nb"  # drawing code may apply it twice


def test_kohya_dataset_toml_stays_valid_with_control_characters(tmp_path):
    from cf_testing.compat import tomllib
    from charforge.engine.dataset.export import dataset_toml
    from charforge.engine.dataset.manifest import DatasetManifest

    folder = tmp_path / 'odd\nfolder "quoted" \\ back'
    text = dataset_toml(folder, 3, "ohwx\twoman\x7f", DatasetManifest(name="x", folder=str(tmp_path)))
    subset = tomllib.loads(text)["datasets"][0]["subsets"][0]
    assert subset["image_dir"] == folder.as_posix() and subset["class_tokens"] == "ohwx\twoman\x7f"
