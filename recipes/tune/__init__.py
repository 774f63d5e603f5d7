"""``charforge tune``: find the best LoRA settings with Optuna, trials trained and scored across a server pool.

- :mod:`.spec`: the search file (space, budget, objectives, pruning, evaluation set), parsed without a server
- :mod:`.trials`: one trial on one server (training segments, evaluation renders, scores) through the batch runner
- :mod:`.scores`: per-image and set scores (identity, text, diversity, CLIP-feature MMD / KID, copying, FID)
- :mod:`.search`: :class:`~.search.Tuner`, the study in SQLite, one worker per server, budgets, resume
- :mod:`.report`: report.html and its PNGs, trials.json, best.yaml, the best LoRA and its preset
- :mod:`.bench`: ``charforge lora bench``, the same scores for given LoRAs and the base model

Needs Optuna (``pip install "charforge[tune]"``) and the scoring extras (``charforge[nodes,faces]``).
"""

from .spec import TuneSpec, load_spec, parse_spec

__all__ = ["TuneSpec", "load_spec", "parse_spec"]
