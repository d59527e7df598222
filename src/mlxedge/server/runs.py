"""Running one engine request from an HTTP handler: start it (errors become HTTP statuses), stream or collect
its events, and cancel it the moment the client goes away."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import List, Optional

from fastapi import Request as HttpRequest

from ..engine import Engine, Event, Request
from .errors import ApiError


@dataclass
class Started:
    handle: object
    events: object            # async iterator of engine Events, positioned after the first progress event


@dataclass
class Collected:
    text: str = ""
    logprobs: List[dict] = field(default_factory=list)
    done: Optional[Event] = None


async def start(engine: Engine, request: Request) -> Started:
    """Submit and wait until the request is admitted (first progress event), so that a refusal
    (unknown model, over budget, busy, bad arguments) is still an HTTP error status, not a broken stream."""
    engine.registry.source_of(request.model)  # unknown model: 404 before anything is queued
    handle = engine.submit(request, loop=asyncio.get_running_loop())
    events = handle.__aiter__()
    try:
        first = await events.__anext__()
    except BaseException:
        handle.cancel()
        raise
    if first.kind == "error":
        raise ApiError(first.code, first.message)
    return Started(handle=handle, events=events)


async def _watch_disconnect(http: HttpRequest, handle) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def collect(started: Started, http: HttpRequest) -> Collected:
    """Every event to the end (non-streaming responses); a client that hangs up cancels the generation."""
    watcher = asyncio.ensure_future(_watch_disconnect(http, started.handle))
    out = Collected()
    parts = []
    try:
        async for event in started.events:
            if event.kind == "delta":
                parts.append(event.text)
                if event.logprob is not None:
                    out.logprobs.append(event.logprob)
            elif event.kind == "error":
                raise ApiError(event.code, event.message)
            elif event.kind == "done":
                out.done = event
    finally:
        watcher.cancel()
        started.handle.cancel()  # no-op when finished; stops generation if this handler is cancelled
    out.text = "".join(parts)
    return out


async def events(started: Started):
    """The remaining events for a streaming response; closing it (client gone) cancels the generation."""
    try:
        async for event in started.events:
            yield event
    finally:
        started.handle.cancel()


def usage(stats: dict) -> dict:
    prompt = int(stats.get("prompt_tokens", 0))
    completion = int(stats.get("generation_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(stats.get("cached_tokens", 0))}}
