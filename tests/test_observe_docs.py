"""
docs/operations.md, "Metrics": the example alert rules are valid for
Prometheus (`promtool check rules`) and fire when they should (`promtool
test rules` on made-up series); every metric the collectors make is listed
there, and nothing listed is missing from them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.observe.metrics import ServerCollector, SiteCollector, metrics_registry
from rtunnel.roles.site import ReplicaFigures
from tests import test_observe_metrics
from tests.test_observe_metrics import PROMTOOL_MISSING, ServerSetup, admitted
from tests.test_observe_stats import FakeSession

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")

#: promtool's unit test of the rules: what must fire, and what must not.
RULE_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'rtunnel_site_up{instance="s:5501",site="down"}'
        values: '1 1 0 0 0 0 0 0 0 0'
      - series: 'rtunnel_site_up{instance="s:5501",site="fine"}'
        values: '1 1 1 1 1 1 1 1 1 1'
      - series: 'rtunnel_site_rtt_seconds{instance="s:5501",site="far"}'
        values: '0.9x20'
      - series: 'rtunnel_refusals_total{instance="s:5501",kind="stream"}'
        values: '0+60x20'
      - series: 'rtunnel_tunnel_reconnect_attempts_total{instance="t:5502",reason="network"}'
        values: '0+1x20'
    alert_rule_test:
      - eval_time: 6m
        alertname: RtunnelSiteDown
        exp_alerts: []
      - eval_time: 8m
        alertname: RtunnelSiteDown
        exp_alerts:
          - exp_labels: {severity: page, instance: "s:5501", site: down}
            exp_annotations: {summary: "site down has had no tunnel for 5 minutes"}
      - eval_time: 16m
        alertname: RtunnelSiteRTTHigh
        exp_alerts:
          - exp_labels: {severity: ticket, instance: "s:5501", site: far}
            exp_annotations: {summary: "site far keepalive round trip 900ms"}
      - eval_time: 16m
        alertname: RtunnelRefusalsRising
        exp_alerts:
          - exp_labels: {severity: ticket, instance: "s:5501", kind: stream}
            exp_annotations: {summary: "stream refusals at 1/s for 10 minutes (reasons: /api/v1/refusals)"}
      - eval_time: 16m
        alertname: RtunnelTunnelFlapping
        exp_alerts:
          - exp_labels: {severity: ticket, instance: "t:5502", reason: network}
            exp_annotations: {summary: "site reconnected 15 times in 15 minutes (network)"}
"""


def metrics_section() -> str:
    text = OPERATIONS.read_text()
    start = text.index("\n### Metrics\n")
    end = text.index("\n## ", start)
    return text[start:end]


def alert_rules() -> str:
    section = metrics_section()
    after = section[section.index("#### Example alert rules") :]
    match = re.search(r"```yaml\n(.*?)```", after, re.S)
    assert match is not None, "no yaml block after 'Example alert rules'"
    return match.group(1)


class AlertRulesTests(SynchronousTestCase):
    def setUp(self) -> None:
        if PROMTOOL is None:
            self.skipTest(PROMTOOL_MISSING)
        self.directory = Path(tempfile.mkdtemp(prefix="rtunnel-rules-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        (self.directory / "rules.yml").write_text(alert_rules())

    def promtool(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert PROMTOOL is not None
        return subprocess.run(
            [PROMTOOL, *args], cwd=self.directory, capture_output=True, text=True, timeout=60, check=False
        )

    def test_rules_check(self) -> None:
        """`promtool check rules` accepts the documented rules (the four of them)."""
        result = self.promtool("check", "rules", "rules.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS: 4 rules found", result.stdout)

    def test_rules_fire(self) -> None:
        """
        On made-up series, each rule fires when it should: a site down 5
        minutes (not a minute earlier, and not a site that stays up), a
        round trip above 0.5 s, refusals at 1/s, a tunnel reconnecting
        every minute.
        """
        (self.directory / "tests.yml").write_text(RULE_TESTS)
        result = self.promtool("test", "rules", "tests.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class MetricListTests(SynchronousTestCase):
    def test_every_metric_listed(self) -> None:
        """
        The tables of the section name exactly the rtunnel_ metrics the two
        collectors make (with some of everything counted, so that every
        family has samples).
        """
        setup = ServerSetup(self, forwards=("8080:alpha:10.0.0.5:554",))
        setup.service.admission.replace({"alpha": admitted()})
        figures = setup.figures
        session = FakeSession()
        session.last_rtt = 0.001
        figures.session_opened("alpha", session)
        figures.sites["alpha"].local_open(0, "")
        figures.handshake("ok")
        figures.enrollment("ok")
        figures.refuse("", "handshake", "x")
        figures.door("socks5").refused("limits", "", "x")
        service = test_observe_metrics.SiteCollectorTests.Service("alpha")
        tunnel = FakeSession()
        tunnel.last_rtt = 0.001
        service.figures.attach(tunnel)
        service.figures.opened()
        service.figures.reconnect()
        service.figures.remote_open(0, "")
        service.replica_figures = ReplicaFigures(1, (("cloud-1:5500", True),))
        made = set()
        for collector in (ServerCollector(setup.service), SiteCollector(service)):  # type: ignore[arg-type]
            text = generate_latest(metrics_registry(collector)).decode()
            for family in text_string_to_metric_families(text):
                made |= {s.name for s in family.samples if s.name.startswith("rtunnel_")}
        listed = set(re.findall(r"^\| `(rtunnel_[a-z_]+)` \|", metrics_section(), re.M))
        self.assertEqual(listed, made)
