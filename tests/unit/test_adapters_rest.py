"""FhirRestEndpoint against a partner's exact replies, replayed with ``responses``."""
from __future__ import annotations

import email.utils
import json
import time

import pytest
import requests
import responses
import urllib3.exceptions
from responses import matchers

from adapters import profiles
from adapters.auth import Auth, BearerToken, ClientCredentials
from adapters.errors import (
    AmbiguousWrite,
    AuthError,
    NotFound,
    NotSupported,
    PermanentError,
    SearchExpired,
    TransientError,
    VersionConflict,
    parse_retry_after,
)
from adapters.fhir_rest import FhirRestEndpoint, TokenBucket, as_etag, etag_version, parse_location

BASE = "https://ehr.example.org/fhir/R4"
FULL = profiles.FULL_STATEMENT
EPIC = profiles.EPIC_STATEMENT


def outcome(code: str, diagnostics: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}


def patient(pid: str = "p1", version: str = "3") -> dict:
    return {"resourceType": "Patient", "id": pid, "meta": {"versionId": version}, "name": [{"family": "Rivera"}]}


def searchset(ids, next_url=None, rtype="Goal") -> dict:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "self", "url": f"{BASE}/{rtype}"}]
        + ([{"relation": "next", "url": next_url}] if next_url else []),
        "entry": [{"resource": {"resourceType": rtype, "id": i}, "search": {"mode": "match"}} for i in ids],
    }


def raiser(exc: Exception):
    def callback(request):
        raise exc

    return callback


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def endpoint():
    return FhirRestEndpoint(BASE, BearerToken("t0k"), capability_statement=FULL)


# --- reads, writes, versions -------------------------------------------------------------------------


def test_read_takes_version_from_etag(rsps, endpoint):
    rsps.get(f"{BASE}/Patient/p1", json=patient(version="2"), headers={"ETag": 'W/"3"'},
             match=[matchers.header_matcher({"Accept": "application/fhir+json", "Authorization": "Bearer t0k"})])
    got = endpoint.read("Patient", "p1")
    assert (got.id, got.version_id, got.etag) == ("p1", "3", 'W/"3"')
    assert got.resource["name"] == [{"family": "Rivera"}]


def test_create_201_with_location_and_etag(rsps, endpoint):
    rsps.post(
        f"{BASE}/Patient", status=201, json=patient("new-7", "1"),
        headers={"ETag": 'W/"1"', "Location": f"{BASE}/Patient/new-7/_history/1"},
        match=[matchers.header_matcher({"Content-Type": "application/fhir+json", "Prefer": "return=representation",
                                        "If-None-Exist": "identifier=urn:sys|42"})],
    )
    got = endpoint.create({"resourceType": "Patient", "id": "ours", "name": [{"family": "Rivera"}]},
                          if_none_exist="identifier=urn:sys|42")
    assert (got.id, got.version_id, got.etag) == ("new-7", "1", 'W/"1"')
    assert "id" not in json.loads(rsps.calls[0].request.body)  # the partner assigns ids on POST


def test_create_with_empty_body_reads_id_and_version_from_location(rsps, endpoint):
    rsps.post(f"{BASE}/Goal", status=201, body=b"", headers={"Location": "Goal/g-9/_history/4"})
    got = endpoint.create({"resourceType": "Goal", "lifecycleStatus": "active"})
    assert (got.id, got.version_id, got.etag) == ("g-9", "4", 'W/"4"')
    assert got.resource == {"resourceType": "Goal", "id": "g-9", "meta": {"versionId": "4"}}


def test_conditional_create_is_refused_before_sending_when_the_partner_lacks_it(rsps):
    endpoint = FhirRestEndpoint(BASE, capability_statement=EPIC, quirks=profiles.EPIC)
    with pytest.raises(NotSupported):
        endpoint.create({"resourceType": "Condition"}, if_none_exist="identifier=a|b")
    assert len(rsps.calls) == 0


def test_capabilities_fetched_once_from_metadata_with_quirks(rsps):
    rsps.get(f"{BASE}/metadata", json=profiles.ORACLE_STATEMENT)
    endpoint = FhirRestEndpoint(BASE, quirks=profiles.ORACLE)
    first = endpoint.capabilities()
    assert endpoint.capabilities() is first
    assert first.stale_if_match_status == 409 and not first.supports_system("transaction")
    assert len(rsps.calls) == 1


def test_update_sends_if_match_as_weak_etag(rsps, endpoint):
    rsps.put(f"{BASE}/Patient/p1", json=patient(version="4"), headers={"ETag": 'W/"4"'},
             match=[matchers.header_matcher({"If-Match": 'W/"3"'})])
    assert endpoint.update(patient(), if_match="3").version_id == "4"
    assert endpoint.update(patient(), if_match='W/"3"').etag == 'W/"4"'


@pytest.mark.parametrize("status", [409, 412])
def test_stale_if_match_is_a_version_conflict(rsps, endpoint, status):
    rsps.put(f"{BASE}/Patient/p1", status=status, json=outcome("conflict", "Version 3 is not current"))
    with pytest.raises(VersionConflict) as caught:
        endpoint.update(patient(), if_match="3")
    assert caught.value.status == status
    assert "not current" in str(caught.value)


def test_409_without_if_match_is_plainly_permanent(rsps, endpoint):
    rsps.put(f"{BASE}/Patient/p1", status=409, json=outcome("duplicate", "Duplicate"))
    with pytest.raises(PermanentError) as caught:
        endpoint.update(patient())
    assert not isinstance(caught.value, VersionConflict)


def test_422_carries_the_operation_outcome(rsps, endpoint):
    body = outcome("processing", "CarePlan.subject: Patient/x not found")
    body["issue"][0]["expression"] = ["CarePlan.subject"]
    rsps.post(f"{BASE}/CarePlan", status=422, json=body)
    with pytest.raises(PermanentError) as caught:
        endpoint.create({"resourceType": "CarePlan"})
    assert caught.value.status == 422
    assert caught.value.outcome == body
    assert "Patient/x not found" in str(caught.value)


@pytest.mark.parametrize(
    "status, error",
    [(400, PermanentError), (403, PermanentError), (404, NotFound), (405, NotSupported), (410, NotFound)],
)
def test_client_errors_on_read_are_permanent(rsps, endpoint, status, error):
    rsps.get(f"{BASE}/Patient/p1", status=status, json=outcome("processing", "no"))
    with pytest.raises(error) as caught:
        endpoint.read("Patient", "p1")
    assert caught.value.status == status
    assert not isinstance(caught.value, SearchExpired)


def test_transaction_posts_to_base_and_maps_conflicts(rsps, endpoint):
    response = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}
    rsps.post(f"{BASE}/", json=response)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    assert endpoint.transaction(bundle) == response
    rsps.post(f"{BASE}/", status=412, json=outcome("conflict", "stale"))
    guarded = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient(), "request": {"method": "PUT", "url": "Patient/p1", "ifMatch": 'W/"3"'}}]}
    with pytest.raises(VersionConflict):
        endpoint.batch(guarded)
    with pytest.raises(ValueError):
        endpoint.transaction(guarded)  # a batch bundle is not a transaction


def test_member_match_posts_parameters_to_the_type(rsps, endpoint):
    answer = {"resourceType": "Parameters", "parameter": [{"name": "MemberIdentifier", "valueIdentifier": {"value": "M1"}}]}
    rsps.post(f"{BASE}/Patient/$member-match", json=answer)
    params = {"resourceType": "Parameters", "parameter": [{"name": "MemberPatient", "resource": patient()}]}
    assert endpoint.operation("Patient", "$member-match", params) == answer


# --- transient failures --------------------------------------------------------------------------------


def test_429_retry_after_seconds(rsps, endpoint):
    rsps.get(f"{BASE}/Patient/p1", status=429, headers={"Retry-After": "120"})
    with pytest.raises(TransientError) as caught:
        endpoint.read("Patient", "p1")
    assert caught.value.retry_after == 120.0 and caught.value.status == 429
    assert not isinstance(caught.value, AmbiguousWrite)


def test_429_retry_after_http_date(rsps, endpoint):
    later = email.utils.formatdate(time.time() + 90, usegmt=True)
    rsps.post(f"{BASE}/Task", status=429, headers={"Retry-After": later})
    with pytest.raises(TransientError) as caught:
        endpoint.create({"resourceType": "Task"})
    assert 80 <= caught.value.retry_after <= 91
    assert not isinstance(caught.value, AmbiguousWrite)  # 429 means the partner did not take it


def test_parse_retry_after_forms():
    now = 1_700_000_000.0
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 0.0  # in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_503_is_transient_even_for_writes(rsps, endpoint):
    rsps.post(f"{BASE}/Task", status=503, headers={"Retry-After": "5"})
    with pytest.raises(TransientError) as caught:
        endpoint.create({"resourceType": "Task"})
    assert not isinstance(caught.value, AmbiguousWrite) and caught.value.retry_after == 5.0


@pytest.mark.parametrize("status", [502, 504])
def test_gateway_errors_leave_writes_ambiguous_but_reads_transient(rsps, endpoint, status):
    rsps.post(f"{BASE}/Task", status=status)
    rsps.get(f"{BASE}/Task/t1", status=status)
    with pytest.raises(AmbiguousWrite):
        endpoint.create({"resourceType": "Task"})
    with pytest.raises(TransientError) as caught:
        endpoint.read("Task", "t1")
    assert not isinstance(caught.value, AmbiguousWrite)


def test_connect_timeout_on_post_is_transient_not_ambiguous(rsps, endpoint):
    rsps.add_callback(responses.POST, f"{BASE}/Task", callback=raiser(requests.exceptions.ConnectTimeout("connect")))
    with pytest.raises(TransientError) as caught:
        endpoint.create({"resourceType": "Task"})
    assert not isinstance(caught.value, AmbiguousWrite)


def test_read_timeout_after_sending_a_post_is_ambiguous(rsps, endpoint):
    rsps.add_callback(responses.POST, f"{BASE}/Task", callback=raiser(requests.exceptions.ReadTimeout("read")))
    with pytest.raises(AmbiguousWrite):
        endpoint.create({"resourceType": "Task"})


def test_read_timeout_on_a_get_is_only_transient(rsps, endpoint):
    rsps.add_callback(responses.GET, f"{BASE}/Task/t1", callback=raiser(requests.exceptions.ReadTimeout("read")))
    with pytest.raises(TransientError) as caught:
        endpoint.read("Task", "t1")
    assert not isinstance(caught.value, AmbiguousWrite)


def test_connection_reset_during_a_put_is_ambiguous(rsps, endpoint):
    reset = requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")))
    rsps.add_callback(responses.PUT, f"{BASE}/Patient/p1", callback=raiser(reset))
    with pytest.raises(AmbiguousWrite):
        endpoint.update(patient(), if_match="3")


def test_refused_connection_on_a_post_is_transient_not_ambiguous(rsps, endpoint):
    refused = requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(
        None, f"{BASE}/Task", urllib3.exceptions.NewConnectionError(None, "Connection refused")))
    rsps.add_callback(responses.POST, f"{BASE}/Task", callback=raiser(refused))
    with pytest.raises(TransientError) as caught:
        endpoint.create({"resourceType": "Task"})
    assert not isinstance(caught.value, AmbiguousWrite)


# --- auth ------------------------------------------------------------------------------------------


def test_expired_token_is_refreshed_and_the_request_retried(rsps):
    tokens = iter(["old", "new"])
    rsps.add_callback(responses.POST, "https://ehr.example.org/oauth2/token", callback=lambda r: (
        200, {}, json.dumps({"access_token": next(tokens), "expires_in": 3600})))
    rsps.get(f"{BASE}/Patient/p1", status=401, match=[matchers.header_matcher({"Authorization": "Bearer old"})])
    rsps.get(f"{BASE}/Patient/p1", json=patient(), match=[matchers.header_matcher({"Authorization": "Bearer new"})])
    auth = ClientCredentials("https://ehr.example.org/oauth2/token", "cb", "secret", "system/*.read")
    endpoint = FhirRestEndpoint(BASE, auth, capability_statement=FULL)
    assert endpoint.read("Patient", "p1").id == "p1"
    assert [c.request.method for c in rsps.calls] == ["POST", "GET", "POST", "GET"]


class CountingAuth(Auth):
    """A fake auth strategy (implements the port) that counts refreshes."""

    def __init__(self):
        self.refreshes = 0

    def headers(self):
        return {"Authorization": f"Bearer t{self.refreshes}"}

    def refresh(self):
        self.refreshes += 1


def test_401_twice_is_an_auth_error_after_one_refresh(rsps):
    rsps.post(f"{BASE}/Task", status=401, json=outcome("login", "token revoked"))
    auth = CountingAuth()
    with pytest.raises(AuthError) as caught:
        FhirRestEndpoint(BASE, auth, capability_statement=FULL).create({"resourceType": "Task"})
    assert auth.refreshes == 1 and len(rsps.calls) == 2
    assert caught.value.status == 401 and "token revoked" in str(caught.value)


# --- search ----------------------------------------------------------------------------------------


def test_search_follows_absolute_next_links_and_drops_repeated_ids(rsps, endpoint):
    page2, page3 = f"{BASE}?_getpages=abc&_getpagesoffset=2", f"{BASE}?_getpages=abc&_getpagesoffset=4"
    rsps.get(f"{BASE}/Goal", json=searchset(["g1", "g2"], page2),
             match=[matchers.query_param_matcher({"patient": "Patient/p1", "_count": "2"})])
    rsps.get(page2, json=searchset(["g2", "g3"], page3), match=[matchers.query_param_matcher(
        {"_getpages": "abc", "_getpagesoffset": "2"})])
    rsps.get(page3, json=searchset(["g3", "g4"]), match=[matchers.query_param_matcher(
        {"_getpages": "abc", "_getpagesoffset": "4"})])
    found = [r["id"] for r in endpoint.search("Goal", {"patient": "Patient/p1", "_count": "2"})]
    assert found == ["g1", "g2", "g3", "g4"]


def test_search_skips_outcome_entries_and_stops_on_a_next_link_loop(rsps, endpoint):
    bundle = searchset(["g1"], f"{BASE}/Goal?page=1")
    bundle["entry"].append({"resource": outcome("informational", "capped"), "search": {"mode": "outcome"}})
    rsps.get(f"{BASE}/Goal", json=bundle)
    assert [r["id"] for r in endpoint.search("Goal")] == ["g1"]
    assert len(rsps.calls) == 2  # the first page, then its own next link once


def test_count_is_clamped_to_the_partner_page_cap(rsps):
    rsps.get(f"{BASE}/Goal", json=searchset([]), match=[matchers.query_param_matcher({"_count": "100"})])
    endpoint = FhirRestEndpoint(BASE, quirks=profiles.EPIC, capability_statement=EPIC)
    assert endpoint.search_page("Goal", {"_count": "500"}).resources == []


def test_expired_search_session_is_restarted_once(rsps, endpoint):
    page2 = f"{BASE}?_getpages=s1&_getpagesoffset=2"
    rsps.get(f"{BASE}/Goal", json=searchset(["g1", "g2"], page2))
    rsps.get(page2, status=410, json=outcome("not-found", "Search session s1 has expired"))
    rsps.get(f"{BASE}/Goal", json=searchset(["g1", "g2"], page2 + "&again=1"))
    rsps.get(page2 + "&again=1", json=searchset(["g3"]))
    found = [r["id"] for r in endpoint.search("Goal")]
    assert found == ["g1", "g2", "g3"]


def test_a_second_expiry_is_raised(rsps, endpoint):
    page2 = f"{BASE}?_getpages=s1&_getpagesoffset=2"
    rsps.get(f"{BASE}/Goal", json=searchset(["g1"], page2))
    rsps.get(page2, status=400, json=outcome("processing", "The search/page token is invalid or has expired"))
    found = []
    with pytest.raises(SearchExpired) as caught:
        for resource in endpoint.search("Goal"):
            found.append(resource["id"])
    assert found == ["g1"] and caught.value.status == 400


def test_a_plain_404_while_paging_is_not_an_expiry(rsps, endpoint):
    page2 = f"{BASE}/Goal?page=2"
    rsps.get(f"{BASE}/Goal", json=searchset(["g1"], page2))
    rsps.get(page2, status=404, json=outcome("not-found", "Unknown resource type"))
    with pytest.raises(NotFound) as caught:
        list(endpoint.search("Goal"))
    assert not isinstance(caught.value, SearchExpired)


def test_next_link_to_another_host_is_refused_or_rebased(rsps):
    leaked = "http://10.0.0.5:8080/fhir/R4?_getpages=x"
    rsps.get(f"{BASE}/Goal", json=searchset(["g1"], leaked))
    with pytest.raises(PermanentError, match="not the partner's host"):
        list(FhirRestEndpoint(BASE, BearerToken("t"), capability_statement=FULL).search("Goal"))
    rsps.get("https://ehr.example.org/fhir/R4?_getpages=x", json=searchset(["g2"]))
    rebased = FhirRestEndpoint(BASE, BearerToken("t"), capability_statement=FULL, quirks={"rebase_next_links": True})
    assert [r["id"] for r in rebased.search("Goal")] == ["g1", "g2"]


def test_search_answer_that_is_not_a_bundle_is_permanent(rsps, endpoint):
    rsps.get(f"{BASE}/Goal", json=patient())
    with pytest.raises(PermanentError):
        endpoint.search_page("Goal", {})


# --- rate limit and parsing helpers ----------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_token_bucket_spaces_requests_on_a_fake_clock():
    clock = FakeClock()
    bucket = TokenBucket(4, burst=2, clock=clock, sleep=clock.sleep)
    waits = [bucket.acquire() for _ in range(5)]
    assert waits == [0.0, 0.0, 0.25, 0.25, 0.25]
    clock.now += 10  # idle: the bucket refills, but only up to its burst
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.25]


def test_endpoint_waits_on_its_rate_limiter_before_each_request(rsps):
    clock = FakeClock()
    rsps.get(f"{BASE}/Patient/p1", json=patient())
    endpoint = FhirRestEndpoint(BASE, capability_statement=FULL,
                                rate_limit=TokenBucket(2, clock=clock, sleep=clock.sleep))
    for _ in range(4):
        endpoint.read("Patient", "p1")
    assert clock.slept == [0.5, 0.5, 0.5]
    assert clock.now == 1001.5


def test_etag_and_location_parsing():
    assert etag_version('W/"3"') == "3" and etag_version('"12"') == "12" and etag_version(None) is None
    assert as_etag("3") == 'W/"3"' and as_etag('W/"3"') == 'W/"3"'
    assert parse_location(f"{BASE}/CarePlan/cp-1/_history/7") == ("CarePlan", "cp-1", "7")
    assert parse_location("Goal/g1") == ("Goal", "g1", None)
    assert parse_location("not a location") == (None, None, None)


def test_errors_take_a_message_or_status_first():
    by_keyword = PermanentError("bad subject", status=422, outcome=outcome("processing", "no such Patient"))
    by_position = PermanentError(422, None, "bad subject")
    assert (by_keyword.status, by_keyword.message) == (by_position.status, by_position.message) == (422, "bad subject")
    assert str(by_keyword) == "HTTP 422: bad subject (no such Patient)"
    assert PermanentError(404, outcome("not-found", "gone")).message == "gone"
    assert TransientError(503, None, "busy", retry_after=3).retry_after == 3
    with pytest.raises(TypeError):
        PermanentError()


def test_the_environment_proxy_is_read_once_when_the_endpoint_is_built(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example.org")
    proxied = FhirRestEndpoint(BASE)
    direct = FhirRestEndpoint("https://internal.example.org/fhir")
    monkeypatch.setenv("HTTPS_PROXY", "http://elsewhere.example.org:3128")  # read once: no effect now

    assert proxied.session.proxies.get("https") == "http://proxy.example.org:3128"
    assert "https" not in direct.session.proxies  # the partner's host is on NO_PROXY
    assert not proxied.session.trust_env  # requests does not read the environment again per request
