"""Health endpoints, metrics exposition and `felix-lite status` on 127.0.0.1 (no root)."""

from __future__ import annotations

import argparse
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from felix_lite.agent.health import HttpEndpoint, health_routes, metrics_routes
from felix_lite.agent.loop import RulesetCounts
from felix_lite.agent.metrics import AgentMetrics
from felix_lite.agent.status_cli import format_status, run

STATUS: dict[str, Any] = {
    "node": "node-1",
    "ready": True,
    "in_sync": True,
    "generation": 7,
    "programmed_resource_versions": {"networkpolicy": "120", "pod": "118"},
    "last_apply": {"at": 1000.0, "seconds": 0.0123, "chains_written": 3, "sets_written": 1},
    "applies": 4,
    "apply_failures": 1,
    "ruleset": {"chains": 20, "rules": 80, "sets": 5, "members": 40},
    "local_pods": 9,
    "bgp": {
        "enabled": True,
        "started": True,
        "peers": [
            {
                "address": "10.0.0.1",
                "asn": 65000,
                "state": "up",
                "uptime": 3725.0,
                "received": 9,
                "accepted": 8,
                "installed": 8,
            }
        ],
        "routes": {"announced": 9, "learned": 8, "installed": 8},
    },
    "invalid_objects": [{"object": "networkpolicy y/bad", "error": "endPort: must be >= port"}],
    "errors": [],
}


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


@pytest.fixture
def state() -> dict[str, Any]:
    return {"live": True, "ready": False, "status": dict(STATUS)}


@pytest.fixture
def endpoint(state: dict[str, Any]) -> Iterator[HttpEndpoint]:
    metrics = AgentMetrics(
        informers=lambda: {"pod": {"restarts": 3, "relists": 1}},
        invalid=lambda: 1,
        invalid_total=lambda: 2,
        routing=lambda: STATUS["bgp"],
    )
    metrics.applied(seconds=0.01, latency=0.3, counts=RulesetCounts(4, 19, 2, 7), local_pods=2)
    metrics.programmed(generation=5, rvs={"pod": "118", "weird": "abc"}, ready=True)
    routes = health_routes(
        live=lambda: state["live"], ready=lambda: state["ready"], status=lambda: state["status"]
    )
    routes.update(metrics_routes(metrics.render, metrics.content_type))

    def boom() -> Any:
        raise RuntimeError("broken handler")

    routes["/boom"] = lambda: boom()
    ep = HttpEndpoint(routes, port=0).start()
    try:
        yield ep
    finally:
        ep.stop()


def test_probes_follow_the_agent(endpoint: HttpEndpoint, state: dict[str, Any]) -> None:
    assert get(endpoint.url + "/livez")[0] == 200
    assert get(endpoint.url + "/readyz")[0] == 503
    state["ready"] = True
    assert get(endpoint.url + "/readyz")[0] == 200
    state["live"] = False
    assert get(endpoint.url + "/livez")[0] == 503
    assert get(endpoint.url + "/nope")[0] == 404
    assert get(endpoint.url + "/boom")[0] == 500
    code, ctype, body = get(endpoint.url + "/status")
    assert code == 200 and ctype == "application/json"
    assert json.loads(body)["programmed_resource_versions"] == {
        "networkpolicy": "120",
        "pod": "118",
    }


def test_metrics_exposition(endpoint: HttpEndpoint) -> None:
    code, ctype, text = get(endpoint.url + "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    lines = set(text.splitlines())
    for want in (
        "felix_lite_programming_latency_seconds_count 1.0",
        'felix_lite_programming_latency_seconds_bucket{le="0.5"} 1.0',
        'felix_lite_programming_latency_seconds_bucket{le="0.25"} 0.0',
        "felix_lite_iptables_rules 19.0",
        "felix_lite_ipset_members 7.0",
        "felix_lite_programmed_generation 5.0",
        'felix_lite_programmed_resource_version{kind="pod"} 118.0',
        'felix_lite_watch_restarts_total{kind="pod"} 3.0',
        'felix_lite_watch_relists_total{kind="pod"} 1.0',
        "felix_lite_invalid_objects 1.0",
        'felix_lite_bgp_sessions{state="up"} 1.0',
        'felix_lite_bgp_sessions{state="down"} 0.0',
        'felix_lite_bgp_routes{kind="installed"} 8.0',
        "felix_lite_ready 1.0",
    ):
        assert want in lines, want
    assert 'kind="weird"' not in text  # a non-numeric RV is not exported


def test_stop_frees_the_port() -> None:
    ep = HttpEndpoint({}, port=0).start()
    port = ep.port
    ep.stop()
    again = HttpEndpoint({}, port=port).start()
    again.stop()


def test_status_cli_json_and_table(endpoint: HttpEndpoint) -> None:
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(url=endpoint.url, json=True, timeout=5.0)
    assert run(args, out=out, err=err) == 0
    assert json.loads(out.getvalue())["generation"] == 7
    out = io.StringIO()
    args.json = False
    assert run(args, out=out, err=err) == 0
    text = out.getvalue()
    assert "felix-lite agent on node node-1: ready" in text
    assert "networkpolicy=120 pod=118" in text
    assert "| 10.0.0.1     | 65000 | up    | 1h02m | 9        | 8        | 8         |" in text
    assert "Routes: announced 9, learned 8, installed 8" in text
    assert "networkpolicy y/bad: endPort: must be >= port" in text


def test_status_cli_unreachable_agent_exits_1() -> None:
    ep = HttpEndpoint({}, port=0).start()
    url = ep.url
    ep.stop()  # nothing listens there any more
    out, err = io.StringIO(), io.StringIO()
    assert run(argparse.Namespace(url=url, json=False, timeout=2.0), out=out, err=err) == 1
    assert out.getvalue() == ""
    assert f"agent at {url}/status: not reachable" in err.getvalue()
    assert "is the agent running" in err.getvalue()


def test_format_status_not_ready_and_routing_off() -> None:
    doc = {
        **STATUS,
        "ready": False,
        "in_sync": False,
        "bgp": {"enabled": False},
        "invalid_objects": [],
        "errors": ["iptables-restore: exit 1"],
        "last_apply": None,
    }
    text = format_status(doc, now=1010.0)
    assert "NOT ready (waiting for the first full list)" in text
    assert "BGP: disabled (--no-routing)" in text
    assert "Errors:\n  iptables-restore: exit 1" in text
    assert "Last apply" not in text
    assert "Last apply: 10s ago" in format_status(STATUS, now=1010.0)
