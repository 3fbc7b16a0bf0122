#!/usr/bin/env bash
# Install the vla-edge robot service: system user, virtualenv with the package, config, unit, udev rule.
#
#   sudo systemd/install.sh              install or upgrade, enable at boot (does not start it)
#   sudo systemd/install.sh --start      ... and (re)start the service now
#   systemd/install.sh --dry-run         print every action, change nothing (no root needed)
#
# Idempotent: a second run upgrades the package and the unit, and keeps the config
# (/etc/vla-edge/robot.yaml), the bundle (/var/lib/vla-edge) and an edited udev rule.
# Every action is printed as "+ command"; notes start with "# ".
#
# On a Jetson (found by /etc/nv_tegra_release, whose L4T release is reported) the dependencies are handled
# as in Dockerfile.jetson: JetPack's TensorRT, OpenCV (built with GStreamer) and numpy come from the system
# (apt, seen through --system-site-packages) and pip never installs opencv or numpy over them;
# onnxruntime-gpu comes only from NVIDIA's Jetson index (--jetson-index) and never together with
# onnxruntime. Elsewhere the package and its extras come from pip as usual.
set -euo pipefail
# Root's umask may be 027; the venv and unit must be readable by the service user and by systemd.
umask 022

readonly WANTED_GROUPS=(dialout video render)
readonly VENV=/opt/vla-edge/venv
readonly CONFIG=/etc/vla-edge/robot.yaml
readonly DOC_PATH=/opt/vla-edge/README.systemd.md

ORIGINAL_ARGS=("$@")
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
SOURCE_DIR=$(dirname -- "$SCRIPT_DIR")
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"
DRY_RUN=0
START=0
PREFIX=/
PYTHON=python3
EXTRAS=
EXTRAS_GIVEN=0
PIP_ARGS=()
# NVIDIA's Jetson AI Lab index for JetPack 6 / CUDA 12.6, as in Dockerfile.jetson (JETSON_INDEX_URL).
JETSON_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126

usage() {
  cat <<EOF
Usage: $0 [--dry-run] [--prefix DIR] [--start] [--source DIR] [--python PY] [--extras LIST] [--pip-arg ARG]...

  --dry-run       print every action without doing it; needs no root and touches nothing
  --prefix DIR    plan against DIR as the root file system (paths and existence checks under DIR);
                  only with --dry-run, since a virtualenv cannot be moved after it is made
  --start         (re)start the service after installing (default: enable only)
  --source DIR    the vla-edge source tree to install (default: $SOURCE_DIR)
  --python PY     interpreter for the virtualenv, Python >= 3.10 (default: python3; JetPack 6: 3.10)
  --extras LIST   pip extras (default: gpu, and on a Jetson gpu,engines so that the robot can run
                  build-engines --engines-only; use --extras '' on a robot without CUDA)
  --pip-arg ARG   extra argument for pip install, repeatable, e.g. --pip-arg --extra-index-url=URL
                  for a package index with Jetson (aarch64 + CUDA) wheels
  --jetson-index URL
                  on a Jetson: the index onnxruntime-gpu comes from (default: $JETSON_INDEX)
EOF
}

# Write stdin to a file with a mode (the content is shown in a dry run, which writes nothing).
write_file() {
  local dest=$1 mode=$2 content tmp
  content=$(cat)
  printf '+ write %q (mode %s):\n' "$dest" "$mode"
  printf '%s\n' "$content" | sed 's/^/|   /'
  if ((DRY_RUN == 0)); then
    tmp=$(mktemp)
    printf '%s\n' "$content" >"$tmp"
    install -m "$mode" "$tmp" "$dest"
    rm -f -- "$tmp"
  fi
}

group_exists() {
  if [[ $PREFIX == / ]]; then
    getent group "$1" >/dev/null
  else
    grep -q "^$1:" "$(p /etc/group)" 2>/dev/null
  fi
}

# Is user $1 listed as a member of group $2 (supplementary membership, as usermod -aG writes it)?
in_group() {
  local members
  if [[ $PREFIX == / ]]; then
    members=$(getent group "$2" | cut -d: -f4)
  else
    members=$(grep "^$2:" "$(p /etc/group)" 2>/dev/null | cut -d: -f4)
  fi
  [[ ,$members, == *",$1,"* ]]
}

# The L4T release of a Jetson ("36.4.0" from "# R36 (release), REVISION: 4.0, ..."), empty elsewhere.
l4t_release() {
  local release_file line major revision
  release_file=$(p /etc/nv_tegra_release)
  [[ -r $release_file ]] || return 0
  line=$(head -n 1 "$release_file")
  major=$(sed -n 's/^# R\([0-9][0-9]*\) (release).*/\1/p' <<<"$line")
  revision=$(sed -n 's/.*REVISION: *\([0-9][0-9.]*\).*/\1/p' <<<"$line")
  [[ -n $major ]] || die "cannot read the L4T release from $release_file: '$line'"
  printf '%s.%s' "$major" "${revision:-0}"
}

# The package's requirements from setup.py (runtime and the chosen extras), one per line, read without
# running setup.py.
requirements() {
  "$PYTHON" - "$SOURCE_DIR/setup.py" "$EXTRAS" <<'PY'
import ast, sys
tree = ast.parse(open(sys.argv[1], encoding="utf-8").read())
values = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
          for t in node.targets if isinstance(t, ast.Name)}
wanted = list(ast.literal_eval(values["RUNTIME"]))
extras = ast.literal_eval(values["EXTRAS"])
for extra in filter(None, sys.argv[2].split(",")):
    if extra not in extras:
        sys.exit(f"unknown extra {extra!r}; setup.py has {sorted(extras)}")
    wanted += extras[extra]
print("\n".join(wanted))
PY
}

# On a Jetson: JetPack's modules from apt where the system Python lacks them, the package with --no-deps,
# its other requirements from PyPI minus numpy/opencv/onnxruntime, onnxruntime-gpu from the Jetson index.
install_jetson_packages() {
  local venv_python missing=() module package name requirement
  local from_pypi=() want_onnxruntime_gpu=0
  venv_python=$(p "$VENV/bin/python")
  for module in tensorrt:python3-libnvinfer cv2:python3-opencv numpy:python3-numpy; do
    package=${module#*:}
    if [[ $PREFIX != / ]]; then
      note "system Python of $PREFIX not checked here: $package is installed with apt if it cannot import ${module%%:*}"
    elif ! "$PYTHON" -c "import ${module%%:*}" 2>/dev/null; then
      missing+=("$package")
    fi
  done
  ((${#missing[@]} == 0)) || run apt-get install -y --no-install-recommends "${missing[@]}"
  while IFS= read -r requirement; do
    [[ -n $requirement ]] || continue
    name=${requirement%%[<>=!~ ;[]*}
    name=${name,,}
    name=${name//_/-}
    case $name in
      numpy | opencv-python | opencv-python-headless | opencv-contrib-python | opencv-contrib-python-headless)
        note "$requirement: JetPack's, from the system site-packages (pip must not replace it on a Jetson)" ;;
      onnxruntime) note "$requirement: onnxruntime-gpu from the Jetson index instead (never both)" ;;
      onnxruntime-gpu) want_onnxruntime_gpu=1 ;;
      *) from_pypi+=("$requirement") ;;
    esac
  done < <(requirements || die "cannot read the requirements from $SOURCE_DIR/setup.py")
  run "$venv_python" -m pip install --upgrade --no-deps "${PIP_ARGS[@]}" "$SOURCE_DIR"
  ((${#from_pypi[@]} == 0)) || run "$venv_python" -m pip install --upgrade "${PIP_ARGS[@]}" "${from_pypi[@]}"
  if ((want_onnxruntime_gpu == 1)); then
    # --index-url: only NVIDIA's Jetson build can be picked; --no-deps: it cannot pull numpy in.
    run "$venv_python" -m pip install --upgrade --no-deps --index-url "$JETSON_INDEX" "onnxruntime-gpu>=1.17"
    run "$venv_python" -m pip install --upgrade coloredlogs flatbuffers packaging protobuf sympy
  fi
  # A PyPI opencv/numpy/onnxruntime left from an earlier install would shadow JetPack's.
  run "$venv_python" -m pip uninstall -y opencv-python opencv-python-headless numpy onnxruntime
}

while (($# > 0)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --start) START=1 ;;
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
    --prefix=*) PREFIX=${1#*=} ;;
    --source) SOURCE_DIR=${2:?--source needs a directory}; shift ;;
    --source=*) SOURCE_DIR=${1#*=} ;;
    --python) PYTHON=${2:?--python needs an interpreter}; shift ;;
    --python=*) PYTHON=${1#*=} ;;
    --extras) EXTRAS=${2?--extras needs a list (may be empty)}; EXTRAS_GIVEN=1; shift ;;
    --extras=*) EXTRAS=${1#*=}; EXTRAS_GIVEN=1 ;;
    --pip-arg) PIP_ARGS+=("${2:?--pip-arg needs an argument}"); shift ;;
    --pip-arg=*) PIP_ARGS+=("${1#*=}") ;;
    --jetson-index) JETSON_INDEX=${2:?--jetson-index needs a URL}; shift ;;
    --jetson-index=*) JETSON_INDEX=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done

[[ $PREFIX == /* ]] || die "--prefix must be an absolute path, got '$PREFIX'"
[[ -d $PREFIX ]] || die "--prefix directory does not exist: $PREFIX"
if [[ $PREFIX != / ]] && ((DRY_RUN == 0)); then
  die "--prefix is only supported with --dry-run (a virtualenv only works at the path it was made at)"
fi
if ((DRY_RUN == 0)) && ((EUID != 0)); then
  die "must run as root: sudo $0 ${ORIGINAL_ARGS[*]} (or add --dry-run to see what it would do)"
fi
SOURCE_DIR=$(cd -- "$SOURCE_DIR" && pwd) || die "--source directory does not exist"
[[ -f $SOURCE_DIR/setup.py ]] || die "no setup.py in $SOURCE_DIR: pass --source with the vla-edge source tree"
for shipped in vla-edge.service 99-vla-edge-motor.rules README.md; do
  [[ -f $SOURCE_DIR/systemd/$shipped ]] || die "missing $SOURCE_DIR/systemd/$shipped"
done
command -v "$PYTHON" >/dev/null || die "interpreter not found: $PYTHON (pass --python)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  die "$PYTHON is older than Python 3.10; pass --python with a newer interpreter"

if ((DRY_RUN == 1)); then
  note "dry run: nothing is changed; root file system: $PREFIX"
fi
note "installing vla-edge from $SOURCE_DIR"
L4T_RELEASE=$(l4t_release)
if [[ -n $L4T_RELEASE ]]; then
  note "Jetson: L4T R$L4T_RELEASE ($(p /etc/nv_tegra_release)); TensorRT, OpenCV and numpy come from JetPack"
  case $L4T_RELEASE in
    36.[4-9]* | 36.[1-9][0-9]* | 3[7-9].* | [4-9][0-9].*) ;;
    *) note "WARNING: L4T R$L4T_RELEASE is older than JetPack 6.1 (L4T R36.4): its TensorRT 8.x is refused;"
       note "WARNING: flash JetPack 6.1 or newer" ;;
  esac
  ((EXTRAS_GIVEN == 1)) || EXTRAS=gpu,engines
else
  note "not a Jetson (no $(p /etc/nv_tegra_release)): every dependency comes from pip"
  ((EXTRAS_GIVEN == 1)) || EXTRAS=gpu
fi

# --- 1. service user: no login, no home of its own (its HOME is the state directory) ---
if user_exists "$SERVICE_USER"; then
  note "user $SERVICE_USER exists"
else
  useradd_cmd=(useradd --system --no-create-home --home-dir "$STATE_DIR" --shell /usr/sbin/nologin
    --user-group --comment "vla-edge robot service")
  [[ $PREFIX == / ]] || useradd_cmd+=(--root "$PREFIX")
  run "${useradd_cmd[@]}" "$SERVICE_USER"
fi

# --- 2. device groups: serial (dialout), camera and Jetson GPU nodes (video, render) ---
present_groups=()
missing_groups=()
for group in "${WANTED_GROUPS[@]}"; do
  if ! group_exists "$group"; then
    missing_groups+=("$group")
    note "group $group does not exist here: skipped"
    continue
  fi
  present_groups+=("$group")
  if user_exists "$SERVICE_USER" && in_group "$SERVICE_USER" "$group"; then
    note "user $SERVICE_USER is already in group $group"
  else
    usermod_cmd=(usermod --append --groups "$group")
    [[ $PREFIX == / ]] || usermod_cmd+=(--root "$PREFIX")
    run "${usermod_cmd[@]}" "$SERVICE_USER"
  fi
done

# --- 3. directories: software, config (root-owned, group-readable), state (the bundle) ---
run install -d -m 0755 "$(p "$APP_DIR")"
run install -d -m 0750 -o root -g "$SERVICE_USER" "$(p "$CONFIG_DIR")"
run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$(p "$STATE_DIR")"

# --- 4. virtualenv: --system-site-packages so that JetPack's TensorRT bindings are visible ---
if [[ -x $(p "$VENV/bin/python") ]]; then
  note "virtualenv $VENV exists: upgrading the package in it"
  if ! grep -qiE '^include-system-site-packages *= *true' "$(p "$VENV/pyvenv.cfg")" 2>/dev/null; then
    note "WARNING: $VENV was made without --system-site-packages, so JetPack's TensorRT is invisible to it;"
    note "WARNING: remove it (rm -rf $VENV) and run this script again"
  fi
else
  run "$PYTHON" -m venv --system-site-packages "$(p "$VENV")"
fi
if [[ -n $L4T_RELEASE ]]; then
  install_jetson_packages
else
  package_spec=$SOURCE_DIR
  [[ -z $EXTRAS ]] || package_spec="${SOURCE_DIR}[${EXTRAS}]"
  run "$(p "$VENV/bin/python")" -m pip install --upgrade "${PIP_ARGS[@]}" "$package_spec"
fi
if ((DRY_RUN == 0)) && [[ ! -x $VENV/bin/vla-edge ]]; then
  die "pip finished but $VENV/bin/vla-edge is missing; the unit's ExecStart needs it"
fi

# --- 5. config: installed once from the example, never overwritten ---
example=$SOURCE_DIR/systemd/robot.example.yaml
if [[ -e $(p "$CONFIG") ]]; then
  note "config $CONFIG exists: kept"
elif [[ -f $example ]]; then
  run install -m 0640 -o root -g "$SERVICE_USER" "$example" "$(p "$CONFIG")"
  note "edit $CONFIG for this robot (camera, serial port, bundle) before starting the service"
else
  note "skipped config: $example is not in this source tree; write $CONFIG before starting"
fi

# --- 6. unit, its group drop-in, documentation ---
run install -D -m 0644 "$SOURCE_DIR/systemd/vla-edge.service" "$(p "$UNIT_PATH")"
if ((${#missing_groups[@]} > 0)); then
  # systemd refuses to start a unit whose SupplementaryGroups= names a group that does not exist.
  run install -d -m 0755 "$(p "$DROPIN_DIR")"
  groups_line=""
  ((${#present_groups[@]} == 0)) || groups_line="SupplementaryGroups=${present_groups[*]}"
  write_file "$(p "$GROUPS_DROPIN")" 0644 <<EOF
# Written by vla-edge install.sh: group(s) ${missing_groups[*]} do not exist on this system, and
# systemd refuses to start a service whose SupplementaryGroups= names a missing group.
[Service]
SupplementaryGroups=
${groups_line}
EOF
elif [[ -e $(p "$GROUPS_DROPIN") ]]; then
  run rm -f "$(p "$GROUPS_DROPIN")"
fi
run install -D -m 0644 "$SOURCE_DIR/systemd/README.md" "$(p "$DOC_PATH")"

# --- 7. udev rule for the motor adapter: installed once, an edited copy is kept ---
rule_src=$SOURCE_DIR/systemd/99-vla-edge-motor.rules
if [[ -e $(p "$RULE_PATH") ]] && ! cmp -s "$rule_src" "$(p "$RULE_PATH")"; then
  note "udev rule $RULE_PATH differs from the shipped one (edited for this robot): kept"
else
  run install -D -m 0644 "$rule_src" "$(p "$RULE_PATH")"
fi
if ((DRY_RUN == 1)) || command -v udevadm >/dev/null; then
  run udevadm control --reload
  run udevadm trigger --subsystem-match=tty --action=change
else
  note "udevadm not found (a container?): udev rule not loaded"
fi

# --- 8. systemd: check the unit, load it, enable it ---
if command -v systemd-analyze >/dev/null; then
  # A warning here (e.g. a setting this older systemd does not know) is reported, not fatal.
  if ! run systemd-analyze verify "$(p "$UNIT_PATH")"; then
    note "WARNING: systemd-analyze verify reported problems with $UNIT_PATH (see above)"
  fi
fi
if systemd_running; then
  run systemctl daemon-reload
else
  note "systemd is not running here (a container or chroot?): skipped daemon-reload"
fi
enable_cmd=(systemctl enable)
[[ $PREFIX == / ]] || enable_cmd=(systemctl "--root=$PREFIX" enable)
run "${enable_cmd[@]}" "$UNIT"
if ((START == 1)); then
  if systemd_running; then
    run systemctl restart "$UNIT"
  else
    note "systemd is not running here: cannot start $UNIT"
  fi
else
  note "not started; start it with: systemctl start $UNIT"
fi

note "done. Put the policy bundle under $STATE_DIR, check $CONFIG, then:"
note "  systemctl start $UNIT && systemctl status $UNIT && journalctl -u $UNIT -f"
