"""What a governed call hands the engine: the call as the budgets see it, and how long a call
refused while the ledger refuses writes is told to wait. Below ``engine.engine`` and the
integrations (the governor builds a ``CallRequest``), so neither has to import the other."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

RETRY_AFTER_S = 2  # what a call refused meanwhile is told to wait (Retry-After)


@dataclass(frozen=True, slots=True)
class CallRequest:
    """A model call about to be made, as the budgets see it."""

    principal: str
    model: str
    provider: str = ""
    team: str = ""
    workspace: str = "default"
    token_id: str = ""
    session: str = ""
    agent: str = ""
    input_tokens: int = 0
    max_tokens: int | None = None
    request_id: str = field(default_factory=lambda: "req_" + secrets.token_hex(8))
    choices: int = 1  # the request's n: each choice may use all of the output

    def context(self) -> dict[str, str]:
        return {"workspace": self.workspace, "team": self.team, "principal": self.principal,
                "token": self.token_id, "session": self.session, "agent": self.agent,
                "provider": self.provider, "model": self.model}
