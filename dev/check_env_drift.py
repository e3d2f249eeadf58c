#!/usr/bin/env python3
"""Environment drift check: the variables the CloudFormation templates give
each binary against the variables that binary reads.

A binary's variables are the `env = "NAME"` attributes of its clap config
(tracker/src/config.rs, consumer/src/config.rs, consumer/src/lambda_config.rs,
consumer/src/write_config.rs (the group both consumer configs flatten),
updater/src/main.rs and updater/src/store_config.rs, updater/src/lambda_config.rs,
and the argument groups they share: service/src/lib.rs (LOG_FORMAT),
reader/src/dead_letter.rs (DEAD_LETTER_TABLE), reader/src/lease.rs
(CHECKPOINT_TABLE)). A template's are the `Environment` and `Secrets` names of
the ECS container that runs the binary (matched by its command, else its
name) and the `Environment.Variables` of each Lambda function running on a
`provided.*` runtime (matched by its `adtrack:binary` tag). Standard `AWS_*` variables are ignored on both sides.

Every difference is printed. The default run fails only on a variable that
is in a template but not read by its binary and not listed in PENDING; with
--strict every difference fails (PENDING included).

Usage: dev/check_env_drift.py [--strict] [--root DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Variables the templates already set but the binaries do not read yet,
# because the code that reads them is still being written. Tolerated by the
# default run (reported as pending), failures under --strict. Empty this set
# once the binaries read them.
PENDING: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Binary:
    """A binary and where its configuration is declared."""

    name: str  # what the container command starts, or "consumer-lambda"
    label: str
    sources: tuple[str, ...]  # globs relative to the repository root
    kind: str  # "ecs" or "lambda"
    required: bool = True  # False: skipped with a note while the sources are missing


# The argument groups the binaries share: LOG_FORMAT (service), DEAD_LETTER_TABLE
# (the reader's dead letters) and, for the pollers, CHECKPOINT_TABLE (its leases).
SHARED_LAMBDA: tuple[str, ...] = ("service/src/lib.rs", "reader/src/dead_letter.rs")
SHARED_READER: tuple[str, ...] = SHARED_LAMBDA + ("reader/src/lease.rs",)

BINARIES: tuple[Binary, ...] = (
    Binary("tracker", "tracker (ECS)", ("tracker/src/config.rs",), "ecs"),
    Binary(
        "consumer",
        "consumer (ECS)",
        ("consumer/src/config.rs", "consumer/src/write_config.rs") + SHARED_READER,
        "ecs",
    ),
    Binary(
        "consumer-lambda",
        "consumer (Lambda)",
        ("consumer/src/lambda_config.rs", "consumer/src/write_config.rs", *SHARED_LAMBDA),
        "lambda",
        required=False,
    ),
    Binary(
        "updater-lambda",
        "updater (Lambda)",
        ("updater/src/lambda_config.rs", "updater/src/store_config.rs", *SHARED_LAMBDA),
        "lambda",
    ),
    # The ECS tasks run the command line and the sync (updater/src/main.rs
    # and the store settings it flattens); `updater stream`
    # (updater/src/stream_config.rs) runs only locally, the core-data
    # stream being read by the updater Lambda in AWS.
    Binary(
        "updater",
        "updater (ECS one-off)",
        ("updater/src/main.rs", "updater/src/store_config.rs"),
        "ecs",
    ),
)

ENV_ATTR = re.compile(r'\benv\s*=\s*"([A-Za-z_][A-Za-z0-9_]*)"')


# ---- templates -----------------------------------------------------------------


class CfnLoader(yaml.SafeLoader):
    """SafeLoader that reads CloudFormation's short tags (!Ref, !Sub, ...) as
    the long form ({"Ref": ...}, {"Fn::Sub": ...})."""


def _cfn_tag(loader: CfnLoader, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


CfnLoader.add_multi_constructor("!", _cfn_tag)


def branches(value):
    """Yields the values an Fn::If may stand for (the value itself otherwise)."""
    if isinstance(value, dict) and set(value) == {"Fn::If"}:
        args = value["Fn::If"]
        if isinstance(args, list) and len(args) == 3:
            for v in args[1:]:
                yield from branches(v)
        return
    if isinstance(value, dict) and value == {"Ref": "AWS::NoValue"}:
        return
    yield value


def names_in_list(entries) -> set[str]:
    """Names of an ECS Environment or Secrets list."""
    names: set[str] = set()
    for lst in branches(entries):
        if not isinstance(lst, list):
            continue
        for entry in lst:
            for item in branches(entry):
                if isinstance(item, dict) and isinstance(item.get("Name"), str):
                    names.add(item["Name"])
    return names


def names_in_map(variables) -> set[str]:
    """Names of a Lambda Environment.Variables map."""
    names: set[str] = set()
    for m in branches(variables):
        if isinstance(m, dict):
            names.update(k for k in m if isinstance(k, str) and not k.startswith("Fn::"))
    return names


@dataclass
class Site:
    """One place a template gives a binary its environment."""

    where: str
    binary: str
    names: set[str] = field(default_factory=set)


def service_containers(task_props: dict) -> list[dict]:
    """The containers of an ECS task definition that run the adtrack image
    (the foundation stack's repository), leaving out sidecars such as the
    metrics collector, whose images are someone else's."""
    return [
        c
        for c in task_props.get("ContainerDefinitions") or []
        if isinstance(c, dict) and "RepositoryUri" in repr(c.get("Image"))
    ]


def lambda_binary(props: dict) -> str:
    """The binary a Lambda function runs: its `adtrack:binary` tag."""
    for tag in props.get("Tags") or []:
        if isinstance(tag, dict) and tag.get("Key") == "adtrack:binary":
            return str(tag.get("Value"))
    return "(a Lambda without an adtrack:binary tag)"


def template_sites(root: Path) -> tuple[list[Site], list[str]]:
    sites: list[Site] = []
    problems: list[str] = []
    templates = sorted((root / "cloudformation").glob("*.yaml")) + sorted(
        (root / "cloudformation").glob("*.yml")
    )
    if not templates:
        problems.append("no templates under cloudformation/")
    for path in templates:
        rel = path.relative_to(root)
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=CfnLoader)
        except yaml.YAMLError as e:
            problems.append(f"{rel}: not readable YAML: {e}")
            continue
        resources = (doc or {}).get("Resources") or {}
        for logical_id, res in resources.items():
            if not isinstance(res, dict):
                continue
            props = res.get("Properties") or {}
            if res.get("Type") == "AWS::ECS::TaskDefinition":
                for container in service_containers(props):
                    command = container.get("Command")
                    binary = (
                        command[0]
                        if isinstance(command, list) and command and isinstance(command[0], str)
                        else container.get("Name")
                    )
                    names = names_in_list(container.get("Environment")) | names_in_list(
                        container.get("Secrets")
                    )
                    sites.append(
                        Site(f"{rel} {logical_id}/{container.get('Name')}", str(binary), names)
                    )
            elif res.get("Type") == "AWS::Lambda::Function":
                runtime = props.get("Runtime")
                if isinstance(runtime, str) and runtime.startswith("provided"):
                    env = props.get("Environment") or {}
                    names = names_in_map(env.get("Variables") if isinstance(env, dict) else None)
                    sites.append(Site(f"{rel} {logical_id}", lambda_binary(props), names))
    return sites, problems


# ---- binaries ------------------------------------------------------------------


def read_by(root: Path, binary: Binary) -> tuple[set[str], list[Path]] | None:
    files: list[Path] = []
    for pattern in binary.sources:
        files.extend(sorted(root.glob(pattern)))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("//"):
                continue
            names.update(ENV_ATTR.findall(line))
    return names, files


def relevant(names: set[str]) -> set[str]:
    return {n for n in names if not n.startswith("AWS_")}


# ---- report --------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="fail on every difference")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="repository root (default: the one holding this script)",
    )
    args = parser.parse_args()
    root: Path = args.root

    sites, problems = template_sites(root)
    failures: list[str] = list(problems)
    differences = 0

    known = {b.name for b in BINARIES}
    for site in sites:
        if site.binary not in known:
            failures.append(
                f"{site.where}: runs '{site.binary}', which this check does not know "
                "(add it to BINARIES in dev/check_env_drift.py)"
            )

    for binary in BINARIES:
        found = read_by(root, binary)
        mine = [s for s in sites if s.binary == binary.name]
        if found is None:
            sources = ", ".join(binary.sources)
            if binary.required:
                failures.append(f"{binary.label}: no source file at {sources}")
            else:
                print(f"{binary.label}: skipped, {sources} does not exist yet")
            continue
        read, files = found
        read = relevant(read)
        if not mine:
            failures.append(f"{binary.label}: no template gives it an environment")
            continue
        for site in mine:
            given = relevant(site.names)
            missing = sorted(read - given)
            extra = sorted(given - read)
            pending = [n for n in extra if n in PENDING]
            unknown = [n for n in extra if n not in PENDING]
            status = "match" if not (missing or extra) else "DIFFERS"
            print(f"{binary.label}: {site.where}: {len(given)} set, {len(read)} read: {status}")
            if missing:
                differences += len(missing)
                print(f"  read by the binary, not in the template: {', '.join(missing)}")
            if pending:
                differences += len(pending)
                print(
                    "  in template, not read by the binary (pending, see PENDING): "
                    + ", ".join(pending)
                )
            if unknown:
                differences += len(unknown)
                print(f"  in template, not read by the binary: {', '.join(unknown)}")
                failures.append(
                    f"{site.where}: sets {', '.join(unknown)}, which "
                    f"{', '.join(str(f.relative_to(root)) for f in files)} does not read"
                )
            if args.strict and (missing or extra):
                failures.append(f"{site.where}: differs from {binary.label} (--strict)")

    read_anywhere: set[str] = set()
    for binary in BINARIES:
        found = read_by(root, binary)
        if found is not None:
            read_anywhere |= found[0]
    caught_up = sorted(PENDING & read_anywhere)
    if caught_up:
        print(f"note: PENDING names now read by a binary (remove them): {', '.join(caught_up)}")

    for f in failures:
        print(f"FAIL: {f}")
    mode = "strict" if args.strict else "default"
    print(
        f"env drift ({mode}): {len(sites)} template sites, {differences} difference(s), "
        f"{len(failures)} failure(s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
