"""CrashTriage: which requests cut off by a server crash go again, and when.

A request can crash the server (a grammar the backend cannot run, an input that breaks a kernel). Sending every
cut-off request again at once would send that one again too, and crash the server again, and again. So after a
crash the requests that were running are suspects: the one sent last (a request-induced crash comes soon after
the request arrives) goes again alone, with every other request waiting, until it finishes or `window` seconds
pass. If the server crashes while it runs alone, it is the cause: it fails with a clear error and is never sent
again. Otherwise the other suspects go together, and traffic flows as before. A request cut off more than
`max_crashes` times fails too (a bound, whatever happens).

A request found to crash the server is remembered (by its content): sent again, by a client that retries or by
another sample of the same group, it fails at once without reaching the server.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False)
class Ticket:
    """One request's history at the gateway."""

    key: bytes = b""  # what it asks for (its content): a request that crashes the server is known by it
    sent_at: float = 0.0
    crashes: int = 0  # server crashes that cut it off
    alone: bool = False  # running alone after a crash
    waiting: bool = field(default=False, repr=False)


class CrashTriage:
    def __init__(self, window: float = 10.0, max_crashes: int = 3, remember: int = 1024) -> None:
        self.window = window
        self.max_crashes = max_crashes
        self.remember = remember
        self._poison: OrderedDict[bytes, str] = OrderedDict()  # requests found to crash the server
        self._suspects: list[Ticket] = []
        self._alone: Ticket | None = None
        self._alone_until = 0.0
        self._isolating = False
        self._changed = asyncio.Event()

    def sent(self, ticket: Ticket) -> None:
        ticket.sent_at = time.monotonic()

    def crashed(self, ticket: Ticket) -> str | None:
        """The server died under `ticket`: why it must not go again, or None (it waits for its turn)."""
        ticket.crashes += 1
        was_alone, ticket.alone = ticket.alone, False
        if self._alone is ticket:
            self._alone = None
            self._notify()
        if was_alone:
            self._isolating = False  # found the cause: the other suspects go together
            why = (
                "it was running alone when the server crashed, after being cut off by an earlier crash: this "
                "request crashes the policy server, so it is not sent again"
            )
            self._poison[ticket.key] = why
            while len(self._poison) > self.remember:
                self._poison.popitem(last=False)
            return why
        if ticket.crashes > self.max_crashes:
            return f"it was cut off by {ticket.crashes} server crashes"
        ticket.waiting = True
        self._suspects.append(ticket)
        self._isolating = True
        return None

    def known_to_crash(self, ticket: Ticket) -> str | None:
        """Why this request must not be sent: the same request crashed the server before."""
        return self._poison.get(ticket.key)

    async def turn(self, ticket: Ticket) -> None:
        """Wait until `ticket` may be sent: while a suspect runs alone, everything else waits."""
        while True:
            if self._alone is not None and time.monotonic() > self._alone_until:
                self._alone.alone = False  # ran long enough without a crash: it goes on with the others
                self._alone = None
                self._isolating = False
            if self._alone is None:
                if not (self._isolating and self._suspects):
                    if ticket.waiting:
                        self._take(ticket)
                    return
                if ticket.waiting and ticket is max(self._suspects, key=lambda t: t.sent_at):
                    self._take(ticket)
                    ticket.alone = True
                    self._alone = ticket
                    self._alone_until = time.monotonic() + self.window
                    return
            self._changed.clear()
            timeout = max(0.0, self._alone_until - time.monotonic()) + 0.01 if self._alone is not None else None
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    def done(self, ticket: Ticket) -> None:
        """The request left the gateway (answered, failed, or given up by its client)."""
        if ticket.waiting:
            self._take(ticket)
        if self._alone is ticket:
            self._alone = None
            self._isolating = False  # the server survived it: the other suspects go together
        ticket.alone = False
        self._notify()

    def _take(self, ticket: Ticket) -> None:
        ticket.waiting = False
        self._suspects.remove(ticket)

    def _notify(self) -> None:
        self._changed.set()
