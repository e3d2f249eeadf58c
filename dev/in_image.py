#!/usr/bin/env python3
"""Runs a binary of the workspace as the service image runs it, without a
container engine: in a chroot of the image's Debian release, built by
following the Dockerfile's runtime stage, as the image's user, on a
read-only root filesystem, with the image's VOLUME directory a mounted,
writable directory of the host (as an ECS task volume is, owned as the
image's directory is).

  in_image.py build
      Makes (or reuses) the root filesystem: `debootstrap --variant=minbase`
      of the release of the runtime stage's FROM (debian:<release>-slim),
      then the stage's RUN instructions executed in it with its SHELL. Kept
      under ${XDG_CACHE_HOME:-~/.cache}/adtrack/rootfs/<hash of the stage>
      and made again only when the stage changes. Prints its path.

  in_image.py run --volume DIR [--env NAME=VALUE]... -- BINARY [ARG]...
      Copies the workspace's built binaries (the ones the stage's COPY puts
      in /usr/local/bin, from --bin-dir, by default CARGO_TARGET_DIR/debug
      or target/debug) into the root filesystem, fills DIR as the image's VOLUME
      directory (its contents, owner and mode), and then replaces itself
      with BINARY: in a private mount namespace, root bind-mounted
      read-only, /proc and /dev mounted, DIR on the VOLUME path, as the
      stage's USER, in its WORKDIR, with only the given environment. The
      process keeps this one's PID, so a caller can signal it.

Needs root (unshare, mount, chroot), debootstrap and the machine's apt
sources (the mirror is taken from them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runtime_stage(dockerfile: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of the last stage, continuations joined,
    comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in dockerfile.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, rest.strip()))
    if not stages:
        sys.exit("in_image: no FROM in the Dockerfile")
    return stages[-1]


def release_of(stage: list[tuple[str, str]]) -> str:
    image = stage[0][1].split()[0]
    m = re.fullmatch(r"debian:([a-z]+)(?:-slim)?", image)
    if not m:
        sys.exit(f"in_image: the runtime stage is FROM {image}; only debian:<release>[-slim] can be rebuilt here")
    return m.group(1)


def mirror() -> str:
    """The Debian mirror the machine's apt uses."""
    sources = Path("/etc/apt/sources.list.d")
    texts = [p.read_text(encoding="utf-8") for p in sorted(sources.glob("*.sources"))]
    for text in texts:
        for block in text.split("\n\n"):
            fields = dict(
                (k.strip(), v.strip())
                for k, _, v in (line.partition(":") for line in block.splitlines())
                if v
            )
            uris = fields.get("URIs", "").split()
            suites = fields.get("Suites", "").split()
            if uris and any(s and "-" not in s for s in suites):
                return uris[0]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "-" not in parts[2]:
                return parts[1]
    sys.exit("in_image: no Debian mirror in the machine's apt sources")


def json_or_shell(args: str) -> list[str] | str:
    if args.startswith("["):
        return json.loads(args)
    return args


def quiet(argv: list[str], env: dict[str, str] | None = None) -> None:
    """Runs argv; its output is shown only when it fails."""
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout)
        sys.exit(f"in_image: {shlex.join(argv[:3])} ... failed (exit {done.returncode})")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adtrack" / "rootfs"


def build() -> tuple[Path, list[tuple[str, str]]]:
    stage = runtime_stage((ROOT / "Dockerfile").read_text(encoding="utf-8"))
    key = hashlib.sha256(json.dumps([i for i in stage if i[0] in ("FROM", "SHELL", "RUN")]).encode()).hexdigest()[:16]
    rootfs = cache_dir() / key
    if (rootfs / ".complete").exists():
        return rootfs, stage
    if shutil.which("debootstrap") is None:
        sys.exit("in_image: debootstrap is missing (./dev/test installs it)")
    cache_dir().mkdir(parents=True, exist_ok=True)
    partial = rootfs.with_name(key + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    release = release_of(stage)
    print(f"in_image: debootstrap --variant=minbase {release} (once per runtime stage)", file=sys.stderr)
    quiet(["debootstrap", "--variant=minbase", release, str(partial), mirror()])
    shell = ["/bin/sh", "-c"]
    shutil.copy("/etc/resolv.conf", partial / "etc/resolv.conf")
    for word, args in stage[1:]:
        if word == "SHELL":
            shell = json_or_shell(args)
        elif word == "RUN":
            cmd = json_or_shell(args)
            argv = cmd if isinstance(cmd, list) else shell + [cmd]
            script = "mount -t proc proc {root}/proc && exec chroot {root} {argv}".format(
                root=shlex.quote(str(partial)), argv=" ".join(shlex.quote(a) for a in argv)
            )
            quiet(
                ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
                env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"},
            )
    (partial / "etc/resolv.conf").unlink(missing_ok=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    partial.rename(rootfs)
    (rootfs / ".complete").touch()
    # Root filesystems of earlier versions of the stage are of no more use.
    for other in cache_dir().iterdir():
        if other.is_dir() and other.name != key:
            shutil.rmtree(other, ignore_errors=True)
    return rootfs, stage


def last(stage: list[tuple[str, str]], word: str) -> str | None:
    values = [a for w, a in stage if w == word]
    return values[-1] if values else None


def copied_binaries(stage: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """Where the stage's COPY --from=builder puts the binaries, and which
    ones the builder stage installs there."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    names = re.findall(r"target/release/([a-z-]+)", dockerfile.split("AS lambda-builder")[0])
    for word, args in stage:
        if word == "COPY" and "--from=builder" in args:
            dest = args.split()[-1]
            return dest, sorted(set(names))
    sys.exit("in_image: the runtime stage copies no binaries from the builder stage")


def run(args: argparse.Namespace) -> None:
    rootfs, stage = build()
    dest, names = copied_binaries(stage)
    target = Path(args.bin_dir) if args.bin_dir else Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target") / "debug"
    bindir = rootfs / dest.lstrip("/")
    bindir.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = target / name
        if not src.exists():
            sys.exit(f"in_image: {src} is not built (cargo build --bins)")
        tmp = bindir / f".{name}.new"
        shutil.copyfile(src, tmp)
        tmp.chmod(0o755)
        tmp.rename(bindir / name)
    volume = last(stage, "VOLUME")
    if volume is None:
        sys.exit("in_image: the runtime stage declares no VOLUME")
    vol_path = json_or_shell(volume)
    vol_path = vol_path[0] if isinstance(vol_path, list) else vol_path.split()[0]
    image_dir = rootfs / vol_path.lstrip("/")
    host = Path(args.volume)
    host.mkdir(parents=True, exist_ok=True)
    # As a task volume is: the image directory's contents, owner and mode.
    subprocess.run(["cp", "-a", f"{image_dir}/.", str(host)], check=True)
    st = image_dir.stat()
    os.chown(host, st.st_uid, st.st_gid)
    os.chmod(host, st.st_mode & 0o7777)
    user = last(stage, "USER") or "0:0"
    workdir = last(stage, "WORKDIR") or "/"
    r = shlex.quote(str(rootfs))
    setup = " && ".join(
        [
            f"mount --bind {r} {r}",
            f"mount -o remount,bind,ro {r}",
            f"mount -t proc proc {r}/proc",
            f"mount --rbind /dev {r}/dev",
            f"mount --bind {shlex.quote(str(host))} {r}{shlex.quote(vol_path)}",
        ]
    )
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/nonexistent", *args.env]
    inner = ["chroot", f"--userspec={user}", str(rootfs), "/usr/bin/env", "-i", f"--chdir={workdir}", *env, *args.command]
    script = setup + " && exec " + " ".join(shlex.quote(a) for a in inner)
    os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("build")
    r = sub.add_parser("run")
    r.add_argument("--volume", required=True)
    r.add_argument("--env", action="append", default=[])
    r.add_argument("--bin-dir")
    r.add_argument("command", nargs="+")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("in_image: needs root (mount namespaces and chroot)")
    if args.what == "build":
        print(build()[0])
    else:
        run(args)


if __name__ == "__main__":
    main()
