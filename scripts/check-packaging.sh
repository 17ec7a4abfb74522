#!/usr/bin/env bash
# Build the wheel, install it into a brand-new venv and check the entry points work.
set -euo pipefail
tmp=${1:-$(mktemp -d)}
here=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$tmp/dist" "$tmp/venv"
python -m build --wheel --outdir "$tmp/dist" "$here"
python -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "$tmp"/dist/*.whl
cd "$tmp"
"$tmp/venv/bin/twistd" twistvpn-node --help >/dev/null
"$tmp/venv/bin/twistvpn" --help >/dev/null
"$tmp/venv/bin/twistd" --help | grep twistvpn-node >/dev/null
"$tmp/venv/bin/twistd" --help-reactors | grep -P "^\s*twistvpn\t" >/dev/null
# The data files the package reads at run time: schemas, units, the console's CSS and JS.
"$tmp/venv/bin/python" - <<'PY'
from importlib import resources
for package, name in (("twistvpn.rendezvous", "schema-v4.sql"),
                      ("twistvpn.units", "twistvpn-node.service"),
                      ("twistvpn.console", "static/console.css"),
                      ("twistvpn.console", "static/console.js")):
    assert resources.files(package).joinpath(name).is_file(), (package, name)
PY
"$tmp/venv/bin/twistvpn" --version
# With a C compiler and Python's headers (bootstrap installs both) the wheel
# must be the compiled build, whatever the venv held before it.
compiler_here=$(python - <<'PY'
import os, shutil, sysconfig
headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("yes" if shutil.which("cc") and os.path.exists(headers) else "no")
PY
)
if [ "$compiler_here" = yes ]; then
    "$tmp/venv/bin/twistvpn" --version | grep -q "compiled build (mypyc"
    # The same package without a C compiler: plain Python, and it works the same.
    rm -rf "$tmp/dist-pure" "$tmp/venv-pure"
    CC=/nonexistent/cc python -m build --wheel --outdir "$tmp/dist-pure" "$here"
    ls "$tmp"/dist-pure/*-py3-none-any.whl >/dev/null
    python -m venv "$tmp/venv-pure"
    "$tmp/venv-pure/bin/pip" install -q "$tmp"/dist-pure/*.whl
    "$tmp/venv-pure/bin/twistvpn" --version | grep -q "pure-Python build"
    "$tmp/venv-pure/bin/twistd" twistvpn-node --help >/dev/null
fi
echo "packaging: ok"
