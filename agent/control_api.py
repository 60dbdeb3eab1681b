"""The daemon's control-socket commands (what ``cabinetctl`` calls when the daemon runs).

Every reply is metadata only: no event contents, no pseudonyms, never a raw badge id.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from agent.control.server import ControlServer, RequestContext

if TYPE_CHECKING:
    from agent.daemon import Daemon

logger = logging.getLogger(__name__)


def register_handlers(server: ControlServer, daemon: Daemon) -> None:
    """Register every command on ``server``."""
    app = daemon.app

    async def status(ctx: RequestContext) -> Any:
        result = app.status()
        if app.store is not None:
            st = await app.store.stats()
            result["outbox"] = {
                "depth": st.depth,
                "bytes": st.bytes,
                "oldest_age_s": st.oldest_age_s,
                "dead": st.dead,
                "next_seq": st.next_seq,
                "disk_full": st.disk_full,
            }
        pub = app.publisher
        result["broker"] = (
            None
            if pub is None
            else {
                "connected": bool(getattr(pub.stats, "connected", False)),
                "published": getattr(pub.stats, "published", 0),
                "acked": getattr(pub.stats, "acked", 0),
                "reconnects": getattr(pub.stats, "reconnects", 0),
            }
        )
        result["reloads"] = daemon.reloads
        return result

    async def queue_stats(ctx: RequestContext) -> Any:
        assert app.store is not None
        st = await app.store.stats()
        return {
            "depth": st.depth,
            "bytes": st.bytes,
            "oldest_age_s": st.oldest_age_s,
            "dead": st.dead,
            "next_seq": st.next_seq,
            "dropped": {str(k): v for k, v in st.dropped.items()},
            "disk_full": st.disk_full,
        }

    server.register("status", status)
    server.register("queue.stats", queue_stats)
