"""Webhooks: a request's `webhook` gets the job's final view, signed, once the job ends.

    fi:handle:H     its `webhook` field: {url, secret} (JSON), set at POST
    fi:hooks:K      the handles of computation K that wait for a delivery
    fi:hooked:H     the claim of the API process that delivers H's (SET NX: one delivery per handle)

Every API process hears each job's end (app/events.py) and, for each waiting handle whose job has ended,
claims its delivery and POSTs the view as GET would answer it (X-Attribution-Signature:
contract/webhooks.py). A failed try (transport error, timeout, an answer other than 2xx) is retried 1, 2,
4, 8 and 16 s later (ATTR_WEBHOOK_ATTEMPTS in all); then the delivery is dropped with a log line. A POST
that joins a job that has already ended is delivered at once; after an outage of the event subscription
(or a restart) every waiting handle is looked at again. A delivery in flight when its API process dies is
lost: delivery is at most once per handle, and `GET .../events` or a long poll is the reliable path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from contract.problems import InvalidInput, ServiceError
from contract.schemas import ENDED, Webhook
from contract.settings import Settings
from contract.webhooks import HEADER, sign

log = logging.getLogger("app.webhooks")


def check(hook: Webhook, settings: Settings) -> None:
    """Refuse (422) a webhook the operator has not allowed: the service must not be a way to reach arbitrary
    hosts and ports on its network. An ATTR_WEBHOOK_HOSTS entry is a host (any port), `host:port` (that port)
    or `*`; the service's own Redis is never a target, whatever the list says."""
    url = urlsplit(hook.url)
    try:
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput("webhook url: not a valid port", [{"loc": ["body", "webhook", "url"]}]) from None
    redis = urlsplit(settings.redis_url)
    allowed = {"*", host, f"{host}:{port}"} & set(settings.webhook_hosts)
    if not allowed or (host, port) == (redis.hostname, redis.port or 6379):
        raise InvalidInput(
            f"webhook target {host}:{port} is not allowed (ATTR_WEBHOOK_HOSTS: {', '.join(settings.webhook_hosts)})",
            [{"loc": ["body", "webhook", "url"]}],
        )


# A handle's webhook and its job's status and encoded view, or None where the handle has no webhook (expired
# or deleted): what delivery needs of the jobs (app.jobs.Jobs.hooked), and nothing else.
Hooked = Callable[[str], Awaitable[tuple[Webhook, str, bytes] | None]]


class Webhooks:
    def __init__(self, settings: Settings, aredis: aioredis.Redis, hooked: Hooked):
        self.settings, self.aredis, self.key, self.hooked = settings, aredis, settings.key, hooked
        self.tasks: set[asyncio.Task] = set()  # deliveries in flight (kept referenced until done)

    async def register(self, handle: str, key: str, hook: Webhook) -> None:
        """Handle H of computation K is to be called back; delivered at once when K has already ended."""
        async with self.aredis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key("handle", handle), "webhook", hook.model_dump_json()).delete(self.key("hooked", handle))
            pipe.sadd(self.key("hooks", key), handle).expire(self.key("hooks", key), self.settings.score_ttl_s)
            await pipe.execute()
        self.ended(key)

    def ended(self, key: str | None) -> None:
        """Computation `key` has ended (None: anything may have, while events were not heard)."""
        self._spawn(self._deliver(key) if key is not None else self._sweep())

    async def _sweep(self) -> None:
        try:
            keys = [
                name.decode().rsplit(":", 1)[-1] async for name in self.aredis.scan_iter(match=self.key("hooks", "*"))
            ]
        except RedisError as exc:  # the next (re)connect sweeps again
            log.warning("webhooks: cannot list the waiting ones: %s", exc)
            return
        for key in keys:
            await self._deliver(key)

    async def _deliver(self, key: str) -> None:
        try:
            for raw in await self.aredis.smembers(self.key("hooks", key)):
                handle = raw.decode()
                found = await self.hooked(handle)
                if found is None:
                    await self.aredis.srem(self.key("hooks", key), handle)  # the handle expired or was deleted
                    continue
                hook, status, body = found
                if status not in ENDED:
                    continue
                if not await self.aredis.set(self.key("hooked", handle), "1", nx=True, ex=self.settings.score_ttl_s):
                    continue  # another API process delivers it
                await self.aredis.srem(self.key("hooks", key), handle)
                self._spawn(self._send(handle, hook, body))
        except (RedisError, ServiceError) as exc:  # the next end event, or a sweep after reconnecting, tries again
            log.warning("webhooks of %s: %s", key, exc)

    async def _send(self, handle: str, hook: Webhook, body: bytes) -> None:
        headers = {"Content-Type": "application/json", "X-Attribution-Job": handle}
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, follow_redirects=False) as client:
            for attempt in range(self.settings.webhook_attempts):
                if attempt:
                    await asyncio.sleep(2 ** (attempt - 1))
                try:
                    answer = await client.post(
                        hook.url, content=body, headers={**headers, HEADER: sign(hook.secret, body)}
                    )
                    if answer.is_success:
                        return
                    why = f"answered {answer.status_code}"
                except httpx.HTTPError as exc:
                    why = type(exc).__name__
                log.info("webhook of %s, try %d: %s", handle, attempt + 1, why)
        log.warning("webhook of %s dropped after %d tries", handle, self.settings.webhook_attempts)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        """Cancel what is in flight (repeatedly, as Events.stop: a cancel can be lost in the Redis client)."""
        while pending := {task for task in self.tasks if not task.done()}:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.5)
