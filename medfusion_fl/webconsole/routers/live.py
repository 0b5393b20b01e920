"""WS /api/runs/{run_id}/live: a run's metrics lines, all of them first, then each new one as it is written.

The socket polls the run's metrics.jsonl (every 0.25 s: a finished round reaches an open page well within
2 s) and sends `{"type": "lines", "lines": [...]}` with the new lines; if the file shrank (a resume moved
lines aside) it sends `{"type": "reset", ...}` with all of them; a folder that disappears gives
`{"type": "missing"}` and the socket keeps watching. Authentication is the session cookie; the Origin must
be the console's own (no cross-site socket rides the cookie).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from medfusion_fl.webconsole.auth import COOKIE, find_session
from medfusion_fl.webconsole.db import RunRow
from medfusion_fl.webconsole.index import read_lines

router = APIRouter(tags=["live"])
POLL_S = 0.25


def _allowed(websocket: WebSocket, run_id: str) -> str | None:
    """The run's folder, or None when the socket must be refused."""
    origin = websocket.headers.get("origin")
    host = websocket.headers.get("host", "")
    if origin is not None and origin.split("://", 1)[-1] != host:
        return None
    with websocket.app.state.sessions() as db:
        if find_session(db, websocket.cookies.get(COOKIE)) is None:
            return None
        row = db.get(RunRow, run_id)
        return row.folder if row is not None else None


@router.websocket("/api/runs/{run_id}/live")
async def live(websocket: WebSocket, run_id: str) -> None:
    folder = _allowed(websocket, run_id)
    if folder is None:
        await websocket.close(code=4401, reason="log in first, from the console's own pages, to a known run")
        return
    await websocket.accept()
    sent, missing = -1, False
    try:
        while True:
            path = Path(folder)
            if not path.is_dir():
                if not missing:
                    await websocket.send_json({"type": "missing", "folder": folder})
                missing = True
            else:
                missing = False
                lines, problems = await asyncio.to_thread(read_lines, path)
                if sent < 0 or len(lines) < sent:
                    await websocket.send_json({"type": "reset", "lines": lines, "problems": problems})
                    sent = len(lines)
                elif len(lines) > sent:
                    await websocket.send_json({"type": "lines", "lines": lines[sent:], "problems": problems})
                    sent = len(lines)
            try:  # wait for the next poll, noticing a page that went away (its socket task must end)
                message = await asyncio.wait_for(websocket.receive(), timeout=POLL_S)
            except TimeoutError:
                continue
            if message["type"] == "websocket.disconnect":
                return
    except WebSocketDisconnect:
        return
