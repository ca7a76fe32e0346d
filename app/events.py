"""Job-end events for long polls that hold no thread and poll nothing.

Workers publish a job's id on the channel `contract.results.channel` once its end is stored (finished,
failed, stopped); the API does when it cancels a queued job. Each API process keeps one subscription
(redis.asyncio) and wakes the requests waiting on that id. While the subscription is down (Redis
restarting) waits simply run to their deadline; on every (re)connect all waiters are woken to read
again, so an end published meanwhile is never missed for longer than the outage. `drop:<name>` tells
every API process to forget a deleted result it keeps parsed (app/jobs.py: Results); after an outage
each process forgets them all. Listeners (`listen`: the webhooks) hear each job's end too, and None after
every (re)connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from contract.results import channel
from contract.settings import Settings

log = logging.getLogger("app.events")


class Events:
    def __init__(self, settings: Settings, results=None):
        self.settings, self.results = settings, results
        self.channel = channel(settings)
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task | None = None
        self._listeners: list[Callable[[str | None], None]] = []
        self._stopping = False

    def listen(self, callback: Callable[[str | None], None]) -> None:
        """`callback(key)` on the event loop when job `key` ends; `callback(None)` after each (re)connect."""
        self._listeners.append(callback)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        """End the subscription. redis-py's PubSub.listen() can swallow a cancel (seen: about one shutdown
        in 500 waited forever on it), so the cancel is repeated until the task has ended."""
        self._stopping = True
        while self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=0.5)

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Event]:
        """An event set when job `key` ends (or the subscription reconnects), for the duration of a wait."""
        event = asyncio.Event()
        self._waiting.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._waiting.get(key, set())
            waiting.discard(event)
            if not waiting:
                self._waiting.pop(key, None)

    def _wake(self, keys) -> None:
        for key in keys:
            for event in self._waiting.get(key, ()):
                event.set()

    async def _listen(self) -> None:
        delay = 0.1
        while not self._stopping:
            client = aioredis.Redis.from_url(
                self.settings.redis_url, socket_connect_timeout=self.settings.redis_timeout_s
            )
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self._wake(list(self._waiting))  # whatever ended while we were not listening is read again
                    for callback in self._listeners:
                        callback(None)
                    if self.results is not None:  # and what was deleted meanwhile is forgotten
                        for name in list(self.results.items):
                            self.results.drop(name)
                    delay = 0.1
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        data = message["data"].decode()
                        if data.startswith("drop:") and self.results is not None:
                            self.results.drop(data.removeprefix("drop:"))
                        else:
                            self._wake([data])
                            for callback in self._listeners:
                                callback(data)
            except (RedisError, OSError) as exc:
                log.warning("job events: subscription lost (%s); reconnecting in %.1f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)
            finally:
                await client.aclose()
