"""`featurescope contrast A.txt B.txt` and `featurescope detect DETECTOR prompts` as installed, over the tiny
Gemma 2's published run: the same ranking as the server's, a saved detector the page lists, its scores and
AUROC on labelled prompts, and clear errors (exit 2)."""

from __future__ import annotations

import json

import numpy as np

from featurescope.app.contrast import auroc
from featurescope.app.detectors import DetectorStore
from test_cli import run
from test_contrast import CODE, PROSE


def _sets(tmp_path):
    (tmp_path / "code.txt").write_text("\n".join(CODE) + "\n")
    (tmp_path / "prose.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in PROSE) + "\n")
    return str(tmp_path / "code.txt"), str(tmp_path / "prose.jsonl")


def test_contrast_prints_the_ranking_and_saves_a_detector_that_detect_scores_with_an_auroc(live_data_dir, tmp_path):
    a, b = _sets(tmp_path)
    result = run("contrast", a, b, "--data-dir", str(live_data_dir), "--device", "cpu", "--top", "5", "--json",
                 "--save-detector", "cli-code", "--k", "3")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 5 and rows == sorted(rows, key=lambda r: -max(r["auroc"], 1 - r["auroc"]))
    assert rows[0]["n_a"] == len(CODE) and rows[0]["n_b"] == len(PROSE)
    assert "Saved detector 'cli-code'" in result.stderr
    (doc,) = DetectorStore(live_data_dir / "detectors.sqlite").find("cli-code")
    assert doc["sets"]["a"]["label"] == "code" and len(doc["features"]) == 3

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("\n".join([json.dumps({"text": t, "label": 1}) for t in CODE] +
                                  [json.dumps({"text": t, "label": 0}) for t in PROSE]) + "\n")
    scored = run("detect", "cli-code", str(labelled), "--data-dir", str(live_data_dir), "--device", "cpu")
    assert scored.returncode == 0, scored.stderr
    lines = scored.stdout.splitlines()
    scores = np.array([float(line.split()[0]) for line in lines[:-1]])
    assert len(scores) == len(CODE) + len(PROSE)
    expected = auroc(scores[:len(CODE), None], scores[len(CODE):, None])[0]
    assert lines[-1].startswith(f"AUROC {expected:.3f} (8 prompts labelled code, 8 prose)")

    (tmp_path / "det.json").write_text(json.dumps({"detector": doc}))
    from_file = run("detect", str(tmp_path / "det.json"), a, "--data-dir", str(live_data_dir), "--device", "cpu")
    assert from_file.returncode == 0 and from_file.stdout.splitlines() == lines[:len(CODE)]  # no labels: no AUROC


def test_contrast_and_detect_errors_are_one_clear_sentence(live_data_dir, tmp_path):
    a, b = _sets(tmp_path)
    unknown = run("contrast", a, b, "--data-dir", str(live_data_dir), "--sae", "nope", "--device", "cpu")
    assert unknown.returncode == 2 and "has no SAE 'nope'" in unknown.stderr
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = run("contrast", a, str(tmp_path / "empty.txt"), "--data-dir", str(live_data_dir), "--device", "cpu")
    assert empty.returncode == 2 and "Set B is empty" in empty.stderr
    missing = run("detect", "no-such-detector", a, "--data-dir", str(live_data_dir), "--device", "cpu")
    assert missing.returncode == 2 and "No detector named 'no-such-detector'" in missing.stderr
