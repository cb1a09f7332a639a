#!/bin/sh
# System packages the test suite needs beyond PyPI: Chromium and ChromeDriver for the browser
# tests of `vlmoe serve` (tests/serve). Installs them with apt-get when they are missing and we
# are root (as in CI); otherwise says what to install and leaves the machine alone.
# Idempotent: prints one line and exits 0 when both are already there.
set -eu
have() { command -v "$1" >/dev/null 2>&1; }
if (have chromium || have chromium-browser) && have chromedriver; then
    echo "system-deps: chromium and chromedriver present"
    exit 0
fi
if [ "$(id -u)" = 0 ] && have apt-get; then
    echo "system-deps: installing chromium and chromium-driver with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q chromium chromium-driver >/dev/null
    chromium --version
    exit 0
fi
echo "system-deps: chromium and chromedriver are missing; the browser tests will be skipped."
echo "system-deps: install them, e.g. on Debian/Ubuntu: sudo apt-get install chromium chromium-driver"
