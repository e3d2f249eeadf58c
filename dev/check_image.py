#!/usr/bin/env python3
"""The image and the task definitions agree on where a container may write.

With a read-only root filesystem, a container writes only into its mount
points; on Fargate a bind-mount task volume is owned by root unless the
image declares the same path as a VOLUME (then it takes the directory's
owner from the image). The image runs as a non-root user, so:

  1. every ECS container with ReadonlyRootFilesystem mounts each directory
     its environment points a writable setting at (`*_DIR` variables, such
     as TRACKER_SPOOL_DIR) inside one of its mount points;
  2. every mount point of a container running the service image is a
     VOLUME of the Dockerfile's last stage, which also sets a non-root USER.

Usage: dev/check_image.py [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path, PurePosixPath

import yaml

from check_env_drift import CfnLoader


def runtime_stage(dockerfile: str) -> tuple[set[str], str | None]:
    """VOLUME paths and the USER of the Dockerfile's last stage."""
    volumes: set[str] = set()
    user = None
    lines, current = [], ""
    for raw in dockerfile.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current = f"{current} {line[:-1]}" if line.endswith("\\") else f"{current} {line}"
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    for line in lines:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            volumes, user = set(), None
        elif word == "VOLUME":
            rest = rest.strip()
            paths = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            volumes |= {str(PurePosixPath(p)) for p in paths}
        elif word == "USER":
            user = rest.strip()
    return volumes, user


def inside(path: str, root: str) -> bool:
    p, r = PurePosixPath(path), PurePosixPath(root)
    return p == r or r in p.parents


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    volumes, user = runtime_stage((args.root / "Dockerfile").read_text(encoding="utf-8"))
    failures = []
    if user is None or user.split(":")[0] in ("0", "root"):
        failures.append(f"the image's last stage runs as {user or 'root (no USER)'}")
    containers = 0
    for path in sorted((args.root / "cloudformation").glob("*.yaml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=CfnLoader) or {}
        for rid, res in (doc.get("Resources") or {}).items():
            if not isinstance(res, dict) or res.get("Type") != "AWS::ECS::TaskDefinition":
                continue
            for c in (res.get("Properties") or {}).get("ContainerDefinitions") or []:
                containers += 1
                where = f"{path.name} {rid}/{c.get('Name')}"
                mounts = [m.get("ContainerPath") for m in c.get("MountPoints") or []]
                if c.get("ReadonlyRootFilesystem") is True:
                    for env in c.get("Environment") or []:
                        name, value = env.get("Name", ""), env.get("Value")
                        if name.endswith("_DIR") and isinstance(value, str):
                            if not any(inside(value, m) for m in mounts if isinstance(m, str)):
                                failures.append(
                                    f"{where}: {name}={value} is on the read-only root filesystem (mount points: {mounts or 'none'})"
                                )
                for m in mounts:
                    if isinstance(m, str) and str(PurePosixPath(m)) not in volumes:
                        failures.append(
                            f"{where}: mounts {m}, which the image does not declare as a VOLUME "
                            f"(declared: {sorted(volumes) or 'none'}): on Fargate it would be owned by root"
                        )
    for f in failures:
        print(f"FAIL {f}")
    print(
        f"image: user {user}, VOLUME {' '.join(sorted(volumes)) or 'none'}, "
        f"{containers} containers, {len(failures)} failure(s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
