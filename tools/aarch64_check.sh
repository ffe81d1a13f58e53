#!/usr/bin/env bash
# Serve the app in an emulated 64-bit Raspberry Pi OS-like userland and compare its mask with
# this machine's. Debian bookworm arm64 (Python 3.11, like Pi OS 12) comes from debootstrap,
# runs under qemu-user-static, installs requirements.txt with pip, serves the bundled model
# and gets tests/data/icbm2009a_axial100.png POSTed. Needs root on a Debian/Ubuntu x86_64 box
# with binfmt_misc; the first run downloads about 150 MB and takes a while.
#
#   sudo apt-get install qemu-user-static debootstrap binfmt-support
#   sudo tools/aarch64_check.sh [ROOTFS]        # default /var/tmp/pi-arm64, kept for reruns
#   sudo RUNTIME=openvino tools/aarch64_check.sh   # also installs OpenVINO there and serves with it
#
# Under qemu-user the guest reads the host's /proc/cpuinfo, on which `import onnxruntime`
# crashes (its CPU detection expects an ARM cpuinfo), so a Raspberry Pi 4's is bind-mounted.
# The guest CPU is a Pi 4's Cortex-A72 (QEMU_CPU): with qemu's default, OpenVINO's kernels
# stop on an instruction qemu does not emulate. OpenVINO also reads the CPU layout from /sys.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOTFS=${1:-/var/tmp/pi-arm64}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PORT=${PORT:-5077}
RUNTIME=${RUNTIME:-auto}
OPENVINO_PIN=openvino==2025.2.0  # requirements.txt's x86_64 pin for Python 3.11
SLICE=tests/data/icbm2009a_axial100.png
HOST_PYTHON=${PYTHON:-$ROOT/.venv/bin/python}

die() { echo "aarch64_check.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mounts need it)"
command -v debootstrap >/dev/null || die "apt-get install debootstrap qemu-user-static"
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] \
    || die "no qemu-aarch64 binfmt handler: apt-get install qemu-user-static binfmt-support"

if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    echo "debootstrap bookworm arm64 into $ROOTFS"
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,ca-certificates,libgomp1 bookworm "$ROOTFS" "$MIRROR"
fi

mounted=()
server=""
cleanup() {
    # The guest must be gone before its mounts go: a live one keeps /sys busy.
    [ -z "$server" ] || { kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; } || true
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
mount -t proc proc "$ROOTFS/proc" && mounted+=("$ROOTFS/proc")
cpuinfo=$(mktemp)
for core in 0 1 2 3; do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$core"
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n'
    printf 'CPU part\t: 0xd08\nCPU revision\t: 3\n\n'
done > "$cpuinfo"
printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n' \
    >> "$cpuinfo"
mount --bind "$cpuinfo" "$ROOTFS/proc/cpuinfo" && mounted+=("$ROOTFS/proc/cpuinfo")
mount --bind /dev "$ROOTFS/dev" && mounted+=("$ROOTFS/dev")
mount -t sysfs sysfs "$ROOTFS/sys" && mounted+=("$ROOTFS/sys")
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# pip in the guest trusts what this machine trusts (a proxy's own CA, for instance).
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/host-ca-certificates.crt"

echo "copying the app, the bundled model and requirements.txt into $ROOTFS/opt/app"
rm -rf "$ROOTFS/opt/app" && mkdir -p "$ROOTFS/opt/app"
# The app's files are build_zip.sh's list, so this check goes stale with it or not at all.
app_files=$(sed -n 's/^APP_FILES=(\(.*\))$/\1/p' "$ROOT/build_zip.sh")
[ -n "$app_files" ] || die "no APP_FILES=(...) line in build_zip.sh"
# shellcheck disable=SC2086  # the list is words
(cd "$ROOT" && cp -r $app_files requirements.txt model "$ROOTFS/opt/app/")
guest_env=(/usr/bin/env -i PATH=/usr/bin:/bin HOME=/root QEMU_CPU=cortex-a72
           PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt)
in_guest() { chroot "$ROOTFS" "${guest_env[@]}" "$@"; }
echo "guest: $(in_guest uname -m), $(in_guest python3 --version)"
[ -x "$ROOTFS/opt/venv/bin/python" ] || in_guest python3 -m venv /opt/venv
started=$(date +%s)
in_guest /opt/venv/bin/pip install --quiet --disable-pip-version-check -r /opt/app/requirements.txt
if [ "$RUNTIME" = openvino ]; then
    in_guest /opt/venv/bin/pip install --quiet --disable-pip-version-check \
        "$OPENVINO_PIN" openvino-telemetry==2025.2.0
else  # what requirements.txt installs on a Pi, even after a RUNTIME=openvino run
    in_guest /opt/venv/bin/pip uninstall --quiet --yes openvino openvino-telemetry 2>/dev/null || true
fi
echo "pip install: $(($(date +%s) - started)) s; installed:"
in_guest /opt/venv/bin/pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(openvino|onnxruntime|numpy|mxnet) ' || true

"$HOST_PYTHON" -c "import socket; socket.create_server(('127.0.0.1', $PORT)).close()" \
    2>/dev/null || die "port $PORT is taken (PORT=... to use another)"
# chroot and env exec in place, so $! is the guest server itself and cleanup can end it.
chroot "$ROOTFS" "${guest_env[@]}" RUNTIME="$RUNTIME" \
    /opt/venv/bin/python /opt/app/greengrassBrainSegmentationApp.py \
    --host 127.0.0.1 --port "$PORT" > "$ROOTFS/tmp/server.log" 2>&1 &
server=$!
"$HOST_PYTHON" - "$ROOT" "$PORT" "$SLICE" "$ROOTFS/tmp/server.log" <<'PY'
"""Wait for the guest's /health, POST the slice, compare with the mask computed here."""
import json, sys, time, urllib.request
from pathlib import Path

root, port, slice_path, log_path = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, str(root))
import numpy as np, png  # noqa: E402
import load_model, processing  # noqa: E402

url = f"http://127.0.0.1:{port}"
began = time.time()
while True:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            health = json.loads(response.read())
            break
    except OSError:
        if time.time() - began > 600:
            sys.exit("guest server did not start:\n" + Path(log_path).read_text())
        time.sleep(1)
print(f"guest healthy after {time.time() - began:.0f} s (emulated): runtime {health['runtime']}")
data = (root / slice_path).read_bytes()
request = urllib.request.Request(url + "/segment", data=data, headers={"Content-Type": "image/png"})
with urllib.request.urlopen(request, timeout=600) as response:
    guest_png, headers = response.read(), response.headers
width, height, rows, _ = png.Reader(bytes=guest_png).read()  # palette indices = classes
guest = np.vstack([np.asarray(row, np.uint8) for row in rows]).reshape(height, width)
model = load_model.load(str(load_model.BUNDLED_PATH))
host = model.segment(processing.decode_png(data))
same = float((guest == host).mean())
print(f"guest X-Runtime {headers['X-Runtime']}, X-Inference-Ms {headers['X-Inference-Ms']}")
print(f"aarch64 mask vs x86_64 mask ({model.runtime.name}): {100 * same:.4f} % pixels equal, "
      f"PNG bytes {'identical' if guest_png == processing.encode_mask(host) else 'differ'}")
sys.exit(0 if same >= 0.9999 else 1)
PY
