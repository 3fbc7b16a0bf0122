#!/usr/bin/env bash
# Remove the vla-edge robot service that systemd/install.sh installed.
#
#   sudo systemd/uninstall.sh            stop, disable, remove the unit, udev rule and software;
#                                        keep config, bundle/state and the vla-edge user
#   sudo systemd/uninstall.sh --purge    ... and remove those too
#   systemd/uninstall.sh --dry-run       print every action, change nothing (no root needed)
#
# Every action is printed as "+ command"; notes start with "# ".
set -euo pipefail

readonly CACHE_DIR=/var/cache/vla-edge

ORIGINAL_ARGS=("$@")
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"
DRY_RUN=0
PURGE=0
PREFIX=/

usage() {
  cat <<EOF
Usage: $0 [--dry-run] [--prefix DIR] [--purge]

  --dry-run      print every action without doing it; needs no root and touches nothing
  --prefix DIR   plan against DIR as the root file system (only with --dry-run)
  --purge        also remove /etc/vla-edge (config), /var/lib/vla-edge (bundle, state),
                 /var/cache/vla-edge, an edited udev rule, drop-ins and the vla-edge user
EOF
}

while (($# > 0)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --purge) PURGE=1 ;;
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
    --prefix=*) PREFIX=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done

[[ $PREFIX == /* ]] || die "--prefix must be an absolute path, got '$PREFIX'"
[[ -d $PREFIX ]] || die "--prefix directory does not exist: $PREFIX"
if [[ $PREFIX != / ]] && ((DRY_RUN == 0)); then
  die "--prefix is only supported with --dry-run"
fi
if ((DRY_RUN == 0)) && ((EUID != 0)); then
  die "must run as root: sudo $0 ${ORIGINAL_ARGS[*]} (or add --dry-run to see what it would do)"
fi

if ((DRY_RUN == 1)); then
  note "dry run: nothing is changed; root file system: $PREFIX"
fi

# --- 1. stop (SIGTERM: the runtime commands a controlled stop) and disable ---
if [[ -e $(p "$UNIT_PATH") ]]; then
  if systemd_running; then
    run systemctl disable --now "$UNIT"
  else
    note "systemd is not running here: disabling without stopping"
    run systemctl "--root=$PREFIX" disable "$UNIT"
  fi
else
  note "unit $UNIT_PATH not installed"
fi

# --- 2. unit and drop-ins ---
[[ ! -e $(p "$UNIT_PATH") ]] || run rm -f "$(p "$UNIT_PATH")"
if ((PURGE == 1)); then
  [[ ! -e $(p "$DROPIN_DIR") ]] || run rm -rf "$(p "$DROPIN_DIR")"
else
  [[ ! -e $(p "$GROUPS_DROPIN") ]] || run rm -f "$(p "$GROUPS_DROPIN")"
  if [[ -d $(p "$DROPIN_DIR") ]]; then
    # Drop-ins written with `systemctl edit` are configuration: kept, like robot.yaml.
    run rmdir --ignore-fail-on-non-empty "$(p "$DROPIN_DIR")"
  fi
fi

# --- 3. udev rule: an edited rule is configuration for this robot, kept unless --purge ---
rule_removed=0
if [[ -e $(p "$RULE_PATH") ]]; then
  if ((PURGE == 1)) || cmp -s "$SCRIPT_DIR/99-vla-edge-motor.rules" "$(p "$RULE_PATH")"; then
    run rm -f "$(p "$RULE_PATH")"
    rule_removed=1
  else
    note "udev rule $RULE_PATH was edited for this robot: kept (--purge removes it)"
  fi
fi
if ((rule_removed == 1)); then
  if ((DRY_RUN == 1)) || command -v udevadm >/dev/null; then
    run udevadm control --reload
  else
    note "udevadm not found: udev rules not reloaded"
  fi
fi

if systemd_running; then
  run systemctl daemon-reload
else
  note "systemd is not running here: skipped daemon-reload"
fi

# --- 4. software ---
[[ ! -e $(p "$APP_DIR") ]] || run rm -rf "$(p "$APP_DIR")"

# --- 5. config, state, user: only with --purge ---
if ((PURGE == 1)); then
  for dir in "$CONFIG_DIR" "$STATE_DIR" "$CACHE_DIR"; do
    [[ ! -e $(p "$dir") ]] || run rm -rf "$(p "$dir")"
  done
  if user_exists "$SERVICE_USER"; then
    userdel_cmd=(userdel)
    [[ $PREFIX == / ]] || userdel_cmd+=(--root "$PREFIX")
    run "${userdel_cmd[@]}" "$SERVICE_USER"
  fi
else
  note "kept: $CONFIG_DIR (config), $STATE_DIR (bundle, state), $CACHE_DIR, user $SERVICE_USER"
  note "remove them with: $0 --purge"
fi
note "done"
