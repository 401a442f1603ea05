"""Leader election decisions (leader.py) and the write fence (kube.py), with a fake clock and a fake
Lease API: nothing sleeps, every time is explicit.

The rules under test are client-go's: lease 15 s / renew deadline 10 s / retry 2 s; a standby judges
expiry by when it last saw the record change, on its own clock; the leader's requests are bounded by
the time left before its renew deadline; it steps down on a foreign holder; once it may no longer
write, no write leaves the process.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest
import urllib3
from kubetune_operator import cli, kube, leader
from kubetune_operator.kube import ApiError, Fenced, Kube
from kubetune_operator.leader import LeaderElector, Timing

WALL = dt.datetime(2026, 12, 2, 12, 0, 0, tzinfo=dt.UTC)


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class LeaseApi:
    """The Lease endpoint of an API server, with optimistic concurrency on resourceVersion.

    Every call is recorded as (verb, timeout, time). ``latency`` seconds pass per call; a call whose
    timeout is shorter fails with TimeoutError when the timeout has passed (as urllib3 would).
    ``fail`` is raised by every call while set."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.lease: dict[str, Any] | None = None
        self.rv = 0
        self.calls: list[tuple[str, float | None, float]] = []
        self.latency = 0.0
        self.fail: Exception | None = None

    def _call(self, verb: str, timeout: float | None) -> None:
        self.calls.append((verb, timeout, self.clock()))
        if timeout is not None and self.latency > timeout:
            self.clock.advance(timeout)
            raise TimeoutError(f"{verb}: read timed out")
        self.clock.advance(self.latency)
        if self.fail is not None:
            raise self.fail

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.lease)

    def get(self, kind: str, namespace: str, name: str, timeout: float | None = None) -> dict[str, Any] | None:
        self._call("get", timeout)
        return copy.deepcopy(self.lease)

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> dict[str, Any]:
        assert method == "POST"
        self._call("create", timeout)
        if self.lease is not None:
            raise ApiError(409, method, path, '{"reason": "AlreadyExists"}')
        return self._store(body)

    def put(self, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        self._call("update", timeout)
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "PUT", "lease", '{"reason": "Conflict"}')
        return self._store(body)

    def rival_writes(self, holder: str | None, renew: dt.datetime = WALL, duration: int = 15) -> None:
        """Another replica (or an admin) writes the record."""
        spec = dict((self.lease or {}).get("spec") or {})
        spec.update(holderIdentity=holder, renewTime=leader._fmt(renew), leaseDurationSeconds=duration)
        self._store({"metadata": {"name": "lease", "namespace": "ns"}, "spec": spec})

    def writes(self) -> list[str]:
        return [verb for verb, _, _ in self.calls if verb != "get"]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def api(clock: Clock) -> LeaseApi:
    return LeaseApi(clock)


def elector(api: LeaseApi, clock: Clock, identity: str = "me", **timing: float) -> LeaderElector:
    return LeaderElector(api, "ns", "lease", identity, Timing(**timing), clock=clock,  # type: ignore[arg-type]
                         wall=lambda: WALL, rand=lambda: 0.0)


# -- timing


def test_timing_defaults_are_client_gos_and_inconsistent_ones_are_refused():
    t = Timing()
    assert (t.lease_duration, t.renew_deadline, t.retry_period) == (15.0, 10.0, 2.0)
    with pytest.raises(ValueError, match="lease duration"):
        Timing(lease_duration=10, renew_deadline=10)
    with pytest.raises(ValueError, match="renew deadline"):
        Timing(renew_deadline=2.4, retry_period=2)
    with pytest.raises(ValueError, match="retry period"):
        Timing(retry_period=0)


# -- the pure decision


def test_can_acquire_counts_from_when_this_replica_saw_the_record():
    held = {"spec": {"holderIdentity": "other", "leaseDurationSeconds": 15,
                     "renewTime": "1970-01-01T00:00:00.000000Z"}}  # a renewTime from a broken clock: ignored
    assert leader.can_acquire(None, "me", observed_at=0, now=0)
    assert leader.can_acquire({"spec": {"holderIdentity": None}}, "me", observed_at=0, now=0)
    assert leader.can_acquire({"spec": {"holderIdentity": "me"}}, "me", observed_at=0, now=0)
    assert not leader.can_acquire(held, "me", observed_at=100, now=114.9)
    assert leader.can_acquire(held, "me", observed_at=100, now=115)


# -- acquiring


def test_the_first_replica_creates_the_lease_and_may_write_for_the_renew_deadline(api, clock):
    e = elector(api, clock)
    assert e.write_refusal() == "not the leader"
    assert e.try_acquire_or_renew()
    spec = api.lease["spec"]
    assert (spec["holderIdentity"], spec["leaseDurationSeconds"], spec["leaseTransitions"]) == ("me", 15, 0)
    assert api.writes() == ["create"]
    clock.advance(9.99)
    assert e.write_refusal() is None and e.leading
    clock.advance(0.01)
    assert "renew deadline" in (e.write_refusal() or "")


@pytest.mark.parametrize("renew", [WALL - dt.timedelta(hours=1), WALL + dt.timedelta(hours=1)],
                         ids=["holder-clock-behind", "holder-clock-ahead"])
def test_a_standby_waits_a_full_lease_duration_from_its_own_observation(api, clock, renew):
    """Clock skew: the holder's renewTime, an hour off either way, changes nothing."""
    api.rival_writes("other", renew=renew)
    e = elector(api, clock, identity="standby")
    assert not e.try_acquire_or_renew()  # first seen now
    clock.advance(14.9)
    assert not e.try_acquire_or_renew()
    assert api.writes() == []
    clock.advance(0.1)
    assert e.try_acquire_or_renew()
    spec = api.lease["spec"]
    assert spec["holderIdentity"] == "standby" and spec["leaseTransitions"] == 1
    assert spec["acquireTime"] == leader._fmt(WALL)


def test_a_renewal_seen_restarts_the_standbys_wait(api, clock):
    api.rival_writes("other")
    e = elector(api, clock, identity="standby")
    assert not e.try_acquire_or_renew()
    clock.advance(10)
    api.rival_writes("other")  # the holder renews (same renewTime text: the resourceVersion changes)
    clock.advance(2)
    assert not e.try_acquire_or_renew()  # sees the change at +12
    clock.advance(14.9)
    assert not e.try_acquire_or_renew()
    clock.advance(0.1)
    assert e.try_acquire_or_renew()


def test_a_released_lease_is_taken_at_once(api, clock):
    api.rival_writes(None)
    assert elector(api, clock, identity="standby").try_acquire_or_renew()


def test_losing_the_race_for_an_expired_lease_is_not_leadership(api, clock):
    api.rival_writes("other")
    e = elector(api, clock, identity="standby")
    e.try_acquire_or_renew()
    clock.advance(15)
    put = api.put

    def racing_put(body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        api.rival_writes("third")  # another standby wrote between our GET and our PUT
        return put(body, timeout)

    api.put = racing_put  # type: ignore[method-assign]
    assert not e.try_acquire_or_renew()
    assert e.write_refusal() == "not the leader"
    assert api.lease["spec"]["holderIdentity"] == "third"


# -- renewing


def test_the_leader_renews_every_retry_period_and_keeps_acquire_time(api, clock):
    e = elector(api, clock)
    e.try_acquire_or_renew()
    acquired = api.lease["spec"]["acquireTime"]
    for _ in range(5):
        clock.advance(2)
        assert e.renew() == 2.0
    assert api.writes() == ["create"] + ["update"] * 5
    assert api.lease["spec"]["acquireTime"] == acquired and api.lease["spec"]["leaseTransitions"] == 0
    clock.advance(9.99)  # valid for renew_deadline after the start of the last renewal
    assert e.write_refusal() is None


def test_failed_renewals_fence_exactly_at_the_renew_deadline(api, clock):
    e = elector(api, clock)
    e.try_acquire_or_renew()  # at t0: valid until t0 + 10
    api.fail = ApiError(403, "GET", "lease", '{"reason": "Forbidden"}')
    waits = []
    for _ in range(4):  # t0+2, +4, +6, +8: fail, retry
        clock.advance(2)
        waits.append(e.renew())
    assert waits == [2.0, 2.0, 2.0, 2.0]
    clock.advance(1.99)
    assert e.write_refusal() is None
    clock.advance(0.01)
    assert e.write_refusal() is not None
    assert e.renew() is None and "renew deadline" in (e.lost or "")
    api.fail = None
    calls = len(api.calls)
    assert not e.try_acquire_or_renew() and not e.release()
    assert len(api.calls) == calls  # a lost leader never touches the Lease again
    assert api.writes() == ["create"]


def test_the_last_retry_is_timed_to_the_deadline(api, clock):
    e = elector(api, clock)
    e.try_acquire_or_renew()
    api.fail = OSError("connection refused")
    clock.advance(9)
    assert e.renew() == pytest.approx(1.0)  # not 2: loss is declared at the deadline, not after it


def test_every_request_is_bounded_by_the_time_left_before_the_deadline(api, clock):
    e = elector(api, clock)
    api.latency = 1.5
    e.try_acquire_or_renew()  # get + create: 3 s
    clock.advance(2)
    assert e.renew() == 2.0
    leader_calls = api.calls[2:]
    deadline = 1000.0 + 10  # from the start of the acquiring attempt
    for verb, timeout, at in leader_calls:
        assert timeout == pytest.approx(deadline - at), verb
    assert all(0 < t <= 10 for _, t, _ in api.calls if t is not None)


def test_a_hanging_request_cannot_stretch_the_deadline(api, clock):
    e = elector(api, clock)
    e.try_acquire_or_renew()  # t0
    clock.advance(2)
    api.latency = 60.0  # the API server stops answering: the GET times out at t0 + 10, not t0 + 62
    assert e.renew() is None
    assert clock() == pytest.approx(1000.0 + 10)
    assert api.writes() == ["create"] and e.write_refusal() is not None


def test_a_foreign_holder_makes_the_leader_step_down_at_once(api, clock):
    e = elector(api, clock)
    e.try_acquire_or_renew()
    api.rival_writes("rival")
    clock.advance(2)
    assert e.renew() is None
    assert e.lost == "the Lease is now held by rival"
    assert e.write_refusal() == e.lost  # although its own renew deadline has not passed
    assert api.writes() == ["create"]


def test_a_frozen_leader_wakes_up_fenced_and_sends_nothing(api, clock):
    e = elector(api, clock)
    e.try_acquire_or_renew()
    clock.advance(2)
    e.renew()
    calls = len(api.calls)
    clock.advance(40)  # SIGSTOP ... SIGCONT
    assert e.write_refusal() is not None
    assert e.renew() is None
    assert len(api.calls) == calls


# -- releasing


def test_a_graceful_stop_releases_the_lease(api, clock):
    e = elector(api, clock)
    e.try_acquire_or_renew()
    clock.advance(1)
    assert e.release()
    assert api.lease["spec"]["holderIdentity"] is None
    assert e.write_refusal() == "not the leader"
    assert elector(api, clock, identity="standby").try_acquire_or_renew()


def test_no_release_past_the_renew_deadline(api, clock):
    e = elector(api, clock)
    e.try_acquire_or_renew()
    clock.advance(10)
    assert not e.release()
    assert api.writes() == ["create"]


def test_no_release_of_a_lease_someone_else_holds(api, clock):
    e = elector(api, clock)
    e.try_acquire_or_renew()
    api.rival_writes("rival")
    assert not e.release()
    assert api.lease["spec"]["holderIdentity"] == "rival"


# -- the write fence in Kube


class Http:
    """Records what urllib3 would send."""

    def __init__(self, fail: list[Exception] | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.fail = fail or []

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        self.sent.append({"method": method, "url": url, **kwargs})
        if self.fail:
            raise self.fail.pop(0)
        return SimpleNamespace(status=200, data=b'{"kind": "x"}')


def make_kube(http: Http, user_agent: str = "kubetune-operator/pod-a-1234") -> Kube:
    cfg = SimpleNamespace(host="http://api", get_api_key_with_prefix=lambda _: None)
    k = Kube(cfg, user_agent)
    k._http = http  # type: ignore[assignment]
    return k


def test_a_fenced_kube_sends_no_write_and_still_reads():
    http = Http()
    k = make_kube(http)
    k.write_guard = lambda: "not the leader"
    for call in (lambda: k.request("POST", "/x", {}), lambda: k.put({"kind": "Lease", "metadata": {
            "namespace": "ns", "name": "n"}}), lambda: k.patch("Job", "ns", "j", {}),
                 lambda: k.request("DELETE", "/x"), lambda: k.create({"kind": "Job", "metadata": {
                     "namespace": "ns", "name": "j"}})):
        with pytest.raises(Fenced, match="not the leader"):
            call()
    assert http.sent == []
    assert k.get("Job", "ns", "j") == {"kind": "x"}
    assert [s["method"] for s in http.sent] == ["GET"]


def test_fence_is_permanent_and_guard_is_live():
    http = Http()
    k = make_kube(http)
    refusal: list[str | None] = [None]
    k.write_guard = lambda: refusal[0]
    k.request("PATCH", "/a", {})
    refusal[0] = "deadline"
    with pytest.raises(Fenced):
        k.request("PATCH", "/a", {})
    refusal[0] = None
    k.fence("lost the leader lease")
    with pytest.raises(Fenced, match="lost the leader lease"):
        k.request("PATCH", "/a", {})
    assert len(http.sent) == 1


def test_requests_carry_the_replica_identity_in_the_user_agent():
    http = Http()
    make_kube(http).get("Job", "ns", "j")
    assert http.sent[0]["headers"]["User-Agent"] == "kubetune-operator/pod-a-1234"


def test_a_timeout_bounds_one_attempt_as_a_whole():
    http = Http()
    k = make_kube(http)
    k.get("Lease", "ns", "l", timeout=3.5)
    assert http.sent[0]["retries"] is False and http.sent[0]["timeout"].total == 3.5
    with pytest.raises(TimeoutError):
        k.get("Lease", "ns", "l", timeout=0)
    assert len(http.sent) == 1


def test_a_write_retried_after_a_failed_connect_asks_the_fence_again(monkeypatch):
    """The connection failed (nothing sent); the lease is lost during the backoff: no second try."""
    refused = urllib3.exceptions.MaxRetryError(None, "/x", urllib3.exceptions.NewConnectionError(None, "refused"))
    http = Http(fail=[refused])
    k = make_kube(http)
    refusal: list[str | None] = [None]
    k.write_guard = lambda: refusal[0]
    sleeps = []
    monkeypatch.setattr(kube.time, "sleep", lambda s: (sleeps.append(s), refusal.__setitem__(0, "lost")))
    with pytest.raises(Fenced):
        k.request("POST", "/x", {})
    assert len(http.sent) == 1 and sleeps == [0.5]


def test_a_write_that_may_have_been_received_is_not_retried(monkeypatch):
    monkeypatch.setattr(kube.time, "sleep", lambda _: None)
    reset = urllib3.exceptions.MaxRetryError(None, "/x", urllib3.exceptions.ProtocolError("connection reset"))
    http = Http(fail=[reset])
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        make_kube(http).request("POST", "/x", {})
    assert len(http.sent) == 1


def test_kopfs_requests_are_fenced_too():
    """The aiohttp middleware on kopf's session (its Event posts) asks the same fence."""
    http = Http()
    k = make_kube(http)
    fence = cli._fence_middleware(k)
    sent = []

    async def handler(request: Any) -> str:
        sent.append(request.method)
        return "response"

    def call(method: str) -> Any:
        return asyncio.run(fence(SimpleNamespace(method=method, url=SimpleNamespace(path="/api/v1/events")),
                                 handler))

    assert call("POST") == "response"
    k.fence("lost the leader lease")
    assert call("GET") == "response"
    with pytest.raises(Fenced):
        call("POST")
    assert sent == ["POST", "GET"]
