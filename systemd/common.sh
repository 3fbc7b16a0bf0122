# Shared by install.sh and uninstall.sh (sourced, not run): the installed layout and the helpers both
# scripts plan and act with. Expects DRY_RUN and PREFIX to be set by the sourcing script.
# shellcheck shell=bash

readonly SERVICE_USER=vla-edge
readonly UNIT=vla-edge.service
readonly APP_DIR=/opt/vla-edge
readonly CONFIG_DIR=/etc/vla-edge
readonly STATE_DIR=/var/lib/vla-edge
readonly UNIT_PATH=/etc/systemd/system/vla-edge.service
readonly DROPIN_DIR=/etc/systemd/system/vla-edge.service.d
readonly GROUPS_DROPIN=/etc/systemd/system/vla-edge.service.d/10-supplementary-groups.conf
readonly RULE_PATH=/etc/udev/rules.d/99-vla-edge-motor.rules

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 1
}

note() {
  printf '# %s\n' "$*"
}

# Print an action, then do it unless this is a dry run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if ((DRY_RUN == 0)); then
    "$@"
  fi
}

# A system path under the prefix.
p() {
  if [[ $PREFIX == / ]]; then
    printf '%s' "$1"
  else
    printf '%s%s' "${PREFIX%/}" "$1"
  fi
}

user_exists() {
  if [[ $PREFIX == / ]]; then
    getent passwd "$1" >/dev/null
  else
    grep -q "^$1:" "$(p /etc/passwd)" 2>/dev/null
  fi
}

# Is systemd the running init here? Dry runs plan as if it were, so the plan shows every step.
systemd_running() {
  ((DRY_RUN == 1)) || [[ -d /run/systemd/system ]]
}
