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
# The same package without a C compiler: plain Python, and it works the same.
if "$tmp/venv/bin/python" -c "import sys; from twistvpn import build; sys.exit(not build.compiled_modules())"; then
    rm -rf "$tmp/dist-pure" "$tmp/venv-pure"
    CC=/nonexistent/cc python -m build --wheel --outdir "$tmp/dist-pure" "$here"
    ls "$tmp"/dist-pure/*-py3-none-any.whl >/dev/null
    python -m venv "$tmp/venv-pure"
    "$tmp/venv-pure/bin/pip" install -q "$tmp"/dist-pure/*.whl
    "$tmp/venv-pure/bin/twistvpn" --version | grep -q "pure-Python build"
    "$tmp/venv-pure/bin/twistd" twistvpn-node --help >/dev/null
fi
echo "packaging: ok"
