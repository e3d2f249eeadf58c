# Shared by dev/run, dev/test and dev/stop: installs what is missing and
# knows where things live. Sourced, not run.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="$ROOT/dev/.stack"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/adtrack/target}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {
  local sudo="$SUDO"
  if [ -z "${APT_UPDATED:-}" ]; then
    $sudo apt-get update -qq >/dev/null || die "apt-get update failed"
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

# Installs what the local stack and the build need, if missing.
ensure_tools() {
  command -v cargo >/dev/null || die "cargo is missing: install the Rust toolchain (rustup) first"
  command -v redis-server >/dev/null || { say "installing redis-server"; apt_install redis-server; }
  command -v node >/dev/null || { say "installing Node.js"; apt_install nodejs npm; }
  command -v npm >/dev/null || { say "installing npm"; apt_install npm; }
  command -v curl >/dev/null || { say "installing curl"; apt_install curl; }
  command -v openssl >/dev/null || { say "installing openssl (dev/run signs a postback)"; apt_install openssl; }
  command -v taskset >/dev/null || { say "installing util-linux (taskset)"; apt_install util-linux; }
  # For the image runtime test (dev/in_image.py builds the image's root
  # filesystem with it).
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] ||
    { say "installing debootstrap"; apt_install debootstrap; }
  if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    # For the bench's nginx comparison; keep the package from starting a service.
    say "installing nginx-light"
    local guard=""
    [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' | ${SUDO:-} tee /usr/sbin/policy-rc.d >/dev/null 2>&1 && ${SUDO:-} chmod +x /usr/sbin/policy-rc.d && guard=1; }
    apt_install nginx-light
    if [ -n "$guard" ]; then ${SUDO:-} rm -f /usr/sbin/policy-rc.d; fi
  fi
  if [ ! -f "$ROOT/dev/node_modules/.package-lock.json" ] ||
     [ "$ROOT/dev/package-lock.json" -nt "$ROOT/dev/node_modules/.package-lock.json" ]; then
    say "installing the Kinesis and DynamoDB stand-ins (dev/package-lock.json)"
    (cd "$ROOT/dev" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci in dev/ failed"
  fi
}

# A venv at $1 holding the pinned packages of the requirements file $2 ($3
# says what they are), installed on the first run and again only when that
# file (or the Python version) changes.
ensure_venv() {
  local venv="$1" requirements="$2" what="$3" python="${PYTHON:-python3}" want
  local stamp="$venv/.requirements.sha256"
  command -v "$python" >/dev/null || { say "installing python3"; apt_install python3 python3-venv; }
  want="$({ sha256sum "$requirements"; "$python" --version 2>&1; } | sha256sum | cut -d' ' -f1)"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] &&
     "$venv/bin/python" -c '' 2>/dev/null; then
    return 0
  fi
  mkdir -p "$(dirname "$venv")"
  # One installer at a time (CI and a developer may share the cache).
  exec 9>"$venv.lock"
  command -v flock >/dev/null && flock 9
  if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    exec 9>&-
    return 0
  fi
  say "installing $what into $venv ($requirements)"
  rm -f "$stamp"
  if ! "$python" -m venv --clear "$venv" >/dev/null 2>&1; then
    say "installing python3-venv"
    apt_install python3-venv
    "$python" -m venv --clear "$venv" || die "cannot create a venv with $python"
  fi
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
    --requirement "$requirements" || die "pip install -r $requirements failed"
  printf '%s\n' "$want" >"$stamp"
  exec 9>&-
}

# cargo fuzz, for dev/fuzz (built from the crate registry once).
ensure_cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version 0.13.2 --quiet || die "cargo install cargo-fuzz failed"
  fi
}

# Is a TCP port on 127.0.0.1 taken?
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The first free port at or above $1.
free_port_from() {
  local p="$1"
  while port_taken "$p"; do p=$((p + 1)); done
  echo "$p"
}

# Stops one process started by dev/run, by its PID file, if it is still ours.
stop_pidfile() {
  local file="$1" pid
  [ -f "$file" ] || return 0
  pid="$(cat "$file")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "${2:-}" "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$file"
}
