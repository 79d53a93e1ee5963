"""Who may do what: roles, the one permission matrix, and workspace members.

A ledger with no members is a single-user ledger: whoever runs Budgeteer on it may do
everything (that is how a fresh install and the demo work). The first member added must
be an owner; from then on every action of the dashboard and the command line is checked
against the matrix for the operator's identity: on SQLite the local identity
(``BUDGETEER_USER``, else the login name), on PostgreSQL the database role connected as,
who must then be the first owner themselves (``set_member``'s ``verified``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from engine.errors import Refused
from engine.models import FieldError

if TYPE_CHECKING:
    from engine.ledger import LedgerView

Role = Literal["owner", "admin", "operator", "viewer"]
ROLES: Final[tuple[Role, ...]] = ("owner", "admin", "operator", "viewer")

Permission = Literal["read_usage", "import_usage", "ack_alerts", "request_overrides", "approve_overrides",
                     "edit_policies", "manage_prices", "manage_alerts", "manage_tokens", "manage_providers",
                     "manage_vault", "manage_members"]
PERMISSIONS: Final[tuple[Permission, ...]] = (
    "read_usage", "import_usage", "ack_alerts", "request_overrides", "approve_overrides", "edit_policies",
    "manage_prices", "manage_alerts", "manage_tokens", "manage_providers", "manage_vault", "manage_members")

#: The permission matrix, the only place it is written down. An operator is the one on call:
#: acknowledges alerts, decides override requests, asks for headroom and imports usage, but
#: changes nothing that decides what a call costs or may spend (policies, prices, providers),
#: where alerts go, or who may do what.
MATRIX: Final[dict[Role, frozenset[Permission]]] = {
    "owner": frozenset(PERMISSIONS),
    "admin": frozenset(PERMISSIONS),
    "operator": frozenset({"read_usage", "import_usage", "ack_alerts", "request_overrides", "approve_overrides"}),
    "viewer": frozenset({"read_usage"}),
}
DEFAULT_WORKSPACE: Final = "default"


class AccessDenied(Refused):
    """An action the identity's role does not allow; the message names what is missing."""

    code = "permission_denied"

    def __init__(self, user: str, role: str | None, permission: str, detail: str = "") -> None:
        who = f"{user} ({role})" if role else f"{user} (not a member)"
        super().__init__(detail or f"{who} lacks the {permission} permission")
        self.user, self.role, self.permission = user, role, permission


@dataclass(frozen=True, slots=True)
class Member:
    workspace: str
    user: str
    role: Role
    added_ms: int
    added_by: str

    def as_dict(self) -> dict[str, object]:
        return {"workspace": self.workspace, "user": self.user, "role": self.role, "added_ms": self.added_ms,
                "added_by": self.added_by}


def allowed(role: Role | None, permission: Permission) -> bool:
    return role is not None and permission in MATRIX[role]


def parse_role(text: str) -> Role:
    role = (text or "").strip().lower()
    if role not in ROLES:
        raise FieldError("role", f"must be one of {', '.join(ROLES)} (got {text!r})")
    return role


def members(ledger: LedgerView, workspace: str = DEFAULT_WORKSPACE) -> list[Member]:
    return ledger.members.listing(workspace)


def role_of(ledger: LedgerView, user: str, workspace: str = DEFAULT_WORKSPACE) -> Role | None:
    return ledger.members.role_of(user, workspace)


def single_user(ledger: LedgerView) -> bool:
    return ledger.members.none()


def require(ledger: LedgerView, user: str, permission: Permission, workspace: str = DEFAULT_WORKSPACE) -> None:
    """Raise AccessDenied unless ``user`` may do ``permission`` (always allowed on a ledger with no members)."""
    if single_user(ledger):
        return
    role = role_of(ledger, user, workspace)
    if not allowed(role, permission):
        raise AccessDenied(user, role, permission)


def set_member(ledger: LedgerView, actor: str, user: str, role: Role, now_ms: int,
               workspace: str = DEFAULT_WORKSPACE, *, verified: bool = False) -> tuple[Member | None, Member]:
    """Add a member or change a role; returns (before, after). The caller has checked
    manage_members; besides, only owners make owners, the first member is an owner, and the
    last owner is never demoted. ``verified``: the actor is an identity the server checked (a
    PostgreSQL role), which cannot act as anyone else: the first owner must then be the actor
    (a first owner named otherwise, or misspelt, would lock the actor out, perhaps everyone)."""
    user = user.strip()
    if not user:
        raise FieldError("user", "is empty")
    first = single_user(ledger)
    if first and role != "owner":
        raise FieldError("role", "the first member must be an owner (otherwise nobody could manage members)")
    if first and verified and user != actor:
        raise FieldError("user", f"the first owner must be you, {actor} (the database role you connect as): "
                                 f"you could not act as {user} afterwards; add yourself first, then {user}")
    if not first and role == "owner" and role_of(ledger, actor, workspace) != "owner":
        raise AccessDenied(actor, role_of(ledger, actor, workspace), "manage_members",
                           f"only an owner can make {user} an owner")
    before = next((m for m in members(ledger, workspace) if m.user == user), None)
    if before is not None and before.role == "owner" and role != "owner":
        if role_of(ledger, actor, workspace) != "owner":
            raise AccessDenied(actor, role_of(ledger, actor, workspace), "manage_members",
                               f"only an owner can change the role of the owner {user}")
        _keep_an_owner(ledger, workspace, user)
    ledger.members.put(workspace, user, role, now_ms, actor)
    after = next(m for m in members(ledger, workspace) if m.user == user)
    return before, after


def remove_member(ledger: LedgerView, actor: str, user: str, workspace: str = DEFAULT_WORKSPACE) -> Member:
    """Remove a member (the caller has checked manage_members); only an owner removes an owner,
    and never the last one."""
    before = next((m for m in members(ledger, workspace) if m.user == user), None)
    if before is None:
        raise FieldError("user", f"{user} is not a member of {workspace}")
    if before.role == "owner":
        if role_of(ledger, actor, workspace) != "owner":
            raise AccessDenied(actor, role_of(ledger, actor, workspace), "manage_members",
                               f"only an owner can remove the owner {user}")
        _keep_an_owner(ledger, workspace, user)
    ledger.members.remove(workspace, user)
    return before


def _keep_an_owner(ledger: LedgerView, workspace: str, leaving: str) -> None:
    if not ledger.members.other_owners(workspace, leaving):
        raise FieldError("user", f"{leaving} is the last owner of {workspace}; make someone else an owner first")
