"""Every page's JSON twin is typed: /-/openapi.json documents it with its response model, the real app's
answers over the factory data dir validate against those models (no key more, none missing), and
schemathesis, generating requests from the document, finds no server error and no answer the document
does not describe."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from factories import make_app_client, shared_data_dir
from featurescope.app import twin_models as tm

MODEL, SAE = "tiny-gemma-2", "2-res-64"
TWINS = {  # path in the document -> the model its 200 answer is documented with
    "/.json": "HomeView",
    "/{model_id}.json": "ModelView",
    "/{model_id}/{sae_id}.json": "SAEView",
    "/{model_id}/{sae_id}/{index}.json": "FeatureView",
    "/{model_id}/{sae_id}/{index}/-/lineage.json": "LineageView",
    "/{model_id}/-/encode.json": "EncodeView",
    "/{model_id}/{sae_id}/{index}/-/test.json": "FeatureTestView",
    "/{model_id}/-/steer.json": "SteerView",
    "/{model_id}/-/contrast.json": "ContrastFormView",
    "/{model_id}/-/contrast/{run_id}.json": "ContrastRunView",
    "/{model_id}/-/detectors/{name}.json": "DetectorView",
    "/{model_id}/-/explanations.json": "ExplanationSearchView",
    "/-/health": "Health",
}


@pytest.fixture(scope="module")
def client():
    with make_app_client(shared_data_dir(), live=False) as c:
        yield c


def test_the_api_document_lists_every_twin_with_its_response_model(client):
    paths = client.get("/-/openapi.json").json()["paths"]
    assert set(paths) == set(TWINS)  # the HTML pages and redirects are not part of the API
    for path, name in TWINS.items():
        ok = paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["$ref"] == f"#/components/schemas/{name}", path


@pytest.mark.parametrize("url,model", [
    ("/.json", tm.HomeView),
    (f"/{MODEL}.json", tm.ModelView),
    (f"/{MODEL}/{SAE}.json", tm.SAEView),
    (f"/{MODEL}/{SAE}.json?show=dense&sort=density&desc=1&token=Paris&min_density=0.001", tm.SAEView),
    (f"/{MODEL}/{SAE}/0.json", tm.FeatureView),  # fires on the hostile tokens
    (f"/{MODEL}/{SAE}/10.json", tm.FeatureView),  # dead
    (f"/{MODEL}/4-mlp-48/3.json?text=hi", tm.FeatureView),
    (f"/{MODEL}/4-mlp-48/3/-/lineage.json", tm.LineageView),
    (f"/{MODEL}/2-res-64/0/-/lineage.json?by=cosine&depth=1", tm.LineageView),
    ("/-/health", tm.Health),
    (f"/{MODEL}/-/explanations.json?q=error", tm.ExplanationSearchView),  # no explanations file: no results
    ("/no-model.json", tm.NotFoundError),
    (f"/{MODEL}/{SAE}/64.json", tm.NotFoundError),
    ("/no/such/page/at/all.json", tm.NotFoundError),
    (f"/{MODEL}/{SAE}.json?size=0", tm.InvalidParameterError),
    (f"/{MODEL}/-/encode.json?text=hi", tm.UnavailableError),  # live encoding is off
    (f"/{MODEL}/-/contrast.json", tm.ContrastFormView),
    (f"/{MODEL}/-/contrast/no-such-run.json", tm.NotFoundError),
    (f"/{MODEL}/-/detectors/no-such-detector.json", tm.NotFoundError),
])
def test_each_twin_answers_exactly_its_documented_model(client, url, model):
    TypeAdapter(model).validate_python(client.get(url).json())


# ------------------------------------------------------------------------------------------ schemathesis
def test_generated_requests_get_documented_answers_and_no_server_error():
    """For every operation of the document, requests generated from it (mostly unknown ids and bad values, so
    404 and 422 must be documented too) against the real app over the factory data dir: no 5xx, and every
    status, content type and body as documented. (Driven by hypothesis directly: schemathesis' pytest plugin
    does not run under this pytest.)"""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    from featurescope.app import Settings, create_app

    schema = schemathesis.openapi.from_asgi("/-/openapi.json", create_app(Settings(data_dir=shared_data_dir(), live=False)))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(TWINS)
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def answers_as_documented(case):
            case.call_and_validate(checks=checks)

        answers_as_documented()
