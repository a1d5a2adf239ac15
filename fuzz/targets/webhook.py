"""Fuzz target: a request body POSTed to the admission webhook's `/inject`
(meshproxy/kube/webhook.py), through its aiohttp handler, with the namespace `shop` labelled
for injection.

Invariants, whatever the bytes:
- the handler answers, never raises (the API server would see a 500 and, with
  `failurePolicy: Ignore`, admit the pod silently without its sidecar);
- 400 exactly when the body is not an AdmissionReview v1 with a request and its uid; else
  200 with an AdmissionReview whose response carries that uid and allows the pod;
- a patch, when there is one, is base64 of a JSON Patch that applies to the pod as sent.
"""

from __future__ import annotations

import base64
import json
import logging

import jsonpatch
from aiohttp import web

from fuzz.targets._support import run_to_completion
from meshproxy.kube.inject import InjectOptions
from meshproxy.kube.webhook import ADMISSION_API_VERSION, Injector, StaticNamespaces, build_app

OPTIONS = InjectOptions(proxy_image="registry.test/meshproxy:fuzz", control_url="http://control.test:15010")
_APP = build_app(Injector(StaticNamespaces({"shop": {"meshproxy.io/inject": "enabled"}}), OPTIONS))
HANDLER = next(r.handler for r in _APP.router.routes()
               if r.method == "POST" and r.resource.canonical == "/inject")
RESPONSE_KEYS = {"uid", "allowed", "patchType", "patch", "warnings"}


class FakeRequest:
    """What the handler reads of an aiohttp request: the body and the peer."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.remote = "192.0.2.1"

    async def read(self) -> bytes:
        return self.body


def review_request(body: bytes) -> dict | None:
    """The review's request when `body` is an AdmissionReview v1 with a uid, else None; found
    independently of the webhook."""
    try:
        review = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview" \
            or review.get("apiVersion") != ADMISSION_API_VERSION:
        return None
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        return None
    return request


def TestOneInput(data: bytes) -> None:
    logging.disable(logging.CRITICAL)  # the handler logs refusals and failures: not wanted per input
    try:
        response: web.Response = run_to_completion(HANDLER(FakeRequest(data)))
    finally:
        logging.disable(logging.NOTSET)
    request = review_request(data)
    if request is None:
        assert response.status == 400, f"{response.status} for a body that is not a review"
        return
    assert response.status == 200, f"{response.status} for a review"
    answer = json.loads(response.body)
    assert answer["apiVersion"] == ADMISSION_API_VERSION and answer["kind"] == "AdmissionReview"
    result = answer["response"]
    assert set(result) <= RESPONSE_KEYS, sorted(result)
    assert result["uid"] == request["uid"] and result["allowed"] is True
    for warning in result.get("warnings", []):
        assert isinstance(warning, str), warning
    if "patch" in result:
        assert result["patchType"] == "JSONPatch"
        patch = json.loads(base64.b64decode(result["patch"], validate=True))
        assert isinstance(patch, list) and patch
        pod = request.get("object")
        assert isinstance(pod, dict), "a patch for something that is not a pod"
        patched = jsonpatch.apply_patch(pod, patch)
        assert isinstance(patched, dict)
