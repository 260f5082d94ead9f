#!/usr/bin/env bash
# Debian's Chromium for the shopper's-page browser test (Playwright drives it; no browser download). Installed
# with apt when missing and we are root (CI and the developers' machines); otherwise the test says it is skipped.
set -eu
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "chromium is not installed: tests/test_shop_browser.py will be skipped (apt-get install chromium)" >&2
fi
