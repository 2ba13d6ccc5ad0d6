#!/usr/bin/env python3
"""Container probe for notip-trio: GET a path of the daemon's HTTP server.

    notip-probe /livez | /readyz | /healthz [timeout_seconds]

Exit 0 on a 2xx answer; otherwise exit 1 with one line on stderr (for /readyz
that line carries the daemon's 503 reasons). Host and port come from
METRICS_ADDR as the daemon reads it (default ":9090"; a wildcard host means
loopback). Installed in the image as /usr/local/bin/notip-probe and used by its
HEALTHCHECK and by the manifest's exec probes: the slim image has no curl, and
`podman kube play` runs httpGet probes with curl inside the container.
Standard library only; ignores *_PROXY variables.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def probe_url(path: str, metrics_addr: str | None = None) -> str:
    addr = metrics_addr if metrics_addr is not None else os.environ.get("METRICS_ADDR", ":9090")
    host, _, port = addr.strip().rpartition(":")
    host = host.strip("[]")
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    timeout = float(argv[2]) if len(argv) > 2 else 3.0
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(probe_url(path), timeout=timeout):
            return 0
    except urllib.error.HTTPError as exc:
        body = exc.read(512).decode("utf-8", "replace").strip().replace("\n", "; ")
        print(f"notip-probe {path}: HTTP {exc.code}: {body}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"notip-probe {path}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
