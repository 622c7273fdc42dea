"""The component model: every capability the daemon hosts is a Component.

The daemon builds each component with a :class:`Context`, calls ``start()`` once,
``reconfigure(config)`` on every accepted config reload, ``status()`` whenever a
client asks, and ``stop()`` at shutdown. Components talk to each other only
through the bus (events), never through each other's internals. A component's control
methods are the ``@rpc`` functions of its capability's ``rpc`` module
(``velod.capabilities``), which call the component's verbs.
"""

from __future__ import annotations

import logging
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
    # The components built before this one, by name: what a front end (HTTP) serves.
    services: dict[str, Component] = field(default_factory=dict)


class Component:
    """Base class with the lifecycle every component implements.

    Subclasses set ``name`` and override what they need. ``state`` is one of
    ``created``, ``starting``, ``running``, ``degraded``, ``stopping``,
    ``stopped``, ``failed`` and is reported by ``velodctl status``.
    """

    name: str = "component"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.log = ctx.log.getChild(self.name)
        self.state = "created"
        self.error: str | None = None

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
