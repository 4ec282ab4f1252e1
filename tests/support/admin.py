"""Reading the admin API in tests; every wait is bounded."""
from __future__ import annotations

import asyncio
import time

import httpx

KEY = {"X-API-Key": "test-admin-key"}


async def admin_get(stack, path: str) -> dict:
    async with httpx.AsyncClient(base_url=stack.http_url, headers=KEY, timeout=10) as client:
        response = await client.get(path)
        response.raise_for_status()
        return response.json()


async def wait_clean(stack, conversation_id: str, timeout: float = 5.0) -> tuple[float, dict]:
    """Poll /admin/conversations/{id} until nothing is held; returns (seconds taken, last answer)."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while True:
            state = await admin_get(stack, f"/admin/conversations/{conversation_id}")
            held = any(v for w in state["workers"] for v in w["holds"].values())
            if not state["connected"] and not held and len(state["redis_keys"]) <= 1:
                return time.monotonic() - started, state
            await asyncio.sleep(0.01)
