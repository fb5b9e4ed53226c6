#!/usr/bin/env bash
# The whole test suite, from a clean clone: Debian packages the tests need (when run as root, or with sudo),
# the project's virtual environment, then pytest. Extra arguments go to pytest.
#   scripts/test.sh            # everything
#   scripts/test.sh -k spool   # a subset
set -euo pipefail
cd "$(dirname "$0")/.."

# Real parts the tests start on loopback: InfluxDB 1.x (v1 API), VictoriaMetrics (v2 write API),
# mbpoll (an independent Modbus master), shellcheck, docker-compose (validates the compose file),
# systemd (systemd-analyze verifies the unit), librsvg2-bin (renders the diagram).
DEB_PACKAGES=(python3-venv python3-pip influxdb mbpoll victoria-metrics mosquitto mosquitto-clients prometheus chromium shellcheck docker-compose systemd udev librsvg2-bin)

# Node.js and npm check the dashboards against Grafana's published schema (@grafana/schema + tsc);
# Debian's are installed only where no node/npm is on the PATH already.
command -v npm >/dev/null && command -v node >/dev/null || DEB_PACKAGES+=(nodejs npm)
# The opt-in chroot tests: debootstrap (DCMON_TEST_CHROOT, DCMON_TEST_ARM), and qemu-user-static with
# binfmt-support to run arm64 and armhf code (DCMON_TEST_ARM, tests/test_arm_chroot.py).
[ -z "${DCMON_TEST_CHROOT:-}${DCMON_TEST_ARM:-}" ] || DEB_PACKAGES+=(debootstrap)
[ -z "${DCMON_TEST_ARM:-}" ] || DEB_PACKAGES+=(qemu-user-static binfmt-support)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
    echo "test.sh: missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2
    exit 2
  fi
  echo "test.sh: installing Debian packages: ${missing[*]}" >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages start their own services on install; the tests start their own on free ports.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  for svc in influxdb victoria-metrics; do systemctl disable --now "$svc" >/dev/null 2>&1 || true; done
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

# pytest exits 5 when it collected no test: that is a failure here too.
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
