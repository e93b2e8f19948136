from __future__ import annotations

import pytest
from pydantic import ValidationError

from latency_models.wire import HeartbeatRequest


@pytest.mark.parametrize("body", ['{"progress": false}', '{"progress": true}', '{"job_id": true}',
                                  '{"progress": 1.0}'])
def test_a_boolean_or_a_float_is_not_an_id_or_a_count(body: str) -> None:
    # Found by the OpenAPI fuzz test: lax pydantic read `false` as progress 0 and accepted a body
    # that breaks the published schema.
    with pytest.raises(ValidationError):
        HeartbeatRequest.model_validate_json(body)


def test_ids_and_counts_still_parse() -> None:
    beat = HeartbeatRequest.model_validate_json('{"job_id": 7, "progress": 0}')
    assert (beat.job_id, beat.progress) == (7, 0)
