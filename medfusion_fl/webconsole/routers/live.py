"""WS /api/runs/{run_id}/live: a run's rounds, all of them first, then each new one as it is written.

The socket asks the run's shared Tail (tails.py) for news every POLL_S (a finished round reaches an open
page well within 2 s). The first message is `{"type": "reset", "summaries": [...], "details": [...]}`:
the newest rounds' curve points and per-site details (views.py), then `{"type": "history", ...}` with the
older curve points when there are any; then
`{"type": "lines", ...}` with each new round; a reset again when the file was rewritten (a resume moved
lines aside); a folder that disappears gives `{"type": "missing"}` and the socket keeps watching.
Authentication is the session cookie; the Origin must be the console's own (no cross-site socket rides the
cookie).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from medfusion_fl.webconsole.auth import COOKIE, find_session
from medfusion_fl.webconsole.db import RunRow
from medfusion_fl.webconsole.index import index_runs

router = APIRouter(tags=["live"])
POLL_S = 0.25


def _allowed(websocket: WebSocket, run_id: str) -> str | None:
    """The run's folder, or None when the socket must be refused."""
    origin = websocket.headers.get("origin")
    host = websocket.headers.get("host", "")
    scheme = "https" if websocket.app.state.secure_cookies else "http"  # the console's own: TLS or not
    if origin is not None and origin != f"{scheme}://{host}":
        return None
    with websocket.app.state.sessions() as db:
        if find_session(db, websocket.cookies.get(COOKIE)) is None:
            return None
        row = db.get(RunRow, run_id)
        if row is None:  # a run made since the last listing (the page opens its socket first)
            index_runs(db, websocket.app.state.runs_dir)
            row = db.get(RunRow, run_id)
        return row.folder if row is not None else None


@router.websocket("/api/runs/{run_id}/live")
async def live(websocket: WebSocket, run_id: str) -> None:
    folder = await asyncio.to_thread(_allowed, websocket, run_id)  # the database, off the event loop
    await websocket.accept()  # then closed with a reason the page shows, rather than a failed handshake
    if folder is None:
        await websocket.close(code=4401, reason="log in first, from the console's own pages, to a known run")
        return
    tail = websocket.app.state.tails.get(folder)
    version, count, missing = -1, 0, False
    try:
        while True:
            if not Path(folder).is_dir():
                if not missing:
                    await websocket.send_json({"type": "missing", "folder": folder})
                missing = True
            else:
                missing = False
                await asyncio.to_thread(tail.refresh)
                news = tail.since(version, count) if version >= 0 else None
                if news is None:
                    version, count, opening, history = tail.reset_message()
                    await websocket.send_text(opening)
                    if history:
                        await websocket.send_text(history)
                elif news["summaries"]:
                    await websocket.send_json(news)
                    count += len(news["summaries"])
            try:  # wait for the next poll, noticing a page that went away (its socket task must end)
                message = await asyncio.wait_for(websocket.receive(), timeout=POLL_S)
            except TimeoutError:
                continue
            if message["type"] == "websocket.disconnect":
                return
    except WebSocketDisconnect:
        return
