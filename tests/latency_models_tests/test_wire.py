from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.encoders import jsonable_encoder
from pydantic import ValidationError

from latency_models.wire import BatchResultBody, HeartbeatRequest, ResultBody

MEASUREMENT = {"profile": "p", "backend": "onnxruntime", "backend_version": "1", "device": "cpu", "threads": 1,
               "median_us": 10.0, "p10_us": 9.0, "p90_us": 11.0, "mean_us": 10.0, "stdev_us": 0.5, "n": 50,
               "ci_low_us": 9.5, "ci_high_us": 10.5, "converged": True, "elapsed_s": 0.2,
               "artifact_sha256": "a" * 64, "settings_fingerprint": "f" * 16}


@pytest.mark.parametrize("body", ['{"progress": false}', '{"progress": true}', '{"job_id": true}',
                                  '{"progress": 1.5}', '{"progress": "3"}', '{"job_id": "7"}'])
def test_a_boolean_or_a_string_is_not_an_id_or_a_count(body: str) -> None:
    # Found by the OpenAPI fuzz test: lax pydantic read `false` as progress 0 and accepted a body
    # that breaks the published schema.
    with pytest.raises(ValidationError):
        HeartbeatRequest.model_validate_json(body)


def test_ids_and_counts_still_parse() -> None:
    beat = HeartbeatRequest.model_validate_json('{"job_id": 7, "progress": 0}')
    assert (beat.job_id, beat.progress) == (7, 0)


def test_an_integral_decimal_is_the_integer_json_schema_says_it_is() -> None:
    # issue 34: schemathesis sent progress 40923.0, valid for the schema's "integer", and was refused
    beat = HeartbeatRequest.model_validate_json('{"job_id": 7.0, "progress": 40923.0}')
    assert (beat.job_id, beat.progress) == (7, 40923)


NOT_NUMBERS = [(field, value) for field in ("n", "threads", "p10_us", "mean_us", "stdev_us", "ci_low_us",
                                             "elapsed_s", "median_us") for value in (True, False, "1")]


@pytest.mark.parametrize(("field", "value"), [*NOT_NUMBERS, ("converged", 1), ("converged", "true"),
                                              ("median_us", None)])
def test_a_measurement_takes_no_boolean_or_string_for_a_number(field: str, value: Any) -> None:
    # issue 34: the hub stored {"n": true} as n=1 (and so for each of these fields)
    with pytest.raises(ValidationError):
        ResultBody.model_validate({"measurement": {**MEASUREMENT, field: value}})


def test_a_figure_the_schema_allows_is_parsed_and_one_it_forbids_is_refused() -> None:
    body = ResultBody.model_validate_json(json.dumps({"measurement": MEASUREMENT, "ratio": 1, "ratio_ci": [1, 1]}))
    assert body.to_result().measurement.median_us == 10.0 and body.inconsistencies() == []
    with pytest.raises(ValidationError):
        ResultBody.model_validate({"measurement": {**MEASUREMENT, "median_us": 0.0}})
    with pytest.raises(ValidationError):
        BatchResultBody.model_validate({"profile": "p", "backend": "b", "backend_version": "1", "device": "d",
                                        "layers_us": [1.0],
                                        "plans": [{"median_us": 0, "ratio": 1, "ratio_ci": [1, 1]}]})


def test_what_no_schema_can_say_is_an_inconsistency_not_a_refusal() -> None:
    unordered = ResultBody.model_validate({"measurement": {**MEASUREMENT, "p10_us": 12.0}, "ratio": 2.0,
                                           "ratio_ci": [0.5, 1.0]})
    found = unordered.inconsistencies()
    assert any("percentiles" in f for f in found) and any("outside its interval" in f for f in found)


def test_a_result_round_trips_through_its_wire_body() -> None:
    body = ResultBody.model_validate({"measurement": MEASUREMENT, "ratio": 0.5, "ratio_ci": [0.4, 0.6]})
    again = ResultBody.of(body.to_result())
    assert jsonable_encoder(again) == jsonable_encoder(body)
