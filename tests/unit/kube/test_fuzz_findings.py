"""What coverage-guided fuzzing found in the admission webhook (fuzz/targets/webhook.py), with
the inputs it found: reviews whose parts have types the API server never sends. The webhook
admits every pod and answers 400 only to a body that is not an AdmissionReview; these raised
before the part that fails open, and the API server got a 500."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from meshproxy.kube.inject import InjectOptions
from meshproxy.kube.webhook import Injector, StaticNamespaces, build_app

# `request.kind` given twice: the second, a string, is the one JSON keeps.
KIND_IS_A_STRING = (
    b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"u","kind":{"group":"",'
    b'"vern":"v1","kind":"Pod"},"naeratern":"v1","kind":"Pod"},"naeration":"CREATE","object":{"metadata":'
    b'{"name":"p","labels":{"aniners":[{}]}}}}'
)
# `generateName: true`, in the review of a pod created by a ReplicaSet.
GENERATE_NAME_IS_TRUE = (
    b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"705ab4f5-6393-11e8-b7cc-'
    b'42010a800002","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1",'
    b'"resource":"pods"},"requestKind":{"group":"","version":"v1","kind":"Pod"},"requestResource":{"group":"",'
    b'"version":"v1","resource":"pods"},"namespace":"shop","operation":"CREATE","userInfo":{"username":'
    b'"sysc1f-6d2f7d0e8a10","groups":["system:serviceaccoucounts:kube-system","system:authenticated"]},'
    b'"object":{"kind":"Pod","apiVersion":"v1","metadata":{"generateName":true,"preemptionPolicy":'
    b'"PreemptLowerPriority"},"status":{}},"oldObject":null,"dryRun":false,"options":{"kind":"CreateOptions",'
    b'"apiVersion":"meta.k8s.io/v1"}}}'
)
METADATA_IS_A_LIST = (
    b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"u","kind":{"kind":"Pod"},'
    b'"object":{"metadata":["x"],"spec":{"containers":[{"name":"app"}]}}}}'
)


def injector() -> Injector:
    return Injector(StaticNamespaces({"shop": {"meshproxy.io/inject": "enabled"}}),
                    InjectOptions(proxy_image="registry.test/meshproxy:test"))


@pytest.mark.parametrize("body", [KIND_IS_A_STRING, GENERATE_NAME_IS_TRUE, METADATA_IS_A_LIST],
                         ids=["kind-is-a-string", "generateName-is-true", "metadata-is-a-list"])
async def test_a_review_with_parts_of_the_wrong_type_is_answered_allowed(body: bytes) -> None:
    answer = await injector().review(body)
    assert answer["response"]["allowed"] is True
    assert answer["response"]["uid"] in ("u", "705ab4f5-6393-11e8-b7cc-42010a800002")


async def test_the_http_answer_is_200_not_500() -> None:
    app = build_app(injector())
    [handler] = [r.handler for r in app.router.routes() if r.method == "POST"]
    request = make_mocked_request("POST", "/inject", app=app)

    async def read() -> bytes:
        return KIND_IS_A_STRING

    request.read = read  # the body, without a socket
    response = await handler(request)
    assert response.status == 200
