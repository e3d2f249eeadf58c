#!/usr/bin/env python3
"""adtrack's own metrics in CloudWatch: the alarms and the dashboard watch
what the binaries really emit, by a name and dimensions that really arrive.

The ECS services' metrics reach CloudWatch through the collector beside each
task (an ADOT container whose config is in AOT_CONFIG_CONTENT): it scrapes
the service's /metrics and forwards the metrics its awsemf exporter selects,
with the dimension sets declared for them (Service=<job>, plus labels). The
Lambdas write embedded metric format themselves (dimension Function plus
each metric's labels). Checked here:

  1. each collector scrapes its own task's service on the task's loopback at
     the admin port the service listens on (its *_ADMIN_ADDR), into
     namespace adtrack;
  2. every alarm on namespace adtrack with dimension Service names a metric
     that the collector of that service forwards with exactly the alarm's
     dimension names; with dimension Function, a Lambda metric whose
     dimensions are Function and that metric's labels;
  3. with --seen FILE (what the tests saw the binaries expose: their
     /metrics and the Lambdas' EMF output, one "binary<TAB>name<TAB>labels"
     line each, written by adtrack-testkit under ADTRACK_METRICS_LOG): every
     metric an alarm, a collector selector or a dashboard widget names is
     one the binary exposed, with the labels used as dimensions.

Usage: check_metrics.py [--root DIR] [--seen FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from check_env_drift import CfnLoader, service_containers

NAMESPACE = "adtrack"
PLACEHOLDER = re.compile(r"\$\{[^}]+\}")


def sub_text(value) -> str | None:
    """The template text of a !Sub (either form), placeholders kept."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Sub" in value:
        inner = value["Fn::Sub"]
        return inner[0] if isinstance(inner, list) else inner
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    return None


def env_of(container: dict) -> dict[str, object]:
    return {
        e.get("Name"): e.get("Value")
        for e in container.get("Environment") or []
        if isinstance(e, dict)
    }


class Collector:
    def __init__(self, where: str, service: str, selectors: list[tuple[re.Pattern, list[set[str]]]]):
        self.where = where
        self.service = service
        self.selectors = selectors

    def dimension_sets(self, metric: str) -> list[set[str]]:
        out: list[set[str]] = []
        for pattern, sets in self.selectors:
            if pattern.search(metric):
                out.extend(sets)
        return out


def collectors_of(path: Path, rid: str, props: dict, failures: list[str]) -> list[Collector]:
    found = []
    services = service_containers(props)
    for c in props.get("ContainerDefinitions") or []:
        if not isinstance(c, dict):
            continue
        text = sub_text(env_of(c).get("AOT_CONFIG_CONTENT"))
        if text is None:
            continue
        where = f"{path.name} {rid}/{c.get('Name')}"
        try:
            config = yaml.safe_load(PLACEHOLDER.sub("PLACEHOLDER", text)) or {}
        except yaml.YAMLError as e:
            failures.append(f"{where}: AOT_CONFIG_CONTENT is not YAML: {e}")
            continue
        ports = set()
        for s in services:
            for name, value in env_of(s).items():
                if isinstance(name, str) and name.endswith("_ADMIN_ADDR") and isinstance(value, str):
                    ports.add(value.rsplit(":", 1)[-1])
        prom = ((config.get("receivers") or {}).get("prometheus") or {})
        if prom.get("trim_metric_suffixes") is not False:
            failures.append(f"{where}: the prometheus receiver must keep metric names as they are (trim_metric_suffixes: false)")
        jobs = (prom.get("config") or {}).get("scrape_configs") or []
        service = None
        for job in jobs:
            for sc in job.get("static_configs") or []:
                for target in sc.get("targets") or []:
                    host, _, port = str(target).rpartition(":")
                    if host not in ("127.0.0.1", "localhost"):
                        failures.append(f"{where}: scrapes {target}, not the task's own loopback")
                    if port not in ports:
                        failures.append(
                            f"{where}: scrapes port {port}, but the service listens for /metrics on {sorted(ports) or 'no admin port'}"
                        )
                service = (sc.get("labels") or {}).get("Service", service)
        if not service:
            failures.append(f"{where}: no static label Service on the scrape target")
            continue
        emf = ((config.get("exporters") or {}).get("awsemf") or {})
        if emf.get("namespace") != NAMESPACE:
            failures.append(f"{where}: awsemf namespace {emf.get('namespace')!r}, not {NAMESPACE!r}")
        pipelines = ((config.get("service") or {}).get("pipelines") or {}).get("metrics") or {}
        if "prometheus" not in (pipelines.get("receivers") or []) or "awsemf" not in (pipelines.get("exporters") or []):
            failures.append(f"{where}: the metrics pipeline does not run prometheus -> awsemf")
        selectors = []
        for decl in emf.get("metric_declarations") or []:
            sets = [set(d) for d in decl.get("dimensions") or []]
            for sel in decl.get("metric_name_selectors") or []:
                selectors.append((re.compile(sel), sets))
        found.append(Collector(where, service, selectors))
    return found


def alarm_metrics(props: dict):
    """(metric name, {dimension: value}) of each adtrack metric an alarm reads."""
    if props.get("Namespace") == NAMESPACE:
        yield props.get("MetricName"), dims(props.get("Dimensions"))
    for m in props.get("Metrics") or []:
        metric = ((m.get("MetricStat") or {}).get("Metric") or {})
        if metric.get("Namespace") == NAMESPACE:
            yield metric.get("MetricName"), dims(metric.get("Dimensions"))


def dims(items) -> dict[str, object]:
    return {d.get("Name"): d.get("Value") for d in items or [] if isinstance(d, dict)}


def dashboard_metrics(body: str):
    """(metric name, dimension names or None for a SEARCH) on the dashboard."""
    body = PLACEHOLDER.sub("X", body)
    doc = json.loads(body)
    for w in doc.get("widgets") or []:
        for row in (w.get("properties") or {}).get("metrics") or []:
            if row and isinstance(row[0], str) and row[0] == NAMESPACE:
                names = [x for x in row[2:] if isinstance(x, str)]
                yield row[1], set(names[0::2])
            elif row and isinstance(row[0], dict) and "expression" in row[0]:
                expr = row[0]["expression"]
                schema = re.search(r"\{" + NAMESPACE + r",([^}]*)\}", expr)
                name = re.search(r'MetricName="([^"]+)"', expr)
                if schema and name:
                    yield name.group(1), {d.strip() for d in schema.group(1).split(",") if d.strip()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--seen", type=Path)
    args = ap.parse_args()

    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    if args.seen:
        for line in args.seen.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                seen[(parts[0], parts[1])].update(x for x in parts[2].split(",") if x)

    failures: list[str] = []
    collectors: dict[str, Collector] = {}
    alarms = []
    dashboards = []
    for path in sorted((args.root / "cloudformation").glob("*.yaml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=CfnLoader) or {}
        for rid, res in (doc.get("Resources") or {}).items():
            if not isinstance(res, dict):
                continue
            props = res.get("Properties") or {}
            if res.get("Type") == "AWS::ECS::TaskDefinition":
                for c in collectors_of(path, rid, props, failures):
                    collectors[c.service] = c
            elif res.get("Type") == "AWS::CloudWatch::Alarm":
                for name, d in alarm_metrics(props):
                    alarms.append((f"{path.name} {rid}", name, d))
            elif res.get("Type") == "AWS::CloudWatch::Dashboard":
                body = sub_text(props.get("DashboardBody"))
                if body:
                    dashboards.append((f"{path.name} {rid}", body))

    def check_seen(where: str, binary: str, name: str, labels: set[str]) -> None:
        if not args.seen:
            return
        if (binary, name) not in seen:
            failures.append(f"{where}: {binary} was never seen exposing {name} in the tests")
        elif not labels <= seen[(binary, name)]:
            failures.append(
                f"{where}: {binary} exposes {name} with labels {sorted(seen[(binary, name)])}, not {sorted(labels)}"
            )

    for where, name, d in alarms:
        names = set(d)
        if "Service" in d:
            service = str(d["Service"])
            c = collectors.get(service)
            if c is None:
                failures.append(f"{where}: {name} with Service={service}, but no collector sends that service's metrics")
                continue
            if names not in c.dimension_sets(name):
                failures.append(
                    f"{where}: {name} with dimensions {sorted(names)}, but {c.where} sends it with "
                    f"{[sorted(s) for s in c.dimension_sets(name)] or 'nothing (no selector matches)'}"
                )
            check_seen(where, service, name, names - {"Service"})
        elif "Function" in d:
            function = str(d["Function"])
            labels = names - {"Function"}
            check_seen(where, function, name, labels)
            if args.seen and (function, name) in seen and seen[(function, name)] != labels:
                failures.append(
                    f"{where}: {function} writes {name} with dimensions Function+{sorted(seen[(function, name)])}, "
                    f"the alarm reads Function+{sorted(labels)}: it would see nothing"
                )
        else:
            failures.append(f"{where}: {name} in namespace {NAMESPACE} without a Service or Function dimension")

    for c in collectors.values():
        for pattern, sets in c.selectors:
            matched = [n for (b, n) in seen if b == c.service and pattern.search(n)]
            if args.seen and not matched:
                failures.append(f"{c.where}: selector {pattern.pattern} matches nothing {c.service} was seen exposing")
            for n in matched:
                for s in sets:
                    check_seen(c.where, c.service, n, s - {"Service"})

    widgets = 0
    for where, body in dashboards:
        for name, names in dashboard_metrics(body):
            widgets += 1
            if "Service" in names:
                hits = [c for c in collectors.values() if names in c.dimension_sets(name)]
                if not hits:
                    failures.append(f"{where}: {name} by {sorted(names)}, which no collector sends")
                for c in hits:
                    check_seen(where, c.service, name, names - {"Service"})
            elif "Function" in names:
                binaries = [b for (b, n) in seen if n == name and seen[(b, n)] == names - {"Function"}]
                if args.seen and not binaries:
                    failures.append(f"{where}: no Lambda was seen writing {name} with dimensions Function+{sorted(names - {'Function'})}")

    for f in failures:
        print(f"  FAIL: {f}")
    print(
        f"metrics: {len(collectors)} collector(s), {len(alarms)} alarm metric(s), "
        f"{widgets} dashboard metric(s), {len(seen)} metric(s) seen{'' if args.seen else ' (no --seen)'}, "
        f"{len(failures)} failure(s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
