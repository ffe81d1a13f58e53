#!/usr/bin/env bash
# Build dist/greengrassBrainSegmentation.zip: the app and its pure-Python dependencies at the top
# level, ready for a Greengrass V1 Lambda, a Greengrass V2 component or a plain unzip on a Pi.
# ONNX Runtime and numpy are native and are installed on the device unless --with-native adds
# them.
# Same inputs give the same bytes: fixed timestamps and permissions, sorted entries.
set -euo pipefail

NAME=greengrassBrainSegmentation
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
APP_FILES=(greengrassBrainSegmentationApp.py load_model.py processing.py volumes.py qc.py page.html)
# Pure-Python packages that travel in the zip; their versions come from requirements.txt.
PURE=(flask werkzeug jinja2 markupsafe itsdangerous click blinker waitress greengrasssdk cbor2
      pypng nibabel packaging importlib-resources typing-extensions pydicom)
# What the server imports besides the zip (`import onnxruntime` needs nothing more), at the
# versions requirements.txt gives for the target Python and machine.
NATIVE=(onnxruntime numpy)
# A Raspberry Pi OS 64-bit device. The pure layer is resolved for it too, so the zip does not
# depend on the build machine (compiled speedups are dropped anyway).
TARGET_PLATFORM=manylinux2014_aarch64
TARGET_PYTHON=3.11
UPLOAD_LIMIT=$((50 * 1024 * 1024))  # the console's direct zip upload limit (AWS MB = 2^20 bytes)

die() { echo "build_zip.sh: error: $*" >&2; exit 1; }

usage() {
    cat <<EOF
usage: ./build_zip.sh [--with-model] [--with-native PLATFORM] [--out DIR]

Builds DIR/$NAME.zip (DIR defaults to dist/).
  --with-model            add model/segmentation-net/ so the device needs no ML resource
  --with-native PLATFORM  add onnxruntime and numpy for PLATFORM and Python $TARGET_PYTHON,
                          e.g. manylinux_2_28_aarch64 (glibc 2.28+: Raspberry Pi OS 11 and 12)
  --out DIR               write the zip into DIR instead of dist/
Environment: PYTHON, the python3 whose pip fetches the packages (default: python3).
EOF
}

with_model=0
platform=""
out="$ROOT/dist"
while [ $# -gt 0 ]; do
    case "$1" in
        --with-model) with_model=1 ;;
        --with-native)
            [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#-}" = "$2" ] \
                || die "--with-native needs a platform, e.g. manylinux_2_28_aarch64"
            platform=$2; shift ;;
        --out)
            [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#-}" = "$2" ] || die "--out needs a directory"
            out=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (try --help)" ;;
    esac
    shift
done

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 \
    || die "'$PYTHON' not found; install Python 3 or set PYTHON=/path/to/python3"
"$PYTHON" -m pip --version 2>/dev/null | grep '^pip ' >/dev/null \
    || die "pip is not available for $PYTHON; install python3-pip or set PYTHON to a venv's python"

pin() {  # the name==version of a package's first line in requirements.txt (markers dropped:
    # where a package has one line per Python, the first is the one for TARGET_PYTHON)
    local line
    line=$(grep -m 1 -iE "^$1==[^ #;]+" "$ROOT/requirements.txt" | sed 's/[ #;].*//') \
        || die "requirements.txt has no pinned '$1==VERSION' line"
    echo "$line"
}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pip_quiet=(--quiet --disable-pip-version-check --no-input)

pure_pins=()
for name in "${PURE[@]}"; do pure_pins+=("$(pin "$name")"); done
echo "fetching ${pure_pins[*]}"
"$PYTHON" -m pip install "${pip_quiet[@]}" --no-deps --no-compile --only-binary=:all: \
    --platform "$TARGET_PLATFORM" --python-version "$TARGET_PYTHON" --implementation cp \
    --target "$stage/pure" "${pure_pins[@]}"
# markupsafe and cbor2 ship optional C speedups and fall back to pure Python without them.
rm -f "$stage"/pure/markupsafe/_speedups*.so "$stage"/pure/markupsafe/_speedups.c \
      "$stage"/pure/_cbor2*.so
# Their own test suites and test data are of no use on a device.
rm -rf "$stage"/pure/nibabel/tests "$stage"/pure/nibabel/*/tests "$stage"/pure/pydicom/tests \
       "$stage"/pure/pydicom/data/test_files
compiled=$(cd "$stage/pure" && find . -name '*.so' -o -name '*.so.*' -o -name '*.pyd')
[ -z "$compiled" ] || die "unexpected compiled files in the pure-Python layer: $compiled"

if [ -n "$platform" ]; then
    case "$platform" in
        manylinux*_aarch64) machine=aarch64 ;;
        manylinux*_x86_64) machine=x86_64 ;;
        *) die "--with-native: '$platform' is not a manylinux aarch64 or x86_64 platform" ;;
    esac
    # requirements.txt's markers pick the pins for the target, not for this machine.
    target_pins=$("$PYTHON" "$ROOT/tools/requirements_for.py" --python "$TARGET_PYTHON" \
        --machine "$machine" "$ROOT/requirements.txt") || die "cannot read requirements.txt"
    native_pins=()
    for name in "${NATIVE[@]}"; do
        line=$(grep -m 1 -iE "^$name==" <<<"$target_pins") \
            || die "requirements.txt has no $name pin for $machine and Python $TARGET_PYTHON"
        native_pins+=("$line")
    done
    echo "fetching ${native_pins[*]} for $platform"
    # A glibc new enough for $platform also runs the older manylinux2014 wheels (numpy's).
    # pip install --target with --platform is pip download plus a correct unpack of each wheel.
    "$PYTHON" -m pip install "${pip_quiet[@]}" --no-deps --no-compile --only-binary=:all: \
        --platform "$platform" --platform "manylinux2014_$machine" \
        --python-version "$TARGET_PYTHON" --implementation cp \
        --target "$stage/native" "${native_pins[@]}" \
        || die "pip found no ${native_pins[*]} wheels for $platform (onnxruntime's aarch64 \
wheels need manylinux_2_28_aarch64)"
    # The C API library: the Python binding has its own copy and never loads it (26 MB).
    rm -f "$stage"/native/onnxruntime/capi/libonnxruntime.so*
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
zip_path="$out/$NAME.zip"
"$PYTHON" - "$ROOT" "$stage" "$zip_path.tmp" "$with_model" "${APP_FILES[@]}" <<'PY'
"""Write the zip: sorted entries, 1980-01-01 timestamps, 0644 files, no caches or scripts."""
import sys
import zipfile
from pathlib import Path

root, stage, zip_path, with_model, app_files = (Path(sys.argv[1]), Path(sys.argv[2]),
                                                sys.argv[3], sys.argv[4] == "1", sys.argv[5:])
entries = {name: root / name for name in app_files}
if with_model:
    model = root / "model" / "segmentation-net"
    if not any(model.glob("*-symbol.json")):
        sys.exit(f"build_zip.sh: error: --with-model: no *-symbol.json model in {model}")
    entries.update({f"model/segmentation-net/{p.name}": p for p in model.iterdir() if p.is_file()})
for layer in ("pure", "native"):
    base = stage / layer
    for path in base.rglob("*") if base.is_dir() else []:
        relative = path.relative_to(base)
        # bin/ holds console scripts whose shebang names the build machine's python.
        if (path.is_dir() or relative.parts[0] == "bin" or "__pycache__" in relative.parts
                or path.suffix == ".pyc"):
            continue
        entries[relative.as_posix()] = path
with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
    for name in sorted(entries):
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.create_system = 3  # Unix, so unzip honours the permissions below
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, entries[name].read_bytes(), compresslevel=9)
print(f"{len(entries)} files")
PY
mv "$zip_path.tmp" "$zip_path"

size=$(wc -c < "$zip_path" | tr -d ' ')
mb=$(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }')
share=$(awk -v s="$size" -v l="$UPLOAD_LIMIT" 'BEGIN { printf "%.0f", 100 * s / l }')
if [ "$size" -gt "$UPLOAD_LIMIT" ]; then
    echo "warning: $mb MB is above the console's 50 MB direct-upload limit; upload it to S3" >&2
elif [ -n "$platform" ]; then
    echo "$share% of the console's 50 MB direct-upload limit"
fi
echo "$zip_path $size bytes ($mb MB)"
