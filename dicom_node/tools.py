"""Check (and, as root, install) the system tools the tests and the demo use.

``python -m dicom_node.tools [--install]``: prints what is missing and the exact command that
installs it; with ``--install`` and root privileges it runs ``apt-get install`` itself.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

# Debian package -> files or commands it provides that we rely on
REQUIRED: dict[str, list[str]] = {
    "dcmtk": ["storescu", "storescp", "echoscu", "dsrdump"],
    "dicom3tools": ["dciodvfy"],
    "orthanc": ["Orthanc"],
    "orthanc-dicomweb": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
    "postgresql": ["/usr/lib/postgresql/*/bin/initdb"],
    "chromium": ["chromium"],
    # Node.js and npm install the pinned OHIF build for the viewer tests. Where Node.js comes from
    # elsewhere (NodeSource bundles npm) Debian's npm conflicts with it: only install both when
    # node itself is missing.
    "nodejs": ["node", "npm"],
}
APT_NAMES = {"nodejs": ["nodejs", "npm"]}


def _present(item: str) -> bool:
    if item.startswith("/"):
        return bool(glob.glob(item))
    return shutil.which(item) is not None


def missing_packages() -> list[str]:
    """Debian packages whose tools are not found."""
    return [pkg for pkg, items in REQUIRED.items() if not all(_present(i) for i in items)]


def main(argv: list[str] | None = None) -> int:
    """Check the tools; install the missing ones with apt-get when asked and root."""
    parser = argparse.ArgumentParser(prog="python -m dicom_node.tools")
    parser.add_argument("--install", action="store_true", help="apt-get install what is missing (root only)")
    args = parser.parse_args(argv)
    missing = missing_packages()
    if not missing:
        print("system tools: dcmtk, dicom3tools, orthanc (+dicomweb), postgresql, chromium, npm present")
        return 0
    cmd = ["apt-get", "install", "-y", "-q", *[n for pkg in missing for n in APT_NAMES.get(pkg, [pkg])]]
    if args.install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing missing system packages: {' '.join(missing)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env)
        if subprocess.run(cmd, env=env).returncode == 0 and not missing_packages():
            return 0
    print("missing system packages for the tests: " + " ".join(missing), file=sys.stderr)
    print(f"install them with:  sudo {' '.join(cmd)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
