#!/usr/bin/env bash
# Install the pinned OHIF Viewer build for the browser tests: `npm pack` fetches the published
# @ohif/app tarball (its prebuilt dist/ is served as static files), checked against a pinned
# SHA-256, unpacked under .cache/ohif/. Idempotent: does nothing when already unpacked.
# Needs Node.js with npm (Debian: apt-get install nodejs npm).
set -euo pipefail
OHIF_VERSION="3.13.2"
OHIF_SHA256="b189d3963bfc58e9394a9db8c7be75d07beb029ec211dbb126d47b62969dd3f1"

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${OHIF_CACHE_DIR:-$repo/.cache/ohif}"
tarball="$cache/ohif-app-$OHIF_VERSION.tgz"
dest="$cache/$OHIF_VERSION"

if [[ -f "$dest/.installed" ]]; then
    exit 0
fi
command -v npm >/dev/null || {
    echo "install_ohif.sh: npm not found; install Node.js and npm (apt-get install nodejs npm)" >&2
    exit 1
}
mkdir -p "$cache"
if [[ ! -f "$tarball" ]]; then
    (cd "$cache" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
fi
echo "$OHIF_SHA256  $tarball" | sha256sum --check --status || {
    echo "install_ohif.sh: $tarball does not match the pinned SHA-256; delete it and rerun" >&2
    exit 1
}
# Unpack into a scratch directory and rename, so an interrupted run never looks installed.
rm -rf "$dest" "$dest.tmp"
mkdir -p "$dest.tmp"
tar -xzf "$tarball" -C "$dest.tmp" --strip-components=1 package/dist package/package.json
touch "$dest.tmp/.installed"
mv "$dest.tmp" "$dest"
echo "OHIF $OHIF_VERSION unpacked in $dest"
