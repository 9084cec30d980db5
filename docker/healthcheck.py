"""Container health check: exit 0 when the process answers HTTP on its health URL.

The images hold no curl (nothing beyond the service in the final layer), so the
HEALTHCHECK runs this with the image's own Python. The URL comes from
``RBSTREAM_HEALTHCHECK_URL``: the API's ``/healthz`` by default, the consumer's
metrics endpoint when the container runs ``rbstream consume``.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("RBSTREAM_HEALTHCHECK_URL", "http://127.0.0.1:8000/healthz")


def main() -> int:
    try:
        with urllib.request.urlopen(URL, timeout=3) as response:  # noqa: S310 - a fixed local URL
            return 0 if response.status < 400 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {URL}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
