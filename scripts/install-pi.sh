#!/usr/bin/env bash
# Install edge-agent as a systemd service on a Raspberry Pi (64-bit Raspberry Pi OS
# or any arm64/x86_64 Debian with systemd). Run as root from a checkout or an
# unpacked release:
#
#   sudo scripts/install-pi.sh                       # build from this checkout
#   sudo scripts/install-pi.sh --wheel dist/edge_agent-0.1.0-py3-none-any.whl
#   sudo scripts/install-pi.sh --bundle pi-042.tar.gz   # and the device's own config
#
# What it does (every step is safe to repeat; docs/raspberry-pi.md explains each):
#   1. apt: python3-venv (Raspberry Pi OS has python3 3.11 but not venv)
#   2. a venv in /opt/edge-agent with the agent and its dependencies (arm64 wheels)
#   3. /etc/edge-agent/credentials/ (root only) for LoadCredential=, and
#      /etc/edge-agent/agent.toml: with --bundle (made by `edge-fleet enroll`) the
#      bundle's agent.toml, password, CA and trusted keys, checked against its
#      SHA256SUMS; without, from examples/agent.toml, only if it does not exist
#   4. /etc/systemd/system/edge-agent.service, enabled, started (unless --no-start)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/opt/edge-agent
ETC=/etc/edge-agent
UNIT_DIR=/etc/systemd/system
WHEEL=""
BUNDLE=""
START=1
APT=1
CONFIG_ONLY=0

usage() {
    cat <<EOF
usage: $0 [--wheel FILE] [--bundle FILE] [--prefix DIR] [--etc DIR] [--config-only]
          [--no-start] [--no-apt]

  --wheel FILE    install this wheel (default: build from the checkout at $ROOT)
  --bundle FILE   the device's bundle from \`edge-fleet enroll\` (DEVICE.tar.gz):
                  its agent.toml replaces the one in place (kept as agent.toml.bak)
  --prefix DIR    the venv to create or update (default: $PREFIX)
  --etc DIR       the configuration folder (default: $ETC; the unit reads $ETC)
  --config-only   only step 3, the configuration (e.g. a new bundle for an
                  installed agent); no apt, venv or unit
  --no-start      install and enable the service, do not start it now
  --no-apt        do not call apt-get (python3-venv must already be there)
EOF
}

while (($#)); do
    case $1 in
    --wheel) WHEEL=$2; shift 2 ;;
    --bundle) BUNDLE=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --etc) ETC=$2; shift 2 ;;
    --config-only) CONFIG_ONLY=1; shift ;;
    --no-start) START=0; shift ;;
    --no-apt) APT=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install-pi: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "install-pi: $*"; }
die() { echo "install-pi: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (sudo $0)"
case $(uname -m) in
aarch64 | arm64 | x86_64) ;;
armv6l | armv7l | armhf)
    die "this is a 32-bit ARM system ($(uname -m)): onnxruntime and numpy publish no 32-bit ARM wheels; install the 64-bit Raspberry Pi OS (bookworm, arm64)" ;;
*) die "unsupported machine $(uname -m): expected aarch64 (or x86_64)" ;;
esac
# A Pi 4 running the 32-bit OS reports an aarch64 kernel over a 32-bit userland.
if command -v dpkg >/dev/null && [[ $(dpkg --print-architecture) == armhf ]]; then
    die "this is the 32-bit (armhf) OS on a 64-bit kernel: onnxruntime and numpy publish no 32-bit ARM wheels; install the 64-bit Raspberry Pi OS (arm64)"
fi
[[ -z $WHEEL || -f $WHEEL ]] || die "--wheel: $WHEEL does not exist"
[[ -z $BUNDLE || -f $BUNDLE ]] || die "--bundle: $BUNDLE does not exist"
[[ -f $ROOT/systemd/edge-agent.service ]] || die "$ROOT/systemd/edge-agent.service not found: run from a checkout or release folder"

# A bundle is checked whole before anything is installed: one folder, every file its
# SHA256SUMS lists, each matching.
BUNDLE_DIR=""
check_bundle() {
    local name members top member rest
    name=$(basename "$BUNDLE")
    members=$(tar -tzf "$BUNDLE" 2>/dev/null) || die "bundle $name: not a .tar.gz"
    top=${members%%/*}
    [[ $top =~ ^[A-Za-z0-9_-][A-Za-z0-9_.-]*$ ]] || die "bundle $name: '$top' is not a device folder"
    while IFS= read -r member; do
        # Plain names below the device's folder only: no "..", no absolute paths.
        rest=${member#"$top"}
        [[ $member == "$top"* && $rest =~ ^(/credentials)?(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)?/?$ ]] ||
            die "bundle $name: '$member' is not a file of a device bundle"
    done <<<"$members"
    BUNDLE_DIR=$(mktemp -d)
    trap 'rm -rf "$BUNDLE_DIR"' EXIT
    tar -xzf "$BUNDLE" -C "$BUNDLE_DIR" --no-same-owner
    [[ -z $(find "$BUNDLE_DIR" ! -type f ! -type d) ]] ||
        die "bundle $name: holds links or special files; a bundle has plain files only"
    BUNDLE_DIR=$BUNDLE_DIR/$top
    for member in agent.toml credentials/mqtt.password SHA256SUMS; do
        [[ -f $BUNDLE_DIR/$member ]] || die "bundle $name lacks $member"
    done
    while read -r _ member; do
        [[ -f $BUNDLE_DIR/$member ]] || die "bundle $name lacks $member (listed in its SHA256SUMS)"
    done <"$BUNDLE_DIR/SHA256SUMS"
    (cd "$BUNDLE_DIR" && sha256sum --check --quiet --strict SHA256SUMS >/dev/null 2>&1) ||
        die "bundle $name: a file does not match its SHA256SUMS (damaged in transit?)"
    say "bundle $name: device $top, $(wc -l <"$BUNDLE_DIR/SHA256SUMS") files checked"
}
[[ -z $BUNDLE ]] || check_bundle

# 1. Python 3.11+ with venv.
command -v python3 >/dev/null || { ((APT)) && apt-get install -y -q python3; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2); edge-agent needs 3.11 or newer (Raspberry Pi OS bookworm)"
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    ((APT)) || die "python3-venv is missing (apt-get install python3-venv)"
    say "installing python3-venv"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi

# 2. The venv. Binary wheels only: building numpy or onnxruntime on a Pi takes hours.
if ((!CONFIG_ONLY)); then
[[ -x $PREFIX/bin/python ]] || { say "creating venv $PREFIX"; python3 -m venv "$PREFIX"; }
PIP=("$PREFIX/bin/python" -m pip --disable-pip-version-check)
if [[ -n $WHEEL ]]; then
    target=$WHEEL
else
    target=$ROOT
fi
say "installing edge-agent and its dependencies from $target (binary wheels)"
"${PIP[@]}" install -q --prefer-binary --only-binary=numpy,onnxruntime,cryptography,psutil "$target"
# Same version number as before is still new code: reinstall the agent itself.
"${PIP[@]}" install -q --no-deps --force-reinstall "$target"
"$PREFIX/bin/edge-agent" --help >/dev/null || die "$PREFIX/bin/edge-agent does not run"
fi  # step 1 and 2 (not --config-only)

# 3. Configuration and the folder LoadCredential= reads secrets from.
install -d -m 0755 "$ETC"
install -d -m 0700 "$ETC/credentials"
if [[ -n $BUNDLE ]]; then
    # Public files (CA, trusted keys) beside agent.toml, secrets in credentials/ (root
    # only, handed to the service by LoadCredential=).
    for file in "$BUNDLE_DIR"/*; do
        case $(basename "$file") in agent.toml | SHA256SUMS | credentials) continue ;; esac
        install -m 0644 "$file" "$ETC/"
    done
    for file in "$BUNDLE_DIR"/credentials/*; do
        install -m 0600 "$file" "$ETC/credentials/"
    done
    # The bundle names /etc/edge-agent; another --etc moves those paths along.
    sed "s|\"/etc/edge-agent/|\"$ETC/|g" "$BUNDLE_DIR/agent.toml" >"$ETC/agent.toml.new"
    chmod 0644 "$ETC/agent.toml.new"
    if [[ -e $ETC/agent.toml ]] && ! cmp -s "$ETC/agent.toml" "$ETC/agent.toml.new"; then
        cp -p "$ETC/agent.toml" "$ETC/agent.toml.bak"
        say "$ETC/agent.toml replaced by the bundle's (the old one is agent.toml.bak)"
    fi
    mv "$ETC/agent.toml.new" "$ETC/agent.toml"
    say "installed the bundle into $ETC"
elif [[ -e $ETC/agent.toml ]]; then
    say "$ETC/agent.toml exists: left as it is"
elif [[ -f $ROOT/examples/agent.toml ]]; then
    install -m 0644 "$ROOT/examples/agent.toml" "$ETC/agent.toml"
    say "wrote $ETC/agent.toml from examples/agent.toml: set device.id, device.fleet and mqtt.url"
else
    cat >"$ETC/agent.toml" <<'EOF'
# edge-agent configuration; every key is described in docs/configuration.md.
# Secrets are file names: relative ones are read from the service's credentials,
# i.e. /etc/edge-agent/credentials/<file> becomes "edge_<file>".

# The service's StateDirectory: named here so that `sudo edge-agent install` and
# `edge-agent models` work on the same store as the running service.
state_dir = "/var/lib/edge-agent"

[device]
# id = "pi-kitchen-01"     # default: the host name
fleet = "default"

[mqtt]
# url = "mqtts://broker.example.org:8883"   # empty: offline, serve and buffer only
# username = "pi-kitchen-01"
# password_file = "edge_mqtt-password"
# ca = "/etc/edge-agent/ca.crt"

[http]
host = "127.0.0.1"
port = 8080
EOF
    chmod 0644 "$ETC/agent.toml"
    say "wrote a minimal $ETC/agent.toml: set device.id, device.fleet and mqtt.url"
fi
# As the unit runs it: relative secrets are found in the credentials folder.
if CREDENTIALS_DIRECTORY=$ETC/credentials "$PREFIX/bin/edge-agent" check-config --config "$ETC/agent.toml"; then
    :
elif [[ -n $BUNDLE ]]; then
    die "$ETC/agent.toml from the bundle has problems (listed above)"
else
    say "warning: $ETC/agent.toml has problems (listed above); fix them before starting"
fi
if ((CONFIG_ONLY)); then
    say "done (configuration only): restart the agent to use it, systemctl restart edge-agent"
    exit 0
fi

# 4. The unit. A different prefix means a different ExecStart=.
sed "s|/opt/edge-agent/bin/edge-agent|$PREFIX/bin/edge-agent|" \
    "$ROOT/systemd/edge-agent.service" >"$UNIT_DIR/edge-agent.service.tmp"
chmod 0644 "$UNIT_DIR/edge-agent.service.tmp"
mv "$UNIT_DIR/edge-agent.service.tmp" "$UNIT_DIR/edge-agent.service"
# `systemctl enable` works without a running systemd (it only makes symlinks), so the
# same script prepares an image in a chroot.
systemctl enable edge-agent.service
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    if ((START)); then
        systemctl restart edge-agent.service
        say "started: systemctl status edge-agent; journalctl -u edge-agent -f"
    fi
else
    say "systemd is not running here: the service starts at the next boot"
fi
say "done: $("$PREFIX/bin/python" -c 'import importlib.metadata as m; print("edge-agent", m.version("edge-agent"))')"
