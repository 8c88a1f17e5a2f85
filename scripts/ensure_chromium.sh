#!/usr/bin/env bash
# Install Debian's chromium (headless browser for the report's HTML test) when it is missing.
# Non-interactive; needs root or sudo. Prints the browser path; exit status 1 when it cannot be installed
# (the Chromium test then skips and says why).
set -u
find_chromium() {
  for name in ${CHROMIUM:-} chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  done
  return 1
}
if path=$(find_chromium); then echo "$path"; exit 0; fi
if [ "$(id -u)" = 0 ]; then SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"
else echo "ensure_chromium: chromium is missing and installing it needs root (or passwordless sudo)" >&2; exit 1; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: chromium is missing and there is no apt-get to install it; install a Chromium and set CHROMIUM=<path>" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure_chromium: installing Debian's chromium (apt-get) ..." >&2
# update only when the package is unknown to the local index (a fresh container has none)
if ! apt-cache show chromium >/dev/null 2>&1; then $SUDO apt-get update -qq >&2 || true; fi
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2 \
  || { echo "ensure_chromium: apt-get install chromium failed" >&2; exit 1; }
if path=$(find_chromium); then echo "$path"; exit 0; fi
echo "ensure_chromium: apt-get reported success but no chromium binary is on PATH" >&2
exit 1
