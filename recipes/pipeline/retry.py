"""The images stage's retries: a best-of-N round whose pick is below threshold is generated again with new seeds.

One round is the stage's best-of-N workflow as it always ran (N candidates in one batch, scored, the best
kept). After it, the pick -- the candidate Best of N kept, read from its report -- is checked with the storyboard
retries' policy (:mod:`charforge.recipes.story_retry`): CLIPScore (2.5 x CLIP cosine) at least ``min_text``
where the workflow measures CLIP, identity at least ``min_identity`` (default: the identity's suggested
threshold) where it scores faces. A round whose pick fails is run again with the sampler seed of the next
attempt (:func:`~charforge.recipes.story_retry.attempt_seed`), up to ``retries`` more rounds. Every round's
candidates and scores are returned for the pipeline state; the kept round is the first that passed, else the
best pick by identity + text (the storyboard's rule). Per-candidate values come from the score nodes' ``scores``
UI output (the score sheet as JSON) and the pick from Best of N's ``picks`` UI output; a server that does not
report them gets one round, recorded as unscored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..story_retry import SAME_PERSON, RetryPolicy, attempt_seed, clipscore, rank, score_failures


def _nodes(prompt: dict[str, Any], class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


def _reported(result: Any, node_id: str | None, key: str) -> Any:
    """The first value of a node's ``key`` UI output in the job's result, or None."""
    outputs = getattr(result, "outputs", None) or {}
    ui = outputs.get(node_id) if node_id is not None else None
    reported = ui.get(key) if isinstance(ui, dict) else None
    return reported[0] if reported else None


def _sheet(result: Any, node_id: str | None) -> dict[str, Any] | None:
    """The score sheet a CharForge score node reported (its ``scores`` UI output), or None."""
    try:
        return json.loads(_reported(result, node_id, "scores"))
    except (TypeError, ValueError):
        return None


def _pick(result: Any, node_id: str | None) -> int | None:
    """The candidate Best of N kept in the (first) group (its ``picks`` UI output), or None."""
    first = str(_reported(result, node_id, "picks") or "").split(",")[0]
    return int(first) if first.isdigit() else None


def round_scores(
    prompt: dict[str, Any], result: Any, policy: RetryPolicy
) -> tuple[list[dict[str, Any]], int | None, float | None]:
    """Every candidate's identity / CLIP cosine / CLIPScore / passed / why, the pick's index and the identity
    threshold used (the given one, else the identity's suggested threshold)."""
    identity_nodes = _nodes(prompt, "CharForgeScoreIdentity")
    clip_nodes = _nodes(prompt, "CharForgeClipScore")
    identity = _sheet(result, identity_nodes[0] if identity_nodes else None)
    clip = _sheet(result, clip_nodes[0] if clip_nodes else None)
    min_identity = policy.min_identity
    if identity is not None and min_identity is None:
        min_identity = identity.get("threshold") or SAME_PERSON
    checked = RetryPolicy(policy.retries, policy.min_text, min_identity if identity is not None else None)
    rows = max(len((identity or {}).get("images", [])), len((clip or {}).get("images", [])))
    candidates = []
    for index in range(rows):
        face = (identity or {}).get("images", [])[index]["value"] if identity is not None else None
        cosine = clip["images"][index]["value"] if clip is not None else None
        why = score_failures(face, cosine, checked)
        candidates.append(
            {
                "index": index,
                "identity": face,
                "text": cosine,
                "clipscore": clipscore(cosine),
                "passed": not why,
                "why": "; ".join(why),
            }
        )
    best = _nodes(prompt, "CharForgeBestOfN")
    pick = _pick(result, best[0] if best else None)
    pick = pick if pick is not None and pick < len(candidates) else None
    return candidates, pick, min_identity if identity is not None else None


def best_of_n_rounds(
    prompt: dict[str, Any],
    policy: RetryPolicy,
    run_round: Callable[[dict[str, Any], int], tuple[Any, dict[str, str], list[Path]]],
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], int]:
    """Run `prompt` (its KSampler seed is attempt 0) until its pick passes or the retries are spent.

    ``run_round(prompt, round)`` runs one round (round 0 is the first) and returns (result, UI texts, files).
    Returns every round's record and the index of the kept round."""
    (sampler,) = _nodes(prompt, "KSampler")
    seed = int(prompt[sampler]["inputs"]["seed"])
    rounds: list[dict[str, Any]] = []
    for attempt in range(policy.retries + 1):
        prompt[sampler]["inputs"]["seed"] = attempt_seed(seed, attempt)
        result, texts, files = run_round(prompt, attempt)
        candidates, pick, min_identity = round_scores(prompt, result, policy)
        scored = bool(candidates)
        chosen = candidates[pick] if pick is not None else None
        passed = (
            chosen["passed"] if chosen is not None else any(c["passed"] for c in candidates) or not scored
        )
        rounds.append(
            {
                "round": attempt + 1,
                "seed": attempt_seed(seed, attempt),
                "pick": pick,
                "passed": passed,
                "scored": scored,
                "min_identity": min_identity,
                "candidates": candidates,
                "texts": texts,
                "files": [str(f) for f in files],
            }
        )
        if passed:
            break
        why = chosen["why"] if chosen is not None else "no candidate passes"
        if attempt < policy.retries:
            say(
                f"images: round {attempt + 1} below threshold ({why}): generating again with seed "
                f"{attempt_seed(seed, attempt + 1)}"
            )
    prompt[sampler]["inputs"]["seed"] = seed

    def key(i: int) -> tuple:
        record = rounds[i]
        chosen = record["candidates"][record["pick"]] if record["pick"] is not None else None
        if chosen is None:
            return (record["passed"], 0.0)
        return rank(chosen["identity"], chosen["text"], record["passed"])

    kept = max(range(len(rounds)), key=key)
    return rounds, kept


def _saves(prompt: dict[str, Any]) -> dict[str, str]:
    return {n: prompt[n]["inputs"]["filename_prefix"] for n in _nodes(prompt, "SaveImage")}


def _best_save(prompt: dict[str, Any]) -> str | None:
    best = _nodes(prompt, "CharForgeBestOfN")
    found = [n for n in _nodes(prompt, "SaveImage") if best and prompt[n]["inputs"]["images"][0] == best[0]]
    return found[0] if found else None


def run_images(
    runner: Any,
    prompt: dict[str, Any],
    policy: RetryPolicy,
    out_dir: Path,
    header: str,
    nodes: tuple[str, str],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The images stage's best of N with retries: every round's files land in `out_dir` (rounds 2+ with
    ``_roundK`` in their names), ``scores.txt`` gets each round's score and pick reports; returns the stage's
    record: files, scores, the kept round's best image(s) and the rounds (``retries``)."""
    prefixes = _saves(prompt)
    best_save = _best_save(prompt)

    def run_round(prompt: dict[str, Any], attempt: int) -> tuple[Any, dict[str, str], list[Path]]:
        tag = "" if attempt == 0 else f"_round{attempt + 1}"
        for node_id, prefix in prefixes.items():
            prompt[node_id]["inputs"]["filename_prefix"] = prefix + tag
        return runner.run(prompt, out_dir, previews=f"score_table{tag}")

    rounds, kept = best_of_n_rounds(prompt, policy, run_round, say)
    for node_id, prefix in prefixes.items():
        prompt[node_id]["inputs"]["filename_prefix"] = prefix
    best_name = Path(prefixes[best_save]).name if best_save else None
    for record in rounds:
        tag = "" if record["round"] == 1 else f"_round{record['round']}"
        record["best"] = [
            f for f in record["files"] if best_name and Path(f).name.startswith(f"{best_name}{tag}_")
        ]
    sections = [header]
    for record in rounds:
        texts = record.pop("texts")
        if len(rounds) > 1 or not record["passed"]:
            sections.append(f"round {record['round']} (seed {record['seed']}): {_verdict(record)}")
        sections += [texts.get(nodes[0], ""), texts.get(nodes[1], "")]
    passed = rounds[kept]["passed"]
    if len(rounds) > 1 or not passed:
        sections.append(
            f"kept round {kept + 1} of {len(rounds)}"
            + ("" if passed else f": no pick passed the thresholds in {len(rounds)} round(s)")
        )
    scores = out_dir / "scores.txt"
    scores.parent.mkdir(parents=True, exist_ok=True)
    scores.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return {
        "files": [f for record in rounds for f in record["files"]],
        "scores": str(scores),
        "best": rounds[kept]["best"],
        "retries": {
            "retries": policy.retries,
            "min_text": policy.min_text,
            "text_scale": "CLIPScore = 2.5 x max(CLIP cosine, 0)",
            "min_identity": policy.min_identity,
            "rounds": rounds,
            "kept_round": kept + 1,
            "passed": passed,
        },
    }


def _verdict(record: dict[str, Any]) -> str:
    if not record["scored"]:
        return "scores not reported by the server (not checked)"
    if record["pick"] is None:
        return "passed" if record["passed"] else "no candidate passed"
    chosen = record["candidates"][record["pick"]]
    return f"pick {record['pick']} " + ("passed" if record["passed"] else f"below threshold: {chosen['why']}")
