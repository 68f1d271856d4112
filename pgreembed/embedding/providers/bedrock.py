"""Amazon Bedrock through boto3's bedrock-runtime client (InvokeModel, SigV4).

Credentials and region come from the standard AWS chain (environment, profile, SSO,
instance/task role); `[target.bedrock]` may name the region, a profile and an endpoint_url
(a VPC endpoint). Bodies: Titan Text Embeddings (one text a request, `dimensions` 256/512/1024
for v2) and Cohere on Bedrock (up to 96 texts, `input_type` search_document/search_query).
The tokens billed are the `X-Amzn-Bedrock-Input-Token-Count` header (Titan's body says it
too). botocore's own retries are off (total_max_attempts=1): remote.py retries throttling
(ThrottlingException, ServiceUnavailable, ModelNotReady; Retry-After honoured when sent),
5xx and timeouts; AccessDenied and bad credentials are fatal; ValidationException is the
input's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import boto3
import botocore.config
import botocore.exceptions as bexc

from pgreembed.config import Settings
from pgreembed.config.providers import BedrockSettings
from pgreembed.embedding.providers.base import InputType
from pgreembed.embedding.providers.remote import (
    BAD_INPUT,
    FATAL,
    THROTTLED,
    TRANSIENT,
    Fault,
    RemoteProvider,
    retry_after_seconds,
)
from pgreembed.embedding.ratelimit import RateLimiter

_THROTTLED = ("ThrottlingException", "TooManyRequestsException", "ModelNotReadyException",
              "ServiceUnavailableException")
_TRANSIENT = ("InternalServerException", "ModelTimeoutException", "ModelErrorException")
_BAD_INPUT = ("ValidationException",)
_TOKENS_HEADER = "x-amzn-bedrock-input-token-count"


class BedrockProvider(RemoteProvider):
    provider = "bedrock"

    def __init__(self, model: str, dimensions: int, *,
                 options: BedrockSettings | None = None, **kwargs: Any) -> None:
        super().__init__(model, dimensions, **kwargs)
        options = options or BedrockSettings()
        session = boto3.session.Session(profile_name=options.profile)
        self._client = session.client(
            "bedrock-runtime", region_name=options.region, endpoint_url=options.endpoint_url,
            config=botocore.config.Config(
                retries={"total_max_attempts": 1}, read_timeout=self.timeout,
                connect_timeout=min(10.0, self.timeout)))
        self._titan = model.startswith("amazon.titan")

    @classmethod
    def build(cls, settings: Settings, model: str, dimensions: int, options: object,
              limiter: RateLimiter) -> BedrockProvider:
        return cls(model, dimensions,
                   options=options if isinstance(options, BedrockSettings) else None,
                   timeout=settings.request_timeout,
                   max_retry_seconds=settings.provider_retry_seconds, limiter=limiter)

    def _body(self, texts: list[str], input_type: InputType) -> dict[str, Any]:
        if self._titan:
            body: dict[str, Any] = {"inputText": texts[0]}
            if "v2" in self.model:
                body.update(dimensions=self.dimensions, normalize=True)
            return body
        return {"texts": texts, "input_type": self.wire_input_type(input_type),
                "truncate": "END", "embedding_types": ["float"]}

    def _send(self, texts: list[str], input_type: InputType
              ) -> tuple[Sequence[Any], int | None]:
        if self._titan and len(texts) != 1:
            raise ValueError("Titan embeds one text a request")  # batch_inputs says 1
        response = self._client.invoke_model(
            modelId=self.model, body=json.dumps(self._body(texts, input_type)),
            contentType="application/json", accept="application/json")
        payload = json.loads(response["body"].read())
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        billed = headers.get(_TOKENS_HEADER) or payload.get("inputTextTokenCount")
        if self._titan:
            rows = [payload["embedding"]]
        else:
            found = payload["embeddings"]
            rows = found["float"] if isinstance(found, dict) else found
        return rows, int(billed) if billed else None

    def _classify(self, exc: Exception) -> Fault | None:
        if isinstance(exc, bexc.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            meta = exc.response.get("ResponseMetadata", {})
            status = meta.get("HTTPStatusCode")
            text = f"{code} (HTTP {status}): {error.get('Message', '')}"
            wait = retry_after_seconds(meta.get("HTTPHeaders"))
            if code in _THROTTLED or status == 429:
                return Fault(THROTTLED, str(status or 429), text, wait)
            if code in _TRANSIENT or (status or 0) >= 500:
                return Fault(TRANSIENT, str(status or "other"), text, wait)
            if code in _BAD_INPUT or status == 400:
                return Fault(BAD_INPUT, str(status), text)
            return Fault(FATAL, str(status), text)  # AccessDenied, ResourceNotFound, quota
        if isinstance(exc, bexc.ReadTimeoutError | bexc.ConnectTimeoutError):
            return Fault(TRANSIENT, "timeout", f"timeout: {type(exc).__name__}")
        if isinstance(exc, bexc.EndpointConnectionError | bexc.ConnectionClosedError):
            return Fault(TRANSIENT, "connection", f"connection: {type(exc).__name__}")
        if isinstance(exc, bexc.NoCredentialsError | bexc.NoRegionError
                      | bexc.PartialCredentialsError):
            return Fault(FATAL, "auth", f"{type(exc).__name__}: {exc} (the AWS credential"
                                        " chain and region)")
        return None
