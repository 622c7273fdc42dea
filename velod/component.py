"""The component model: every capability the daemon hosts is a Component.

The daemon builds each component with a :class:`Context`, calls ``start()`` once,
``reconfigure(config)`` on every accepted config reload, ``status()`` whenever a
client asks, and ``stop()`` at shutdown. Components talk to each other only
through the bus (events), never through each other's internals. A component's control
methods are the ``@rpc`` functions of its capability's ``rpc`` module
(``velod.capabilities``), which call the component's verbs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from velod.bus import Bus
    from velod.config import Config


class ReconfigureRefused(Exception):
    """A component cannot take a new config now; the message says why (shown in status)."""


@dataclass
class Context:
    """What the daemon hands every component at construction."""

    config: Config
    bus: Bus
    state_dir: Path
    log: logging.Logger
    # Called as (component, old state, new state) after each change of state.
    on_state_change: Callable[[Component, str, str], None] | None = None
    # The components built before this one, by name: what a front end (HTTP) serves.
    services: dict[str, Component] = field(default_factory=dict)


TROUBLE = ("degraded", "failed")


class Component:
    """Base class with the lifecycle every component implements.

    Subclasses set ``name`` and override what they need. ``state`` is one of
    ``created``, ``starting``, ``running``, ``degraded``, ``stopping``,
    ``stopped``, ``failed`` and is reported by ``velodctl status``. Every change of
    ``state`` is logged here (a warning with ``error`` when it degrades or fails, info
    when it recovers) and reported to ``ctx.on_state_change``, so no subclass has to.
    """

    name: str = "component"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.log = ctx.log.getChild(self.name)
        self._state = "created"
        self._reported = "created"  # the state last logged and reported
        self._report_pending = False
        self.error: str | None = None

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, new: str) -> None:
        self._state = new
        if self._report_pending:
            return
        # Subclasses write `self.state, self.error = "degraded", why`: the state is set
        # before the error, so report once the statement is done, not inside it.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._report_state()
            return
        self._report_pending = True
        loop.call_soon(self._report_state)

    def _report_state(self) -> None:
        self._report_pending = False
        old, new = self._reported, self._state
        if old == new:
            return
        self._reported = new
        if new in TROUBLE:
            self.log.warning("%s: %s", new, self.error or "no reason given")
        elif old in TROUBLE and new == "running":
            self.log.info("recovered: running again (was %s)", old)
        else:
            self.log.debug("%s (was %s)", new, old)
        if self.ctx.on_state_change is not None:
            try:
                self.ctx.on_state_change(self, old, new)
            except Exception:
                self.log.exception("state change callback failed")

    async def start(self) -> None:
        """Start background work; must return promptly (spawn tasks, do not block)."""
        self.state = "running"

    async def stop(self) -> None:
        """Stop background work and release resources; must finish within a second or two."""
        self.state = "stopped"

    async def reconfigure(self, config: Config) -> None:
        """Adopt a new, already validated config, or raise ReconfigureRefused."""
        self.config = config

    def status(self) -> dict[str, Any]:
        """A small map for ``system.status``; always has ``state`` and ``error``."""
        return {"state": self.state, "error": self.error}


class Unavailable(Component):
    """Stands in for a component that could not even be created: failed, with the reason."""

    def __init__(self, ctx: Context, name: str, error: str) -> None:
        self.name = name
        super().__init__(ctx)
        self.error = error
        self.state = "failed"

    async def start(self) -> None:
        """Nothing to start: it stays failed until velod restarts."""
        self.state = "failed"

    async def stop(self) -> None:
        """Nothing to stop."""
