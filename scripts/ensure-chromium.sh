#!/usr/bin/env bash
# Make sure headless Chromium is here for the browser test (tests/test_browser.py).
#
# Installs Debian's `chromium` with apt-get when it is missing and we may (root, or passwordless
# sudo). Quiet, bounded in time, and it never fails the build: when Chromium cannot be installed
# it prints a warning and exits 0, and the browser test then skips with the reason.
# Cheap when Chromium is already installed (one `command -v`).
#
#   CHROMIUM=/path/to/chromium        use this browser (the test reads the same variable)
#   CHROMIUM_INSTALL_TIMEOUT=600      seconds allowed for each apt-get step
set -u

warn() { echo "ensure-chromium: WARNING: $*; the browser test will be skipped." >&2; exit 0; }

if [ -n "${CHROMIUM:-}" ] && [ -x "${CHROMIUM}" ]; then exit 0; fi
for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then exit 0; fi
done

command -v apt-get >/dev/null 2>&1 || warn "chromium is not installed and there is no apt-get to install it"
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
  as_root=(sudo -n)
else
  warn "chromium is not installed and installing it needs root (run: apt-get install chromium)"
fi

limit="${CHROMIUM_INSTALL_TIMEOUT:-600}"
log="$(mktemp "${TMPDIR:-/tmp}/ensure-chromium.XXXXXX")"
echo "ensure-chromium: installing Debian's chromium with apt-get (at most ${limit} s per step)..." >&2
if ! timeout "$limit" ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1; then
  tail -n 5 "$log" >&2
  rm -f "$log"
  warn "apt-get update failed or timed out"
fi
if ! timeout "$limit" ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq chromium >"$log" 2>&1; then
  tail -n 5 "$log" >&2
  rm -f "$log"
  warn "apt-get install chromium failed or timed out"
fi
rm -f "$log"
command -v chromium >/dev/null 2>&1 || warn "apt-get ran but no chromium command was installed"
echo "ensure-chromium: $(chromium --version 2>/dev/null | head -n 1)" >&2
exit 0
