"""Per-key rate limits and per-tenant quotas (concurrent jobs, stored bytes), answered with 429 + Retry-After.

Rate limit: a token bucket per API key holding a minute's worth of requests (`requests_per_minute`, the
tenant's own value or the server's default; 0 is unlimited), refilled continuously. It is kept as GCRA's
single "theoretical arrival time" per key: in Redis when the broker is Redis (one Lua call, so every API
process shares the bucket), else in this process's memory (the embedded default runs one API process).

Quotas: queued + running jobs per tenant at submission, bytes of models + datasets per tenant at upload.
"""
from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.dbmodels import ACTIVE_STATUSES, Dataset, Job, Model, Tenant
from app.errors import QuotaExceeded, StorageQuotaExceeded, TooManyRequests
from app.settings import Settings
from app.uploads import Quota

# KEYS[1]: the key's bucket; ARGV: now (s), emission interval (s), burst (requests). Returns the seconds to
# wait (0: allowed). The arrival time is stored in microseconds; the key expires once the bucket is full.
_GCRA_LUA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') / 1e6
if tat < now then tat = now end
local wait = tat + interval - now - burst * interval
if wait > 0 then return tostring(wait) end
redis.call('SET', KEYS[1], tostring(math.floor((tat + interval) * 1e6)), 'PX', math.ceil((tat + interval - now) * 1000) + 1000)
return '0'
"""


def effective(tenant_value: int | None, default: int) -> int:
    """A tenant's own limit when set, else the server's; 0 means unlimited."""
    return default if tenant_value is None else tenant_value


@dataclass
class _MemoryBuckets:
    lock: threading.Lock
    arrivals: dict[str, float]


@functools.lru_cache
def _memory() -> _MemoryBuckets:
    return _MemoryBuckets(threading.Lock(), {})


@functools.lru_cache(maxsize=4)
def _redis(url: str):
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return client, client.register_script(_GCRA_LUA)


def _wait_s(bucket: str, per_minute: int, settings: Settings) -> float:
    """Seconds until the bucket lets one more request through (0: it did, and counted it)."""
    interval, burst, now = 60.0 / per_minute, float(per_minute), time.time()
    if settings.celery_broker_url.startswith(("redis://", "rediss://")):
        _client, script = _redis(settings.celery_broker_url)
        return float(script(keys=[f"{settings.queue_prefix}modelpress:ratelimit:{bucket}"],
                            args=[repr(now), repr(interval), repr(burst)]))
    memory = _memory()
    with memory.lock:
        tat = max(memory.arrivals.get(bucket, 0.0), now)
        wait = tat + interval - now - burst * interval
        if wait > 0:
            return wait
        memory.arrivals[bucket] = tat + interval
        return 0.0


def rate_limited(key, settings: Settings) -> bool:
    return effective(key.tenant.requests_per_minute, settings.rate_limit_per_minute) > 0


def check_rate(key, settings: Settings) -> None:
    """`key`: an app.readcache.KeyView."""
    per_minute = effective(key.tenant.requests_per_minute, settings.rate_limit_per_minute)
    if per_minute <= 0:
        return
    wait = _wait_s(key.id, per_minute, settings)
    if wait > 0:
        raise TooManyRequests(f"this API key is limited to {per_minute} requests per minute; retry in "
                              f"{math.ceil(wait)} s", retry_after_s=max(1, math.ceil(wait)), limit_per_minute=per_minute)


def check_concurrent_jobs(db: Session, tenant: Tenant, settings: Settings) -> None:
    """Called with the tenant row locked, so two submissions cannot both take the last slot."""
    limit = effective(tenant.max_concurrent_jobs, settings.max_concurrent_jobs)
    if limit <= 0:
        return
    active = db.execute(select(func.count()).select_from(Job)
                        .where(Job.tenant_id == tenant.id, Job.status.in_(ACTIVE_STATUSES))).scalar_one()
    if active >= limit:
        raise QuotaExceeded(f"the tenant has {active} queued or running job(s), its limit is {limit}; submit again "
                            "when one finishes (or cancel one)", retry_after_s=settings.quota_retry_after_s,
                            limit=limit, active=active)


def stored_bytes(db: Session, tenant_id: str) -> int:
    """Bytes of the tenant's models and datasets (each upload counted, as the tenant sees them)."""
    return sum(int(db.scalar(select(func.coalesce(func.sum(table.size_bytes), 0))
                             .where(table.tenant_id == tenant_id)) or 0) for table in (Model, Dataset))


def upload_quota(db: Session, tenant, settings: Settings, *, adding: int = 0) -> Quota | None:
    """What the tenant may still upload (None: unlimited). A 429 when not even `adding` more bytes fit."""
    limit = effective(tenant.max_stored_bytes, settings.max_stored_bytes)
    if limit <= 0:
        return None
    used = stored_bytes(db, tenant.id)

    def error(size: int) -> StorageQuotaExceeded:
        adds = f" and this upload adds {size}" if size else ""
        return StorageQuotaExceeded(
            f"the tenant stores {used} bytes of models and datasets{adds}; its quota is {limit} bytes: delete "
            "some and retry", retry_after_s=settings.quota_retry_after_s, limit_bytes=limit, used_bytes=used)

    if used + max(adding, 1) > limit:
        raise error(adding)
    return Quota(left_bytes=limit - used, error=error)


def check_upload_fits(db: Session, tenant_id: str, settings: Settings, size: int) -> None:
    """Once the upload is stored: it still fits, with the tenant row locked until the commit that keeps it
    (two concurrent uploads cannot both take the last bytes; app.blobs.keep_upload calls it after the blob is
    in place, so the lock is not held while the bytes travel)."""
    tenant = db.get(Tenant, tenant_id, with_for_update=True)
    upload_quota(db, tenant, settings, adding=size)
