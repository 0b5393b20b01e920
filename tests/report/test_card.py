"""The model card speaks to a deployer: what to read first, intended use, provenance, figures with intervals,
the threshold's effect, limitations; each from the run and its report, not made up."""

from __future__ import annotations

import json
from pathlib import Path

from medfusion_fl.config import RunConfig
from medfusion_fl.report import card as sections

ORDER = ("run_status", "read_first", "intended_use", "data", "performance", "operating_threshold", "limitations",
         "inputs", "privacy")


def test_the_card_opens_with_what_a_deployer_needs(exported_run: Path) -> None:
    card = json.loads((exported_run / "exported" / "model_card.json").read_text())
    numbers = json.loads((exported_run / "exported" / "report" / "evaluation.json").read_text())
    keys = list(card)
    assert [keys.index(k) for k in ORDER] == sorted(keys.index(k) for k in ORDER)
    assert keys.index("read_first") <= 3  # right after the model's name, date and run status
    status = card["run_status"]  # the fixture's run stopped after round 2 of its 3
    assert (status["status"], status["rounds"], status["planned"]) == ("ended early", 2, 3)
    assert "it was stopped, or is still running" in status["reason"]
    assert card["read_first"][0] == status["summary"]
    assert card["read_first"][1: 1 + len(numbers["warnings"])] == numbers["warnings"]
    assert card["read_first"][-1] == "Synthetic data: this model is a demonstration, not for clinical use."
    assert "NOT for any clinical use" in card["intended_use"]["statement"]
    assert card["data"]["statement"].startswith("SYNTHETIC") and card["data"]["held_out"]["patients"] == 40
    assert card["limitations"][0].startswith("Trained and evaluated on synthetic patients only")

    performance = card["performance"]
    assert performance["auroc"] == numbers["auroc"] and performance["auroc"]["ci95-low"] is not None
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        assert performance["at_0.5"][key] == numbers["at_0.5"]["intervals"][key]
        assert performance["at_operating_threshold"][key] == numbers["at_operating_threshold"]["intervals"][key]
    at = numbers["at_operating_threshold"]
    assert card["operating_threshold"]["effect_on_held_out"].startswith(
        f"{at['called_positive']} of {at['patients']} held-out patients called positive")
    assert "/ 255" in card["inputs"]["views"] and "as loaded" not in card["inputs"]["views"]


def test_intended_use_follows_the_data_source_and_the_deployers_words() -> None:
    folders = RunConfig.from_flat({"data.source": "folders"})
    assert sections.intended_use(folders)["statement"].startswith("Research use: a 2-class classifier")
    said = RunConfig.from_flat({"data.source": "folders", "report.intended-use": "Triage of chest radiographs."})
    got = sections.intended_use(said)
    assert (got["statement"], got["stated_by"]) == ("Triage of chest radiographs.", "report.intended-use")
    assert sections.read_first(folders, None, {})[0].startswith("No held-out evaluation")
    ended = {"status": "ended early", "summary": "run ENDED EARLY: 2 of 3 rounds (budget)"}
    assert sections.read_first(folders, None, ended)[0] == ended["summary"]
    assert ended["summary"] in sections.limitations(folders, None, ended)
