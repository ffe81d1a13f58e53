"""Print the pins of a requirements file that apply to another machine and Python version.

    python tools/requirements_for.py --python 3.8 --machine aarch64 requirements.txt

pip evaluates environment markers (`; platform_machine != ...`) for the interpreter that runs
it, even under --platform and --python-version (pypa/pip#11664), so `pip download --platform
manylinux2014_aarch64 -r requirements.txt` on an x86_64 machine follows x86_64's markers. This
evaluates them for the target instead; its output goes to `pip download -r /dev/stdin` or
`pip install --target`. build_zip.sh and the requirement tests use it.
"""

import argparse
import sys

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare python3 with pip (build_zip.sh's PYTHON) has pip's own copy
    from pip._vendor.packaging.requirements import Requirement


def main(argv=None):
    """Print one `name==version` line per requirement whose markers hold for the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True, help="target Python version, e.g. 3.8")
    parser.add_argument("--machine", required=True, help="target platform_machine, e.g. aarch64")
    parser.add_argument("files", nargs="+", help="requirements files")
    args = parser.parse_args(argv)
    for path in args.files:
        with open(path) as lines:
            for requirement in applicable(lines, args.python, args.machine):
                print(requirement)


def applicable(lines, python, machine):
    """The requirement strings (markers dropped) of `lines` that apply to Linux `machine`."""
    environment = target_environment(python, machine)
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            sys.exit(f"error: {line!r}: options and -r includes are not supported here")
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            requirement.marker = None
            yield str(requirement)


def target_environment(python, machine):
    """The PEP 508 marker environment of CPython `python` on Linux `machine`."""
    return {
        "implementation_name": "cpython",
        "implementation_version": python + ".0",
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_system": "Linux",
        "python_full_version": python + ".0",
        "python_version": python,
        "sys_platform": "linux",
    }


if __name__ == "__main__":
    main()
