#!/usr/bin/env bash
# Install, upgrade or remove dcmon as a systemd service on Debian / Raspberry Pi OS (bookworm or later).
# Run as root from a checkout of the repository:
#
#   sudo deploy/install.sh                 install, or upgrade to this checkout; enable and (re)start
#   sudo deploy/install.sh --no-start      the same, but leave the service stopped (configure first)
#   sudo deploy/install.sh --uninstall     remove program, unit and udev rule; keep config, spool and user
#   sudo deploy/install.sh --uninstall --purge   remove those too
#   sudo deploy/install.sh --prefix DIR    install into DIR as if it were / (image building, tests): no apt,
#                                          user and group written to DIR/etc with useradd --prefix, unit
#                                          enabled with systemctl --root, nothing started, nothing reloaded
#   --source DIR                           install from another checkout than the one this script is in
#
# What goes where (docs/install.md):
#   /opt/dcmon/venv                   the package and its dependencies (pip, from this checkout)
#   /etc/dcmon/config.toml            copied from the repository only if absent (root:dcmon 0640)
#   /etc/dcmon/config.local.toml      secrets and local overrides, created empty if absent (root:dcmon 0640)
#   /var/lib/dcmon                    the spool (StateDirectory of the unit; dcmon:dcmon 0750)
#   /etc/systemd/system/dcmon.service replaced on upgrade; local changes go in a drop-in (systemctl edit)
#   /etc/udev/rules.d/99-dcmon-serial.rules   installed only if absent (you edit it for your adapters)
#   systemd-time-wait-sync.service    enabled where it exists (dcmon starts once the clock is synchronised),
#                                     bounded to 2 min by .../systemd-time-wait-sync.service.d/dcmon-bounded.conf
#   /usr/local/bin/dcmon              a link to /opt/dcmon/venv/bin/dcmon
#
# Idempotent: a second run with the same checkout changes nothing and says "0 changes". An upgrade keeps
# config, secrets and spool. pip reads PIP_* variables (PIP_INDEX_URL, PIP_FIND_LINKS) for offline installs.
set -euo pipefail
# The dcmon user must be able to read the program in /opt whatever the admin's own umask is; files that
# hold secrets get their restrictive mode explicitly below.
umask 022

readonly NAME=dcmon
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=""
MODE=install
PURGE=0
NO_START=0
CHANGES=0

say() { printf '%s install: %s\n' "$NAME" "$*"; }
die() { printf '%s install: error: %s\n' "$NAME" "$*" >&2; exit 1; }
changed() { CHANGES=$((CHANGES + 1)); say "$*"; }

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
  exit "${1:-0}"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#--prefix=}; shift ;;
    --source) [ $# -ge 2 ] || die "--source needs a directory"; SRC=$2; shift 2 ;;
    --no-start) NO_START=1; shift ;;
    --uninstall) MODE=uninstall; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help) usage 0 ;;
    *) printf '%s install: error: unknown option %s\n' "$NAME" "$1" >&2; usage 2 >&2 ;;
  esac
done

if [ -n "$PREFIX" ]; then
  case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path (got $PREFIX)" ;; esac
  [ -d "$PREFIX" ] || die "--prefix $PREFIX: no such directory (create it first)"
  PREFIX=${PREFIX%/}
fi
[ "$PURGE" -eq 0 ] || [ "$MODE" = uninstall ] || die "--purge only goes with --uninstall"
[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ...): it creates a system user and writes to /etc and /opt"

# Paths as the running system sees them, and where this run writes them ($PREFIX in front).
readonly OPT=/opt/dcmon VENV=/opt/dcmon/venv ETC=/etc/dcmon STATE=/var/lib/dcmon
readonly UNIT=/etc/systemd/system/dcmon.service RULE=/etc/udev/rules.d/99-dcmon-serial.rules
readonly LINK=/usr/local/bin/dcmon STAMP=/opt/dcmon/.installed-source
readonly WAITSYNC=systemd-time-wait-sync.service
readonly WAITSYNC_DIR=/etc/systemd/system/systemd-time-wait-sync.service.d
readonly WAITSYNC_DROPIN=$WAITSYNC_DIR/dcmon-bounded.conf WAITSYNC_MARK=$WAITSYNC_DIR/.enabled-by-dcmon
P=$PREFIX

# ------------------------------------------------------------------------------------------- helpers

# getent against the system, or the files under --prefix (the system's own user database is not touched).
lookup() {  # lookup passwd|group NAME → the entry, or status 1
  if [ -n "$PREFIX" ]; then
    grep -m1 "^$2:" "$PREFIX/etc/$1" 2>/dev/null
  else
    getent "$1" "$2"
  fi
}

prefix_opt=()
[ -z "$PREFIX" ] || prefix_opt=(--prefix "$PREFIX")

systemd_running() { [ -z "$PREFIX" ] && [ -d /run/systemd/system ]; }

# ensure_mode PATH MODE UID GID: fix mode and owner only when they differ (so a re-run changes nothing).
ensure_mode() {
  local want="$2 $3:$4" have
  have=$(stat -c '%a %u:%g' "$1")
  if [ "$have" != "$want" ]; then
    chmod "$2" "$1"
    chown "$3:$4" "$1"
    changed "set $1 to mode $2, owner $3:$4 (was $have)"
  fi
}

ensure_dir() {  # ensure_dir PATH MODE UID GID
  if [ ! -d "$1" ]; then
    install -d -m "$2" -o "$3" -g "$4" "$1"
    changed "created $1"
  fi
  ensure_mode "$@"
}

new_file() {  # new_file PATH MODE UID GID < content: created with its final mode, never readable by others
  install -m "$2" -o "$3" -g "$4" /dev/null "$1"
  cat > "$1"
  changed "created $1"
}

# copy_if_changed SRC DEST MODE → status 0 when DEST was written
copy_if_changed() {
  if [ -f "$2" ] && cmp -s "$1" "$2"; then
    return 1
  fi
  mkdir -p "$(dirname "$2")"
  install -m "$3" -o 0 -g 0 "$1" "$2"
  changed "installed $2"
}

# The package sources, copied to a scratch folder so that the build never writes into the checkout
# (which may belong to another user) and so that their hash says whether pip needs to run at all.
stage_sources() {  # stage_sources DIR
  local f
  for f in pyproject.toml setup.cfg setup.py MANIFEST.in README.md LICENSE src; do
    [ -e "$SRC/$f" ] || continue
    tar -C "$SRC" --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.pyc' -cf - "$f" | tar -C "$1" -xf -
  done
}

tree_hash() {
  (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

pkg_missing() { ! dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# ------------------------------------------------------------------------------------------- install

check_os() {
  local release="$P/etc/os-release" id like version
  if [ ! -f "$release" ]; then
    [ -n "$PREFIX" ] || die "no /etc/os-release: this script is for Debian / Raspberry Pi OS"
    return 0  # a bare --prefix tree: nothing to check
  fi
  osr() { sed -n "s/^$1=//p" "$release" | tr -d "\"'" | head -n1; }
  id=$(osr ID); like=$(osr ID_LIKE); version=$(osr VERSION_ID)
  case " $id $like " in *" debian "*) ;; *) die "not a Debian-based system ($id): install by hand, see docs/install.md" ;; esac
  if [ "$id" = debian ] || [ "$id" = raspbian ]; then
    [ "${version%%.*}" -ge 12 ] 2>/dev/null || die "Debian $version is too old: bookworm (12) or later is needed (Python 3.11)"
  fi
}

install_packages() {
  local missing=() p
  for p in python3 python3-venv python3-pip; do
    pkg_missing "$p" && missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ -n "$PREFIX" ]; then
    say "--prefix: not installing Debian packages ${missing[*]} on this machine"
    return 0
  fi
  say "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  changed "installed ${missing[*]}"
}

check_python() {
  command -v python3 >/dev/null || die "python3 not found: apt-get install python3 python3-venv"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2): dcmon needs 3.11 or later (Debian bookworm or later)"
  python3 -c 'import ensurepip, venv' 2>/dev/null || die "the Python venv module is missing: apt-get install python3-venv"
}

ensure_user() {
  lookup group dialout >/dev/null || die "there is no dialout group${PREFIX:+ in $PREFIX/etc/group}: is this Debian?"
  if ! lookup passwd "$NAME" >/dev/null; then
    useradd "${prefix_opt[@]}" --system --user-group --groups dialout --home-dir "$STATE" --no-create-home \
      --shell /usr/sbin/nologin --comment "dcmon power meter poller" "$NAME"
    changed "created system user $NAME (group $NAME, member of dialout)"
  fi
  if ! lookup group dialout | cut -d: -f4 | tr ',' '\n' | grep -qx "$NAME"; then
    usermod "${prefix_opt[@]}" -a -G dialout "$NAME"
    changed "added $NAME to the dialout group"
  fi
  DC_UID=$(lookup passwd "$NAME" | cut -d: -f3)
  DC_GID=$(lookup group "$NAME" | cut -d: -f3)
  if [ -z "$DC_UID" ] || [ -z "$DC_GID" ]; then
    die "user or group $NAME not found after creating it"
  fi
}

local_template() {
  cat <<'EOF'
# dcmon: local settings and secrets, merged key by key over config.toml beside this file.
# Readable by root and the dcmon group only (0640). Keys and precedence: docs/configuration.md.
# Example (InfluxDB 2.x/3.x/Cloud):
# [influxdb]
# api = 2
# url = "https://influx.example.org:8086"
# org = "home"
# bucket = "dcmon"
# token = "..."
EOF
}

install_config() {
  ensure_dir "$P$ETC" 750 0 "$DC_GID"
  if [ ! -e "$P$ETC/config.toml" ]; then
    [ -f "$SRC/config.toml" ] || die "$SRC/config.toml not found: run this script from a dcmon checkout"
    # The one change from the repository's file: the spool lives in the state directory, for the
    # service (which also sets DCMON_SPOOL_PATH) and for tools run by hand alike.
    sed 's|^path = "var/spool.sqlite".*|path = "/var/lib/dcmon/spool.sqlite"   # set by install.sh: the StateDirectory|' \
      "$SRC/config.toml" | new_file "$P$ETC/config.toml" 640 0 "$DC_GID"
    say "edit $ETC/config.toml for your meters and ports (docs/configuration.md)"
    say "then, once InfluxDB answers: sudo dcmon influx-setup (retention and downsampling, docs/install.md)"
  fi
  ensure_mode "$P$ETC/config.toml" 640 0 "$DC_GID"
  if [ ! -e "$P$ETC/config.local.toml" ]; then
    local_template | new_file "$P$ETC/config.local.toml" 640 0 "$DC_GID"
  fi
  ensure_mode "$P$ETC/config.local.toml" 640 0 "$DC_GID"
  ensure_dir "$P$STATE" 750 "$DC_UID" "$DC_GID"
}

install_package() {
  local host_ver venv_ver="" work hash
  host_ver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ -x "$P$VENV/bin/python" ]; then
    venv_ver=$("$P$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
  fi
  if [ "$venv_ver" != "$host_ver" ]; then
    # Missing, or built on an older Python (after a Debian upgrade): a venv cannot be moved across versions.
    rm -rf "$P$VENV" "$P$STAMP"
    mkdir -p "$P$OPT"
    python3 -m venv "$P$VENV"
    changed "created the virtual environment $VENV (Python $host_ver)"
  fi
  work=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  stage_sources "$work"
  [ -f "$work/pyproject.toml" ] || die "$SRC has no pyproject.toml: run this script from a dcmon checkout"
  hash=$(tree_hash "$work")
  if [ "$(cat "$P$STAMP" 2>/dev/null)" = "$hash" ] && "$P$VENV/bin/python" -c 'import dcmon' 2>/dev/null; then
    return 0  # this very source is installed already
  fi
  say "installing the dcmon package and its dependencies into $VENV (pip; needs PyPI or PIP_INDEX_URL)"
  "$P$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --upgrade "$work" ||
    die "pip could not install dcmon: see its message above (network? PyPI reachable?)"
  echo "$hash" > "$P$STAMP"
  PACKAGE_CHANGED=1
  changed "installed dcmon $("$P$VENV/bin/python" -c 'import dcmon; print(dcmon.__version__)') into $VENV"
}

install_link() {
  if [ "$(readlink "$P$LINK" 2>/dev/null)" != "$VENV/bin/dcmon" ]; then
    mkdir -p "$(dirname "$P$LINK")"
    ln -sfn "$VENV/bin/dcmon" "$P$LINK"
    changed "linked $LINK → $VENV/bin/dcmon"
  fi
}

install_unit() {
  UNIT_CHANGED=0
  if copy_if_changed "$SRC/deploy/dcmon.service" "$P$UNIT" 644; then
    UNIT_CHANGED=1
    if systemd_running; then
      systemctl daemon-reload
    fi
  fi
  if ! command -v systemctl >/dev/null; then
    NO_SYSTEMD=1
    say "systemctl not found: the unit is installed but not enabled (dcmon runs as a service under systemd only)"
  elif [ -n "$PREFIX" ]; then
    systemctl --root="$PREFIX" --quiet is-enabled dcmon.service 2>/dev/null ||
      { systemctl --root="$PREFIX" --quiet enable dcmon.service; changed "enabled dcmon.service"; }
  else
    systemctl --quiet is-enabled dcmon.service 2>/dev/null ||
      { systemctl --quiet enable dcmon.service; changed "enabled dcmon.service (starts at boot)"; }
  fi
}

# Wait for a synchronised clock at boot where systemd offers it (and bound that wait). Left alone when the
# system has no systemd-time-wait-sync.service: dcmon holds readings itself until the clock can be trusted.
install_time_sync() {
  local d found=""
  for d in /lib/systemd/system /usr/lib/systemd/system; do
    [ -f "$P$d/$WAITSYNC" ] && found=$d/$WAITSYNC
  done
  if [ -z "$found" ] || [ "${NO_SYSTEMD:-0}" -eq 1 ]; then
    say "no $WAITSYNC here: dcmon starts without waiting for NTP and holds readings until the clock is set"
    return 0
  fi
  if copy_if_changed "$SRC/deploy/time-wait-sync-bounded.conf" "$P$WAITSYNC_DROPIN" 644 && systemd_running; then
    systemctl daemon-reload
  fi
  local sc=(systemctl)
  [ -z "$PREFIX" ] || sc=(systemctl --root="$PREFIX")
  if ! "${sc[@]}" --quiet is-enabled "$WAITSYNC" 2>/dev/null; then
    "${sc[@]}" --quiet enable "$WAITSYNC"
    : > "$P$WAITSYNC_MARK"
    changed "enabled $WAITSYNC (dcmon starts once the clock is synchronised, or after at most 2 minutes)"
  fi
}

install_udev_rule() {
  local shipped="$SRC/deploy/99-dcmon-serial.rules"
  if [ ! -e "$P$RULE" ]; then
    copy_if_changed "$shipped" "$P$RULE" 644 || true
    if [ -z "$PREFIX" ] && command -v udevadm >/dev/null && [ -S /run/udev/control ]; then
      # Best effort: the rule also applies at the next boot or the next time an adapter is plugged in.
      if udevadm control --reload; then
        udevadm trigger --subsystem-match=tty --action=add || true
      fi
    fi
  elif ! cmp -s "$shipped" "$P$RULE"; then
    say "kept your $RULE (the shipped version is $shipped)"
  fi
}

start_service() {
  if [ -n "$PREFIX" ] || [ "${NO_SYSTEMD:-0}" -eq 1 ]; then
    return 0
  elif [ "$NO_START" -eq 1 ]; then
    say "not starting the service (--no-start): systemctl start dcmon when the configuration is ready"
  elif ! systemd_running; then
    say "systemd is not running here (chroot or container): enabled, not started"
  elif ! systemctl --quiet is-active dcmon.service; then
    systemctl start dcmon.service || die "dcmon.service did not start: journalctl -u dcmon -n 30 says why; fix /etc/dcmon/config.toml, then systemctl restart dcmon"
    changed "started dcmon.service"
  elif [ "${PACKAGE_CHANGED:-0}" -eq 1 ] || [ "$UNIT_CHANGED" -eq 1 ]; then
    systemctl restart dcmon.service || die "dcmon.service did not restart: journalctl -u dcmon -n 30 says why"
    changed "restarted dcmon.service to run the new version"
  fi
}

do_install() {
  [ -f "$SRC/deploy/dcmon.service" ] || die "$SRC/deploy/dcmon.service not found: run this script from a dcmon checkout"
  check_os
  install_packages
  check_python
  ensure_user
  install_config
  install_package
  install_link
  install_unit
  install_time_sync
  install_udev_rule
  start_service
  if [ "$CHANGES" -eq 0 ]; then
    say "0 changes: already installed and up to date"
  else
    say "done, $CHANGES changes. Configuration: $ETC/config.toml, secrets: $ETC/config.local.toml, logs: journalctl -u dcmon"
  fi
}

# ------------------------------------------------------------------------------------------- uninstall

do_uninstall() {
  if [ -e "$P$UNIT" ]; then
    if ! command -v systemctl >/dev/null; then
      :  # nothing can have enabled it
    elif [ -n "$PREFIX" ]; then
      systemctl --root="$PREFIX" --quiet disable dcmon.service 2>/dev/null || true
    else
      if systemd_running; then
        systemctl --quiet stop dcmon.service 2>/dev/null || true
      fi
      systemctl --quiet disable dcmon.service 2>/dev/null || true
    fi
    rm -f "$P$UNIT"
    if systemd_running; then
      systemctl daemon-reload
    fi
    changed "removed dcmon.service"
  fi
  if [ -e "$P$WAITSYNC_DROPIN" ]; then
    if [ -e "$P$WAITSYNC_MARK" ] && command -v systemctl >/dev/null; then  # enabled by us: disable again
      if [ -n "$PREFIX" ]; then
        systemctl --root="$PREFIX" --quiet disable "$WAITSYNC" 2>/dev/null || true
      else
        systemctl --quiet disable "$WAITSYNC" 2>/dev/null || true
      fi
    fi
    rm -f "$P$WAITSYNC_DROPIN" "$P$WAITSYNC_MARK"
    rmdir "$P$WAITSYNC_DIR" 2>/dev/null || true
    if systemd_running; then
      systemctl daemon-reload
    fi
    changed "removed the bounded wait for $WAITSYNC"
  fi
  if [ -e "$P$RULE" ]; then
    if [ "$PURGE" -eq 1 ] || cmp -s "$SRC/deploy/99-dcmon-serial.rules" "$P$RULE"; then
      rm -f "$P$RULE"
      changed "removed $RULE"
    else
      say "kept your edited $RULE (--purge removes it)"
    fi
  fi
  if [ "$(readlink "$P$LINK" 2>/dev/null)" = "$VENV/bin/dcmon" ]; then
    rm -f "$P$LINK"
    changed "removed $LINK"
  fi
  if [ -e "$P$OPT" ]; then
    rm -rf "$P$OPT"
    changed "removed $OPT"
  fi
  if [ "$PURGE" -eq 1 ]; then
    local d
    for d in "$ETC" "$STATE"; do
      if [ -e "$P$d" ]; then
        rm -rf "$P$d"
        changed "removed $d"
      fi
    done
    if lookup passwd "$NAME" >/dev/null; then
      userdel "${prefix_opt[@]}" "$NAME"
      changed "removed user $NAME"
    fi
    if lookup group "$NAME" >/dev/null; then
      groupdel "${prefix_opt[@]}" "$NAME"
      changed "removed group $NAME"
    fi
  else
    say "kept $ETC (configuration), $STATE (spool: readings not yet sent) and user $NAME; --purge removes them"
  fi
  say "uninstalled, $CHANGES changes"
}

if [ "$MODE" = install ]; then do_install; else do_uninstall; fi
