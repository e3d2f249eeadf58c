#!/usr/bin/env python3
"""cloudformation/deploy and undeploy agree with the templates.

Runs both scripts with --dry-run (each consumer mode; undeploy with and
without --delete-data) and checks what they would do:

  1. deploy deploys every template under cloudformation/, each once, in an
     order where every Fn::ImportValue of a stack names an export of a stack
     deployed before it;
  2. each stack gets only parameters its template declares, and every one
     without a default;
  3. with --arch x86_64 and arm64: the images and Lambda zips are built for
     that platform, every stack with a CpuArchitecture parameter is given
     the matching value, and each ImageTag / LambdaCodeKey given names an
     image or zip the same run builds and pushes;
  4. undeploy removes stacks in the reverse of that order, and without
     --delete-data leaves the data stack and the ones it imports from.

Usage: check_deploy_plan.py [--root DIR]
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from check_env_drift import CfnLoader

ENV = "planned"
EXPORT = re.compile(r"\$\{EnvironmentName\}-([A-Za-z0-9]+)")


def walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def sub_names(value) -> set[str]:
    text = value
    if isinstance(value, dict) and "Fn::Sub" in value:
        text = value["Fn::Sub"]
    if isinstance(text, list):
        text = text[0]
    return set(EXPORT.findall(text)) if isinstance(text, str) else set()


def template_facts(path: Path):
    doc = yaml.load(path.read_text(encoding="utf-8"), Loader=CfnLoader) or {}
    params = doc.get("Parameters") or {}
    required = {k for k, v in params.items() if isinstance(v, dict) and "Default" not in v}
    exports: set[str] = set()
    for out in (doc.get("Outputs") or {}).values():
        if isinstance(out, dict) and isinstance(out.get("Export"), dict):
            exports |= sub_names(out["Export"].get("Name"))
    imports: set[str] = set()
    for node in walk(doc.get("Resources") or {}):
        if "Fn::ImportValue" in node:
            imports |= sub_names(node["Fn::ImportValue"])
    return set(params), required, exports, imports


def dry_run(root: Path, script: str, args: list[str]) -> list[list[str]]:
    done = subprocess.run(
        [str(root / "cloudformation" / script), "--region", "eu-west-1", "--env", ENV, "--dry-run", *args],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{script} --dry-run {' '.join(args)} failed: {done.stderr.strip()}")
    return [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]


def option(argv: list[str], name: str) -> list[str]:
    if name not in argv:
        return []
    i = argv.index(name) + 1
    values = []
    while i < len(argv) and not argv[i].startswith("--"):
        values.append(argv[i])
        i += 1
    return values


def value(argv: list[str], name: str) -> str | None:
    """The one value after NAME in ARGV."""
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    root = args.root
    facts = {p.stem: template_facts(p) for p in sorted((root / "cloudformation").glob("*.yaml"))}
    failures: list[str] = []
    common = ["--certificate-arn", "arn:aws:acm:eu-west-1:123456789012:certificate/planned", "--tag", "planned"]
    order: list[str] = []
    platforms = {"x86_64": ("linux/amd64", "X86_64"), "arm64": ("linux/arm64", "ARM64")}
    for mode, arch in (("lambda", "x86_64"), ("ecs", "x86_64"), ("lambda", "arm64"), ("ecs", "arm64")):
        where = f"deploy --consumer-mode {mode} --arch {arch}"
        commands = dry_run(root, "deploy", [*common, "--consumer-mode", mode, "--arch", arch])
        plan = [c for c in commands if c[:3] == ["aws", "cloudformation", "deploy"]]
        platform, cpu = platforms[arch]
        images: set[str] = set()
        pushed: set[str] = set()
        uploaded: set[str] = set()
        for c in commands:
            if c[:2] == ["docker", "build"]:
                if value(c, "--platform") != platform:
                    failures.append(f"{where}: docker build for {value(c, '--platform')}, not {platform}")
                if value(c, "-t"):
                    images.add(value(c, "-t").rsplit(":", 1)[-1])
            elif c[:2] == ["docker", "push"]:
                pushed |= {c[2].rsplit(":", 1)[-1]}
            elif c[:3] == ["aws", "s3", "cp"]:
                uploaded.add(c[4].split("/", 3)[-1])
        for c in plan:
            template = Path((option(c, "--template-file") or ["?"])[0]).stem
            given = dict(kv.split("=", 1) for kv in option(c, "--parameter-overrides"))
            if template in facts and "CpuArchitecture" in facts[template][0] and given.get("CpuArchitecture") != cpu:
                failures.append(f"{where}: {template} is given CpuArchitecture={given.get('CpuArchitecture')}, not {cpu}")
            if "ImageTag" in given and not {given["ImageTag"]} <= (images & pushed):
                failures.append(f"{where}: {template} runs image {given['ImageTag']}, which the run does not build and push")
            if "LambdaCodeKey" in given and given["LambdaCodeKey"] not in uploaded:
                failures.append(f"{where}: {template} runs {given['LambdaCodeKey']}, which the run does not upload")
        stacks = []
        for c in plan:
            name = (option(c, "--stack-name") or ["?"])[0]
            template = Path((option(c, "--template-file") or ["?"])[0]).stem
            if name != f"{ENV}-{template}":
                failures.append(f"{where}: {template} deployed as stack {name}, not {ENV}-{template}")
            stacks.append(template)
            if template not in facts:
                failures.append(f"{where}: deploys {template}, which is not a template")
                continue
            declared, required, _, _ = facts[template]
            given = {kv.split("=", 1)[0] for kv in option(c, "--parameter-overrides")}
            for k in sorted(given - declared):
                failures.append(f"{where}: {template} is given {k}, which its template does not declare")
            for k in sorted(required - given):
                failures.append(f"{where}: {template} is not given {k}, which has no default")
            if "CAPABILITY_NAMED_IAM" not in option(c, "--capabilities"):
                failures.append(f"{where}: {template} without CAPABILITY_NAMED_IAM")
        for t in sorted(set(facts) - set(stacks)):
            failures.append(f"{where}: never deploys {t}")
        for t in sorted({s for s in stacks if stacks.count(s) > 1}):
            failures.append(f"{where}: deploys {t} more than once")
        exported: set[str] = set()
        for t in stacks:
            if t not in facts:
                continue
            _, _, exports, imports = facts[t]
            for name in sorted(imports - exported):
                later = [s for s in stacks if name in facts.get(s, (set(), set(), set(), set()))[2]]
                failures.append(
                    f"{where}: {t} imports {name}, exported {'only later, by ' + later[0] if later else 'by no stack'}"
                )
            exported |= exports
        order = stacks

    for delete_data in (False, True):
        flags = ["--delete-data", "--yes"] if delete_data else []
        where = "undeploy" + (" --delete-data" if delete_data else "")
        removed = [
            (option(c, "--stack-name") or ["?"])[0].removeprefix(f"{ENV}-")
            for c in dry_run(root, "undeploy", flags)
            if c[:3] == ["aws", "cloudformation", "delete-stack"]
        ]
        expected = [s for s in reversed(order) if s in removed]
        if removed != expected:
            failures.append(f"{where}: removes {removed}, not in the reverse of the deploy order {expected}")
        if delete_data and sorted(removed) != sorted(order):
            failures.append(f"{where}: removes {removed}, not every stack")
        if not delete_data:
            kept = set(order) - set(removed)
            if "data" not in kept:
                failures.append(f"{where}: removes the data stack without --delete-data")
            for t in removed:
                needed = facts[t][2] & set().union(*(facts[k][3] for k in kept))
                if needed:
                    failures.append(f"{where}: removes {t}, whose exports {sorted(needed)} a kept stack imports")

    for f in failures:
        print(f"  FAIL: {f}")
    print(f"deploy plan (x86_64 and arm64): {len(order)} stacks in order ({', '.join(order)}), undeploy reversed, {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
