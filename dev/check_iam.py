#!/usr/bin/env python3
"""Least privilege both ways: the AWS calls each binary makes against the
IAM role it runs under in the CloudFormation templates.

The calls come from the local stand-ins' call log (ADTRACK_AWS_CALL_LOG, see
dev/standin.js), written while ./dev/test runs every test against them: one
line per call, "app<TAB>service:Operation<TAB>resource", where app is the
AWS app name the binary calls with (adtrack-tracker, adtrack-consumer,
adtrack-consumer-lambda, adtrack-updater, adtrack-updater-lambda; tests that
run a Lambda's handler in process call with its name).

A binary's role is the TaskRoleArn of the ECS task definitions whose
container runs it (by command, else by name) or the Role of the Lambda
function tagged adtrack:binary with it.

Two checks, each difference printed, any one failing the run:
  1. every call made is granted: some statement of the role allows the
     action on the resource (the table or stream the template exports under
     that name), so the binary is not denied on its first deploy;
  2. every DynamoDB and Kinesis action the role grants is called by the
     binary (or, for a Lambda's stream reads, by its event source mapping),
     so nothing is granted that nothing uses.

Usage: dev/check_iam.py --calls FILE [--root DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from check_env_drift import CfnLoader, lambda_binary, service_containers

# The binaries deployed, by the app name they call AWS with.
DEPLOYED = {
    "adtrack-tracker": ("ecs", "tracker"),
    "adtrack-consumer": ("ecs", "consumer"),
    "adtrack-updater": ("ecs", "updater"),
    "adtrack-consumer-lambda": ("lambda", "consumer-lambda"),
    "adtrack-updater-lambda": ("lambda", "updater-lambda"),
}
# Apps that run only locally (no role in AWS), listed and skipped.
LOCAL_ONLY = {"adtrack-updater-stream": "updater stream (in AWS the updater Lambda reads the core-data stream)"}

# Local resource names (testkit's defaults) to the template's export stems.
RESOURCES = {
    ("dynamodb", "adtrack-events"): "EventsTable",
    ("dynamodb", "adtrack-checkpoints"): "CheckpointTable",
    ("dynamodb", "adtrack-dead-letters"): "DeadLetterTable",
    ("dynamodb", "adtrack-programs"): "ProgramsTable",
    ("dynamodb", "adtrack-conversions"): "ConversionsTable",
    ("dynamodb", "adtrack-customers"): "CustomersTable",
    ("kinesis", "adtrack-events"): "Stream",
    ("kinesis", "adtrack-core-data"): "CoreDataStream",
}

# What a Kinesis event source mapping calls on its function's behalf, with
# the function's role.
MAPPING_READS = {
    "kinesis:DescribeStream",
    "kinesis:DescribeStreamSummary",
    "kinesis:GetRecords",
    "kinesis:GetShardIterator",
    "kinesis:ListShards",
}

DATA_SERVICES = ("dynamodb:", "kinesis:")
EXPORT = re.compile(r"\$\{EnvironmentName\}-([A-Za-z]+?)Arn$")


def as_list(v):
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def resource_keys(resource) -> set[str]:
    """The export stems a statement's Resource entry refers to
    (`EventsTable`, `EventsTable/index`, ...), or "*"."""
    if isinstance(resource, str):
        return {"*"} if resource == "*" else {resource}
    keys: set[str] = set()
    if isinstance(resource, dict):
        if "Fn::ImportValue" in resource:
            inner = resource["Fn::ImportValue"]
            text = inner.get("Fn::Sub") if isinstance(inner, dict) else inner
            m = EXPORT.search(str(text))
            if m:
                keys.add(m.group(1))
        elif "Fn::Sub" in resource:
            sub = resource["Fn::Sub"]
            if isinstance(sub, list) and len(sub) == 2:
                template, variables = sub
                for name, value in (variables or {}).items():
                    for k in resource_keys(value):
                        if f"${{{name}}}/index/" in str(template):
                            keys.add(f"{k}/index")
                        else:
                            keys.add(k)
            else:
                keys.add(str(sub))
        elif "Fn::GetAtt" in resource:
            att = resource["Fn::GetAtt"]
            keys.add(str(att[0] if isinstance(att, list) else att).split(".")[0])
    return keys


def action_matches(granted: str, action: str) -> bool:
    if granted == "*" or granted == action:
        return True
    if granted.endswith("*"):
        return action.startswith(granted[:-1])
    return False


def load_templates(root: Path) -> dict[str, dict]:
    resources: dict[str, dict] = {}
    for path in sorted((root / "cloudformation").glob("*.yaml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=CfnLoader) or {}
        for logical_id, res in (doc.get("Resources") or {}).items():
            if isinstance(res, dict):
                resources[f"{path.name}:{logical_id}"] = res
    return resources


def role_id(ref, template: str) -> str | None:
    if isinstance(ref, dict) and "Fn::GetAtt" in ref:
        att = ref["Fn::GetAtt"]
        name = att[0] if isinstance(att, list) else str(att).split(".")[0]
        return f"{template}:{name}"
    return None


def roles_of(resources: dict[str, dict]) -> dict[str, set[str]]:
    """binary name -> role resource ids."""
    out: dict[str, set[str]] = defaultdict(set)
    for rid, res in resources.items():
        template = rid.split(":")[0]
        props = res.get("Properties") or {}
        if res.get("Type") == "AWS::ECS::TaskDefinition":
            role = role_id(props.get("TaskRoleArn"), template)
            for c in service_containers(props):
                cmd = c.get("Command")
                binary = cmd[0] if isinstance(cmd, list) and cmd else c.get("Name")
                if role:
                    out[str(binary)].add(role)
        elif res.get("Type") == "AWS::Lambda::Function":
            role = role_id(props.get("Role"), template)
            if role:
                out[lambda_binary(props)].add(role)
    return out


def statements(role: dict):
    for policy in (role.get("Properties") or {}).get("Policies") or []:
        for st in (policy.get("PolicyDocument") or {}).get("Statement") or []:
            if st.get("Effect") == "Allow":
                keys: set[str] = set()
                for r in as_list(st.get("Resource")):
                    keys |= resource_keys(r)
                yield st.get("Sid", "?"), [str(a) for a in as_list(st.get("Action"))], keys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", required=True, type=Path)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()

    calls: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for line in args.calls.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        app, action, names = parts
        service = action.split(":")[0]
        targets = [n for n in names.split(",") if n] or [""]
        for n in targets:
            key = RESOURCES.get((service, n), "" if n == "" else f"?{n}")
            calls[app].add((action, key))

    resources = load_templates(args.root)
    roles = roles_of(resources)
    failures = 0
    for app in sorted(set(calls) - set(DEPLOYED)):
        why = LOCAL_ONLY.get(app)
        if why:
            print(f"  {app}: runs only locally, no role: {why}")
        else:
            print(f"FAIL {app}: calls AWS but is not a known binary")
            failures += 1
    for app, (kind, binary) in sorted(DEPLOYED.items()):
        role_ids = roles.get(binary, set())
        if not role_ids:
            print(f"FAIL {binary}: no role found in the templates")
            failures += 1
            continue
        made = calls.get(app, set())
        if not made:
            print(f"FAIL {binary}: no calls recorded (did the tests run with ADTRACK_AWS_CALL_LOG?)")
            failures += 1
            continue
        grants = [
            (rid, sid, acts, keys)
            for rid in sorted(role_ids)
            for sid, acts, keys in statements(resources[rid])
        ]
        # 1. every call is granted
        for action, key in sorted(made):
            if key.startswith("?"):
                continue  # a resource the templates do not make (a bench's own)
            ok = any(
                any(action_matches(a, action) for a in acts)
                and ("*" in keys or key == "" or key in keys)
                for _, _, acts, keys in grants
            )
            if not ok:
                print(f"FAIL {binary}: calls {action} on {key or '(its stream)'}, not granted by {', '.join(sorted(role_ids))}")
                failures += 1
        # 2. every data action granted is called
        for rid, sid, acts, keys in grants:
            for a in acts:
                if not a.startswith(DATA_SERVICES):
                    continue
                if kind == "lambda" and a in MAPPING_READS:
                    continue
                for key in sorted(keys):
                    base = key.removesuffix("/index")
                    used = any(
                        action_matches(a, action) and (k == base or k == "")
                        for action, k in made
                    )
                    if not used:
                        print(f"FAIL {binary}: {rid} {sid} grants {a} on {key}, which it never calls")
                        failures += 1
        granted = sum(len(acts) for _, _, acts, _ in grants)
        print(f"  {binary}: {len(made)} distinct calls, {granted} granted actions in {', '.join(sorted(role_ids))}")
    print(f"iam: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
