"""``python -m bench viewer [--json]``: the browser viewer in real Chromium.

Placeholder: the benchmark itself follows below the Chromium helpers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

#: the system Chromium (Debian's package); Playwright's own download is not reachable
CHROMIUM = "/usr/bin/chromium"
#: launch flags: headless, no sandbox (root in CI), nothing that talks to the internet
CHROMIUM_ARGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: headless Chromium hides host ICE candidates behind mDNS names without this
NO_MDNS = "--disable-features=WebRtcHideLocalIpsWithMdns"


def chromium_unavailable() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright==1.65.2)"
    return None


def launch(pw: Any, *, executable: str = CHROMIUM, extra: Sequence[str] = ()) -> Any:
    """A headless system Chromium (``pw``: a started sync or async Playwright)."""
    return pw.chromium.launch(executable_path=executable, args=[*CHROMIUM_ARGS, *extra])
