"""Auth strategies: static tokens, client credentials caching, SMART Backend Services assertions."""
from __future__ import annotations

import base64
import time
from urllib.parse import parse_qs

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from adapters.auth import ASSERTION_TYPE, BearerToken, ClientCredentials, NoAuth, SmartBackendServices
from adapters.errors import AuthError, TransientError

TOKEN_URL = "https://auth.payer.example.com/oauth2/token"


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP384R1())


def pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def token_replies(rsps, *tokens, expires_in=3600):
    issued = iter(tokens)
    rsps.add_callback(
        responses.POST, TOKEN_URL,
        callback=lambda request: (200, {}, f'{{"access_token": "{next(issued)}", "token_type": "bearer", '
                                           f'"expires_in": {expires_in}}}'),
    )


def form(call) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(call.request.body).items()}


def test_no_auth_and_bearer_token():
    assert NoAuth().headers() == {}
    token = BearerToken("abc")
    token.refresh()
    assert token.headers() == {"Authorization": "Bearer abc"}
    assert "abc" not in repr(token)


def test_client_credentials_caches_until_shortly_before_expiry(rsps):
    token_replies(rsps, "t1", "t2")
    clock = FakeClock()
    auth = ClientCredentials(TOKEN_URL, "casebridge", "s3cret", "system/CarePlan.read", clock=clock)
    assert auth.headers() == {"Authorization": "Bearer t1"}
    clock.now += 3500
    assert auth.headers() == {"Authorization": "Bearer t1"}
    assert len(rsps.calls) == 1
    clock.now += 60  # within the last minute of the token's life
    assert auth.headers() == {"Authorization": "Bearer t2"}
    assert len(rsps.calls) == 2
    sent = form(rsps.calls[0])
    assert sent == {"grant_type": "client_credentials", "scope": "system/CarePlan.read"}
    expected = "Basic " + base64.b64encode(b"casebridge:s3cret").decode()
    assert rsps.calls[0].request.headers["Authorization"] == expected
    assert "s3cret" not in repr(auth)


def test_client_credentials_refresh_forces_a_new_token(rsps):
    token_replies(rsps, "t1", "t2")
    auth = ClientCredentials(TOKEN_URL, "casebridge", "s3cret", clock=FakeClock())
    assert auth.access_token() == "t1"
    auth.refresh()
    assert auth.access_token() == "t2"


def test_short_lived_token_is_renewed_at_half_its_life(rsps):
    token_replies(rsps, "t1", "t2", expires_in=60)
    clock = FakeClock()
    auth = ClientCredentials(TOKEN_URL, "casebridge", "s3cret", clock=clock)
    assert auth.access_token() == "t1"
    clock.now += 29
    assert auth.access_token() == "t1"
    clock.now += 1
    assert auth.access_token() == "t2"


def test_token_endpoint_refusal_is_an_auth_error(rsps):
    rsps.post(TOKEN_URL, status=401, json={"error": "invalid_client", "error_description": "unknown client"})
    with pytest.raises(AuthError, match="unknown client"):
        ClientCredentials(TOKEN_URL, "casebridge", "wrong").headers()


def test_token_endpoint_outage_is_transient(rsps):
    rsps.post(TOKEN_URL, status=503, headers={"Retry-After": "30"})
    with pytest.raises(TransientError) as caught:
        ClientCredentials(TOKEN_URL, "casebridge", "s3cret").headers()
    assert caught.value.retry_after == 30.0
    rsps.replace(responses.POST, TOKEN_URL, body=requests.exceptions.ConnectTimeout("slow"))
    with pytest.raises(TransientError):
        ClientCredentials(TOKEN_URL, "casebridge", "s3cret").headers()


@pytest.mark.parametrize("alg, key_name", [("RS384", "rsa_key"), ("ES384", "ec_key")])
def test_smart_backend_services_assertion_verifies_with_the_public_key(rsps, request, alg, key_name):
    key = request.getfixturevalue(key_name)
    token_replies(rsps, "access-1")
    auth = SmartBackendServices(TOKEN_URL, "casebridge-client", pem(key), kid="key-2024", alg=alg,
                                scope="system/Patient.read system/CarePlan.read")
    before = time.time()
    assert auth.headers() == {"Authorization": "Bearer access-1"}
    sent = form(rsps.calls[0])
    assert sent["grant_type"] == "client_credentials"
    assert sent["client_assertion_type"] == ASSERTION_TYPE
    assert sent["scope"] == "system/Patient.read system/CarePlan.read"
    assert "Authorization" not in rsps.calls[0].request.headers  # the assertion is the credential

    assertion = sent["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    assert header == {"alg": alg, "kid": "key-2024", "typ": "JWT"}
    claims = jwt.decode(assertion, key.public_key(), algorithms=[alg], audience=TOKEN_URL,
                        options={"require": ["iss", "sub", "aud", "exp", "jti"]})
    assert claims["iss"] == claims["sub"] == "casebridge-client"
    assert claims["aud"] == TOKEN_URL
    assert claims["exp"] <= before + 300 + 1
    assert claims["exp"] > before


def test_smart_assertions_are_unique_and_fail_with_another_key(rsa_key):
    auth = SmartBackendServices(TOKEN_URL, "cb", pem(rsa_key), kid="k1")
    first, second = auth.client_assertion(), auth.client_assertion()
    jti = [jwt.decode(a, rsa_key.public_key(), algorithms=["RS384"], audience=TOKEN_URL)["jti"] for a in (first, second)]
    assert jti[0] != jti[1]
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(first, other.public_key(), algorithms=["RS384"], audience=TOKEN_URL)


def test_smart_refresh_posts_a_fresh_assertion(rsps, ec_key):
    token_replies(rsps, "a1", "a2")
    auth = SmartBackendServices(TOKEN_URL, "cb", pem(ec_key), kid="k1", alg="ES384")
    auth.headers()
    auth.refresh()
    assert auth.headers() == {"Authorization": "Bearer a2"}
    assertions = [form(call)["client_assertion"] for call in rsps.calls]
    assert assertions[0] != assertions[1]


def test_smart_rejects_wrong_keys_algorithms_and_lifetimes(rsa_key, ec_key):
    with pytest.raises(ValueError):
        SmartBackendServices(TOKEN_URL, "cb", pem(rsa_key), kid="k", alg="ES384")
    with pytest.raises(ValueError):
        SmartBackendServices(TOKEN_URL, "cb", pem(ec_key), kid="k", alg="RS384")
    with pytest.raises(ValueError):
        SmartBackendServices(TOKEN_URL, "cb", pem(rsa_key), kid="k", alg="HS256")
    with pytest.raises(ValueError):
        SmartBackendServices(TOKEN_URL, "cb", pem(rsa_key), kid="k", assertion_lifetime=301)
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError):
        SmartBackendServices(TOKEN_URL, "cb", pem(p256), kid="k", alg="ES384")
