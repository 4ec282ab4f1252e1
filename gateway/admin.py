"""Admin routes (docs/protocol.md §3): pools, stats, workers and conversations, behind X-API-Key.

Workers and conversations are asked live of every worker over the bus; a live worker (by its
heartbeat) that does not answer within `INTROSPECT_TIMEOUT_S` is listed with `responding: false`."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, HTTPException, Request

from gateway.auth import api_key_valid
from gateway.hub import Gateway
from shared.bus import pool_stats
from shared.logging import redact_url


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


def require_api_key(request: Request) -> None:
    """Constant-time over bytes (gateway/auth.py), so a non-ASCII key is a 401, not a 500."""
    if not api_key_valid(request.headers.get("x-api-key", ""), gateway_of(request).settings.api_keys):
        raise HTTPException(status_code=401, detail="missing or invalid X-API-Key")


router = APIRouter(prefix="/admin", dependencies=[Depends(require_api_key)])


def _stage_of(gateway: Gateway, worker_id: str) -> str | None:
    return next((w.stage for found in gateway.directory.workers.values() for w in found if w.worker_id == worker_id), None)


@router.get("/resources/pools")
async def pools(request: Request) -> dict:
    gateway = gateway_of(request)
    replies, silent = await gateway.introspect()
    return {
        "redis": {**pool_stats(gateway.redis), "url": redact_url(gateway.settings.redis_url_or_default)},
        "workers": [{"worker_id": r.worker_id, "stage": r.stage, **r.pools} for r in replies]
        + [{"worker_id": wid, "stage": _stage_of(gateway, wid), "responding": False} for wid in silent],
    }


@router.get("/resources/stats")
async def stats(request: Request) -> dict:
    gateway = gateway_of(request)
    s = gateway.stats
    workers = [w for found in gateway.directory.workers.values() for w in found]
    return {
        "connections": {
            "current": s.current,
            "peak": s.peak,
            "total": s.total,
            "rejected": s.rejected,
            "rejected_by": s.rejected_by,
            "closed_slow": s.closed_slow,
            "closed_rate_limited": s.closed_rate_limited,
        },
        "rate_limited_frames": s.rate_limited_frames,
        "connection_limit": {
            "max_per_client": gateway.limits.limit,
            "slots_held": gateway.limits.held,
        },
        "disconnect_events": {"published": s.published, "publish_failures": s.publish_failures, "by_reason": s.reasons},
        "stale_cleanup": {
            "gateway_sweeps": s.stale_sweeps,
            "gateway_events_published": s.stale_cleaned,
            "last_sweep_ms": s.last_stale_sweep_ms,
            "worker_conversations_cleaned": sum(int(w.stats.get("stale_cleaned", 0)) for w in workers),
            "connection_slot_sweeps": gateway.limits.sweeps,
            "connection_slots_repaired": gateway.limits.repaired,
        },
        "last_shutdown_cleanup": s.last_shutdown_cleanup,
        "rerouting": {"rerouted": 0, "turns_failed": 0, "turns_unavailable": 0, **gateway.rerouter.stats},
        "latency": gateway.latency.summary(),
        "bus": {**gateway.bus_stats.summary(), "loop_restarts": dict(gateway.loop_restarts)},
        "uptime_s": round(time.monotonic() - gateway.started, 1),
    }


@router.post("/resources/latency/reset")
async def reset_latency(request: Request) -> dict:
    """Start a new latency sample (a benchmark resets it once its load is steady)."""
    gateway_of(request).latency.reset()
    return {"status": "reset"}


@router.get("/workers")
async def workers(request: Request) -> dict:
    gateway = gateway_of(request)
    replies, silent = await gateway.introspect()
    known = {w.worker_id: w for found in gateway.directory.workers.values() for w in found}
    listed = [
        {
            "worker_id": r.worker_id,
            "stage": r.stage,
            "last_heartbeat_ms": r.last_heartbeat_ms,
            "conversations": r.conversations,
            "resources": r.resources,
            "stats": r.stats,
            "draining": known[r.worker_id].draining if r.worker_id in known else False,
            "responding": True,
        }
        for r in sorted(replies, key=lambda r: (r.stage, r.worker_id))
    ]
    for wid in silent:
        w = known[wid]
        listed.append(
            {
                "worker_id": wid,
                "stage": w.stage,
                "last_heartbeat_ms": w.last_heartbeat_ms,
                "conversations": w.conversations,
                "resources": w.resources,
                "draining": w.draining,
                "responding": False,
            }
        )
    return {"workers": listed}


@router.get("/conversations/{conversation_id}")
async def conversation(conversation_id: str, request: Request) -> dict:
    gateway = gateway_of(request)
    replies, silent = await gateway.introspect(conversation_id)
    pattern = gateway.names.conversation_keys_pattern(conversation_id)
    keys = [k.decode() async for k in gateway.redis.scan_iter(match=pattern, count=1000)]
    connected = bool(await gateway.redis.exists(gateway.names.conversation(conversation_id)))
    keys = sorted(keys + ([gateway.names.conversation(conversation_id)] if connected else []))
    return {
        "conversation_id": conversation_id,
        "connected": connected,
        "workers": [
            {"worker_id": r.worker_id, "stage": r.stage, "holds": r.holds or {}, "cleaned_ms": r.cleaned_ms}
            for r in sorted(replies, key=lambda r: (r.stage, r.worker_id))
        ]
        + [{"worker_id": wid, "stage": _stage_of(gateway, wid), "holds": {}, "responding": False} for wid in silent],
        "redis_keys": keys,
    }
