"""`AuditConfig`: one place for an audit's settings, read by the verb, the report and the same-arguments check."""

from __future__ import annotations

import json

import pytest

import hub_dfq
from hub_dfq.audit.config import AuditConfig
from hub_dfq.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_config_round_trips_through_json():
    config = AuditConfig(limit=500, references={"far": 1.0, "near": 0.01}, metric="w2", reference_budget_gmacs=None)
    assert AuditConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert AuditConfig.from_dict({}) == AuditConfig()
    with pytest.raises(ConfigError, match=r"unknown audit setting\(s\) \['token'\]"):
        AuditConfig.from_dict({"token": "hf_secret"})


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 0}, "batch sizes must be positive"),
    ({"bootstrap": -1}, "`bootstrap` must be >= 0"),
    ({"references": "far"}, "references must be one of"),
    ({"metric": "l1"}, "unknown"),
], ids=["batch", "bootstrap", "references", "metric"])
def test_a_config_is_checked_when_made(changes, message):
    with pytest.raises(ConfigError, match=message):
        AuditConfig(**changes)


def test_the_report_records_its_settings_in_the_order_it_always_did():
    settings = AuditConfig(references={"far": 1.0}).reported(normalisation="one-point")
    assert list(settings) == ["limit", "batch_size", "score_batch", "metric", "references", "reference_images",
                              "bootstrap", "seed", "split", "normalisation", "reference_budget_gmacs"]
    assert settings["references"] == "given"


def test_a_config_and_keywords_give_the_same_audit(model):
    data = {"clean": hub_dfq.load_images("default", limit=32)}
    by_keywords = hub_dfq.audit(model, data, references="gaussian", bootstrap=20, score_batch=16, cache=False,
                                progress=False)
    config = AuditConfig(references="gaussian", bootstrap=20, score_batch=16, cache=False)
    by_config = hub_dfq.audit(model, data, config, progress=False)
    assert by_config.to_dict() == by_keywords.to_dict()
    # keywords override the config's fields; a keyword that is no setting is refused
    overridden = hub_dfq.audit(model, data, config.to_dict(), bootstrap=0, progress=False)
    assert overridden.settings["bootstrap"] == 0 and overridden["clean"].ci is None
    with pytest.raises(TypeError, match=r"unknown audit setting\(s\) \['bootstraps'\]"):
        hub_dfq.audit(model, data, config, bootstraps=0)
    with pytest.warns(FutureWarning, match="use `reference_iters`"):
        hub_dfq.audit(model, data, references="none", reference_steps=3, bootstrap=0, progress=False)
