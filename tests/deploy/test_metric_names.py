"""Every metric the dashboard (deploy/grafana) and the Prometheus rules (deploy/prometheus/rules) read exists.

Names are taken from every PromQL expression (support/promql.py). A recorded name (level:metric:op) must be
recorded by a rule; every other name must be in a scrape of the live services: the six services run as
processes (TLS + API keys, real Redis), a few calls make their labelled series appear (a webhook to a real receiver
on loopback that fails once, then succeeds; SIP calls through the adapter, and through a second adapter whose
translation is unreachable, answered 503), and each process's /metrics is read. `up` is the one name Prometheus
makes itself.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.identity.principal import Role
from numprotect.core.settings import SERVICE_NAMES
from numprotect.events.v1 import events_pb2, events_pb2_grpc
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.event_routing import add_entry
from support.identity import mint_in
from support.processes import ServiceProcess
from support.promql import PromQLSyntaxError, label_equalities, metric_names
from support.redis_server import free_port
from support.sip_client import SipClient

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "numprotect.json"
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
MADE_BY_PROMETHEUS = {"up"}
SERVICES = SERVICE_NAMES


# --- the extractor ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'sum by (grpc_method) (rate(grpc_server_handled_total{grpc_code=~"Internal|Unknown", x!="a,b"}[5m]))',
            {"grpc_server_handled_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(grpc_server_handling_seconds_bucket[$__rate_interval])))",
            {"grpc_server_handling_seconds_bucket"},
        ),
        (
            'rate(a_total[5m]) * on (job, instance) group_left (service) numprotect_build_info{service=~"$service"}',
            {"a_total", "numprotect_build_info"},
        ),
        ("x > 1 unless x <= 3 * (x offset 1h)", {"x"}),
        ("x > bool 0.5e-3 and y == inf or z != nan", {"x", "y", "z"}),
        ("max without (state) (m)", {"m"}),
        ("sum without(state)(m) / ignoring(state) group_right n", {"m", "n"}),
        ('{__name__="named_by_matcher", job="j"}', {"named_by_matcher"}),
        ('topk(5, m) + count_values("v", n) + quantile(0.9, o)', {"m", "n", "o"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ("max_over_time(rate(c_total[5m])[1h:1m])", {"c_total"}),
        ("1 - (a or vector(0)) @ end()", {"a"}),
        ("tenant_city:numprotect_pool_free:ratio < 0.10", {"tenant_city:numprotect_pool_free:ratio"}),
        ("# a comment naming not_a_metric\nm_sum / m_count", {"m_sum", "m_count"}),
        ("sum by (service, client, le) (rate(h_bucket[${__rate_interval}]))", {"h_bucket"}),
        ('count by (service, version) (numprotect_build_info{service=~"${service}"})', {"numprotect_build_info"}),
        ("x offset 1h30m", {"x"}),
    ],
)
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_label_equalities_of_an_expression() -> None:
    expr = (
        'sum by (s) (a{state="free", city=~"$city", grpc_code!="OK", tenant="$tenant"}) '
        '/ b{__name__="c", grpc_method="Translate"} + d{job=~"numprotect.*"}'
    )
    assert label_equalities(expr) == {("state", "free"), ("grpc_method", "Translate")}
    assert metric_names(expr) == {"a", "b", "c", "d"}


@pytest.mark.parametrize(
    "expr",
    ["sum(rate(x[5m])", "x)", 'x{job="a"', "sum by (job (x)", "x ~ y", "x{job='a'} ?"],
)
def test_an_expression_the_tokenizer_cannot_read_raises(expr: str) -> None:
    with pytest.raises(PromQLSyntaxError):
        metric_names(expr)


# --- what the dashboard and the rules read ----------------------------------------------------------------------


@dataclass
class Reads:
    """Metric names read by the dashboard and the rules (where each is read), the label values their equality
    matchers ask for (where), and the names the rules record."""

    used: dict[str, set[str]]
    recorded: set[str]
    label_values: dict[tuple[str, str], set[str]]


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every variable's series selector."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    for panel in data["panels"]:
        for nested in [panel, *panel.get("panels", [])]:
            for target in nested.get("targets", []):
                yield f"dashboard panel {nested['title']!r}", target["expr"]
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"].strip())
            assert match, variable["query"]
            yield f"dashboard variable {variable['name']}", match[1]


def rule_expressions() -> Iterator[tuple[str, str, str | None]]:
    """(where, PromQL, recorded name or None) of every rule."""
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule["alert"]
                yield f"{path.name} {name}", rule["expr"], rule.get("record")


def reads() -> Reads:
    used: dict[str, set[str]] = {}
    label_values: dict[tuple[str, str], set[str]] = {}
    recorded: set[str] = set()
    expressions = [(where, expr) for where, expr in dashboard_expressions()]
    for where, expr, record in rule_expressions():
        expressions.append((where, expr))
        if record:
            recorded.add(record)
    for where, expr in expressions:
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
        for pair in label_equalities(expr):
            label_values.setdefault(pair, set()).add(where)
    return Reads(used, recorded, label_values)


def test_every_recorded_name_read_is_recorded_by_a_rule() -> None:
    found = reads()
    recorded_style = {name for name in found.used if ":" in name}
    assert recorded_style, "the dashboard reads no recorded series: is the extractor reading anything?"
    missing = {name: sorted(where) for name, where in found.used.items() if ":" in name and name not in found.recorded}
    assert not missing
    # Every recording rule is read by something (an alert, another rule or a panel).
    assert found.recorded <= set(found.used), found.recorded - set(found.used)


def missing_from(scraped: set[str], found: Reads) -> dict[str, list[str]]:
    """Names read that neither a rule records, nor a scrape holds, nor Prometheus makes."""
    return {
        name: sorted(where)
        for name, where in found.used.items()
        if name not in found.recorded and name not in scraped and name not in MADE_BY_PROMETHEUS
    }


def missing_values(scraped: set[tuple[str, str]], found: Reads) -> dict[str, list[str]]:
    """Label values an equality matcher asks for that no scraped series carries (the matcher selects nothing)."""
    return {f"{k}={v!r}": sorted(where) for (k, v), where in found.label_values.items() if (k, v) not in scraped}


def test_a_misspelt_label_value_is_reported() -> None:
    found = reads()
    assert ("state", "free") in found.label_values and ("grpc_method", "Translate") in found.label_values
    assert missing_values(set(found.label_values), found) == {}
    assert missing_values(set(found.label_values) - {("state", "free")}, found) == {
        "state='free'": sorted(found.label_values[("state", "free")])
    }


def test_a_misspelt_name_is_reported() -> None:
    """The check the live test makes, on a scrape that lacks one name: that name is reported with its reader."""
    found = reads()
    raw = {name for name in found.used if name not in found.recorded and name not in MADE_BY_PROMETHEUS}
    assert "numprotect_redis_up" in raw and "grpc_server_handled_total" in raw
    assert missing_from(raw, found) == {}
    assert missing_from(raw - {"numprotect_redis_up"}, found) == {
        "numprotect_redis_up": sorted(found.used["numprotect_redis_up"])
    }
    misspelt = Reads({**found.used, "numprotect_redis_upp": {"a panel"}}, found.recorded, found.label_values)
    assert missing_from(raw, misspelt) == {"numprotect_redis_upp": ["a panel"]}


# --- docs/operations.md's metric tables ----------------------------------------------------------------------------

OPERATIONS = ROOT / "docs" / "operations.md"


def documented_families() -> dict[str, str]:
    """Name -> type of each row of the tables in docs/operations.md's "Metrics" section (up to "Alerts")."""
    section = OPERATIONS.read_text().split("\n## Metrics\n", 1)[1].split("\n## Alerts\n", 1)[0]
    rows = re.findall(r"^\| `((?:numprotect|grpc_server)_\w+)` \| (counter|gauge|histogram)\b", section, re.M)
    return dict(rows)


def exposed_families(url: str) -> dict[str, str]:
    """Name (a counter's with its `_total`) -> type of the numprotect and gRPC server families one /metrics holds;
    prometheus_client's `<counter>_created` companions left out (the counter is what is documented)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    families = {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in text_string_to_metric_families(text)
        if family.name.startswith(("numprotect_", "grpc_server_"))
    }
    companions = {f"{name.removesuffix('_total')}_created" for name in families}
    return {name: kind for name, kind in families.items() if name not in companions}


def test_the_documented_metric_tables_are_read() -> None:
    documented = documented_families()
    assert documented["grpc_server_handled_total"] == "counter"
    assert documented["numprotect_build_info"] == "gauge"
    assert documented["numprotect_cdr_ingestion_lag_seconds"] == "histogram"
    assert len(documented) >= 15


# --- the live services --------------------------------------------------------------------------------------------

TENANT = "t-metrics"
CITY = "010"
BLOCK = "70010000077"
PARTY_A = "13812340001"
PARTY_B = "13812340002"


@dataclass
class Scrape:
    names: set[str]  # sample names: x_total, x_bucket, x_count...
    label_values: set[tuple[str, str]]  # every (label, value) of its samples


def scrape(url: str) -> Scrape:
    """What one /metrics answer holds."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    return Scrape({s.name for s in samples}, {pair for s in samples for pair in s.labels.items()})


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on loopback: answers the first request 500 (a failed delivery), every later one 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.answered = 0
        self.lock = threading.Lock()

    def status(self) -> int:
        with self.lock:
            self.answered += 1
            return 500 if self.answered == 1 else 200


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(self.server.status())
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Suite:
    processes: dict[str, ServiceProcess]
    tokens: dict[str, str]  # the key each service is called with here
    receiver_url: str
    sip_ports: dict[str, int]  # the SIP port of "sip" (asks translation) and "sip-down" (its translation is gone)


@pytest.fixture
def suite(redis_env: dict[str, str], tmp_path: Path) -> Iterator[Suite]:
    """The six services as processes: allocation, translation, cdr and events started together, then binding (it
    needs allocation's address) and two SIP adapters as carrier cmcc, one asking translation, one pointed at a
    closed port (every INVITE 503). The pool gauges refresh every 0.2 s instead of 15; events delivers to loopback
    over http with a short retry schedule. The callers' keys are minted first, so each process loads them at
    start-up."""
    tokens = {
        "allocation": mint_in(redis_env, Role.OPERATOR),
        "binding": mint_in(redis_env, Role.TENANT, TENANT),
        "translation": mint_in(redis_env, Role.CARRIER, "cmcc"),
        "cdr": mint_in(redis_env, Role.CARRIER, "cmcc"),
        "events": mint_in(redis_env, Role.TENANT, TENANT),
    }
    processes: dict[str, ServiceProcess] = {}
    environ = {**redis_env, "NUMPROTECT_METRICS": "on", "NUMPROTECT_METRICS_POOL_REFRESH": "0.2s"}
    events_env = {
        "NUMPROTECT_EVENTS_ALLOWED_NETWORKS": "127.0.0.0/8",
        "NUMPROTECT_EVENTS_ALLOW_HTTP": "on",
        "NUMPROTECT_EVENTS_RETRY_SCHEDULE": "200ms",
        "NUMPROTECT_EVENTS_RETENTION": "2h",
        "NUMPROTECT_EVENTS_POLL_INTERVAL": "50ms",
    }
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with ThreadPoolExecutor(max_workers=4) as starting:
            started = {
                s: starting.submit(ServiceProcess, s, {**environ, **(events_env if s == "events" else {})})
                for s in ("allocation", "translation", "cdr", "events")
            }
        for service, future in started.items():
            if future.exception() is None:
                processes[service] = future.result()
        for future in started.values():
            future.result()  # the first start that failed, raised (the others stop below)
        allocation = {"NUMPROTECT_ALLOCATION_ADDR": processes["allocation"].address}
        processes["binding"] = ServiceProcess("binding", {**environ, **allocation})
        for process in processes.values():
            process.wait_serving()
        carrier_token = tmp_path / "sip.token"
        carrier_token.write_text(mint_in(redis_env, Role.CARRIER, "cmcc"))
        carrier_token.chmod(0o600)
        sip_ports = {"sip": free_port(), "sip-down": free_port()}
        translation_addresses = {"sip": processes["translation"].address, "sip-down": f"127.0.0.1:{free_port()}"}
        for name, port in sip_ports.items():
            processes[name] = ServiceProcess(
                "sip",
                {
                    **environ,
                    "NUMPROTECT_TRANSLATION_ADDR": translation_addresses[name],
                    "NUMPROTECT_SERVICE_TOKEN_FILE": str(carrier_token),
                    "NUMPROTECT_SIP_PORT": str(port),
                },
            )
        yield Suite(processes, tokens, f"http://127.0.0.1:{receiver.server_address[1]}/hook", sip_ports)
    finally:
        receiver.shutdown()
        receiver.server_close()
        for process in reversed(processes.values()):
            process.stop()
            print(f"--- {process.service} log (last 30 lines) ---", *process.lines[-30:], sep="\n")


def eventually(call: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """`call()` again every 0.1 s until `done` says its answer is the one wanted; that answer."""
    deadline = time.monotonic() + timeout
    while True:
        reply = call()
        if done(reply):
            return reply
        assert time.monotonic() < deadline, f"still {reply} after {timeout}s"
        time.sleep(0.1)


def _translate_once_the_block_is_known(translation: Any, request: translation_pb2.TranslateRequest) -> Any:
    """The answer to `request`, or None while translation does not know yet that the block is the carrier's."""
    try:
        return translation.Translate(request, timeout=10)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.PERMISSION_DENIED:  # type: ignore[attr-defined]
            raise
        return None


def drive_calls(suite: Suite) -> None:
    """A webhook endpoint, a block imported, a binding made (its binding.created webhook fails once, then is
    delivered), calls translated (connect and reject), a CDR ingested, and a call refused for its missing key:
    enough for the labelled series to appear."""
    processes, tokens = suite.processes, suite.tokens
    with (
        processes["events"].channel(tokens["events"]) as to_events,
        processes["allocation"].channel(tokens["allocation"]) as to_allocation,
        processes["binding"].channel(tokens["binding"]) as to_binding,
        processes["translation"].channel(tokens["translation"]) as to_translation,
        processes["cdr"].channel(tokens["cdr"]) as to_cdr,
        processes["translation"].channel() as anonymous,
    ):
        events: Any = events_pb2_grpc.EventServiceStub(to_events)
        events.CreateEndpoint(events_pb2.CreateEndpointRequest(url=suite.receiver_url), timeout=10)
        allocation: Any = allocation_pb2_grpc.AllocationServiceStub(to_allocation)
        allocation.ImportBlock(
            allocation_pb2.ImportBlockRequest(
                block=BLOCK, tenant_id=TENANT, city_code=CITY, actor="test", carrier_id="cmcc"
            ),
            timeout=10,
        )
        binding: Any = binding_pb2_grpc.BindingServiceStub(to_binding)
        created = binding.CreateBinding(
            binding_pb2.CreateBindingRequest(
                tenant_id=TENANT,
                out_order_id="order-metrics-1",
                mode=common_pb2.BINDING_MODE_AXB,
                party_a=PARTY_A,
                party_b=PARTY_B,
                ttl=duration_pb2.Duration(seconds=3600),
                city_code=CITY,
                user_consent=True,
            ),
            timeout=10,
        ).binding
        translation: Any = translation_pb2_grpc.TranslationServiceStub(to_translation)
        request = translation_pb2.TranslateRequest(
            calling_number=PARTY_A, called_number=created.virtual_number, call_id="call-metrics-1"
        )
        # translation and cdr learn the new block's carrier on their next reload of the carriers' table: until then
        # the carrier's call is PERMISSION_DENIED (OTHER_CARRIER), which the loop waits out like a non-CONNECT answer.
        connected = eventually(
            lambda: _translate_once_the_block_is_known(translation, request),
            lambda reply: reply is not None and reply.decision == translation_pb2.DECISION_CONNECT,
        )
        translation.Translate(
            translation_pb2.TranslateRequest(
                calling_number="13899990000", called_number=created.virtual_number, call_id="call-metrics-2"
            ),
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as refused:
            translation_pb2_grpc.TranslationServiceStub(anonymous).Translate(  # type: ignore[no-untyped-call]
                translation_pb2.TranslateRequest(calling_number=PARTY_A, called_number=created.virtual_number),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        record = cdr_pb2.CallDetailRecord(
            call_id="call-metrics-1",
            binding_id=created.binding_id,
            tenant_id=TENANT,
            calling_number=PARTY_A,
            called_number=created.virtual_number,
            target_number=PARTY_B,
            display_number=created.virtual_number,
            call_type=cdr_pb2.CALL_TYPE_A_TO_PEER,
            release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
            release_cause=16,
            unconnected_cause=cdr_pb2.UNCONNECTED_CAUSE_NONE,
            carrier_id="cmcc",
            call_ref=connected.call_ref,
        )
        start_ms = int(time.time() * 1000) - 60_000
        record.call_time.FromMilliseconds(start_ms)
        record.answer_time.FromMilliseconds(start_ms + 5_000)
        record.release_time.FromMilliseconds(start_ms + 35_000)
        cdr: Any = cdr_pb2_grpc.CdrServiceStub(to_cdr)
        eventually(
            lambda: cdr.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[record]), timeout=10),
            lambda reply: reply.accepted == 1,
        )
    drive_sip_calls(suite, created.virtual_number)


def drive_sip_calls(suite: Suite, virtual_number: str) -> None:
    """A call through the adapter (302 once its TranslateStreams are up), and one through the adapter without
    translation (503, a translation failure), retransmitted once."""
    with SipClient(suite.sip_ports["sip"]) as sip:
        calls = iter(range(1000))

        def invite() -> int:
            n = next(calls)
            branch = f"z9hG4bK-metrics-{n}"
            return sip.request(
                "INVITE", virtual_number, caller=PARTY_A, call_id=f"sip-metrics-{n}", branch=branch
            ).status

        eventually(invite, lambda status: status == 302)
    with SipClient(suite.sip_ports["sip-down"]) as down:
        branch = "z9hG4bK-metrics-down"
        for ack in (False, True):  # the same INVITE twice: the second is a retransmission, answered the same
            answer = down.request(
                "INVITE", virtual_number, caller=PARTY_A, call_id="sip-metrics-down", branch=branch, ack=ack
            )
            assert answer.status == 503, answer.text


@pytest.mark.slow
def test_every_metric_the_dashboard_and_the_rules_read_is_exposed(suite: Suite, redis_sync: Any) -> None:
    urls: dict[str, str] = {}
    for service, process in suite.processes.items():
        assert process.metrics_url, f"{service} logged no metrics_url in its serving line"
        urls[service] = process.metrics_url
    drive_calls(suite)
    # An outbox entry of a type no producer writes: the router drops it, counted with its reason.
    add_entry(redis_sync, 42, {"ty": "binding.renamed", "tn": TENANT, "at": "1", "src": "b-1", "n": "1", "d": ""})
    found = reads()
    scraped: dict[str, Scrape] = {}
    deadline = time.monotonic() + 15
    while True:
        # The pool gauges are refreshed on a timer: scrape until nothing is missing or the time is up.
        scraped = {service: scrape(url) for service, url in urls.items()}
        missing = missing_from(set().union(*(s.names for s in scraped.values())), found)
        values = set().union(*(s.label_values for s in scraped.values()))
        missing_labels = missing_values(values, found)
        if (not missing and not missing_labels) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"read by the dashboard or the rules but exposed by no service: {missing}"
    # A matcher such as state="free" or grpc_method="Translate" selects nothing if no series has that value.
    assert not missing_labels, f"label values matched by the dashboard or the rules but on no series: {missing_labels}"
    # docs/operations.md's tables name every family the services expose, with its type, and nothing else.
    exposed: dict[str, str] = {}
    for url in urls.values():
        exposed.update(exposed_families(url))
    assert documented_families() == exposed
    # The families every process exposes (the gRPC server's, Redis health, the process collector, build info).
    for service, scraped_by in scraped.items():
        names = scraped_by.names
        for name in (
            "grpc_server_handled_total",
            "grpc_server_handling_seconds_bucket",
            "numprotect_build_info",
            "numprotect_redis_up",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
        ):
            assert name in names, f"{service} does not expose {name}"
