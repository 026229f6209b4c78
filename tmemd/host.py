"""The host: who may be which guest, who is connected, shared-pool grants, and every admin
decision. Synchronous and free of I/O, like the store it drives; the guest and admin servers are
thin adapters around it. What an administrator reads (the rows of ``tmemctl status``, ``guests``,
``uids``, ``pools``, ``share list``) is tmemd/views.py.

Identity: a connection's uid comes from SO_PEERCRED, never from a frame. A name listed in the
config's [guests] may be used only by its uids; other names are served as ``UID/NAME``
(namespaced, the embedded default) or refused (``unlisted_guests = "deny"``).

Sessions: each connection has its own private pools; connections of one guest name share that
guest's account (weight, cap, statistics, what it holds). A name may be connected as many times at
once as its policy's ``sessions`` (default 1), so a second process cannot silently share, or
steal, a guest's memory account.

Shared pools: deny by default. A guest may open shared pool UUID only with an administrator's
grant for (UUID, guest name); pages are billed to an account of the pool's own (``shared:UUID``)
so members coming and going never moves them; the pool goes with its last member.
"""

from __future__ import annotations

import time
import uuid as uuid_module
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from tmemclient.wire.errors import (
    GuestConflict,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
)
from tmemclient.wire.layout import FRAME_SHIFT, FRAME_SIZE
from tmemclient.wire.units import format_size
from tmemd import views
from tmemd.accounts import Guest, Pool, Tenant
from tmemd.config import GuestPolicy, Settings
from tmemd.policy import validate_weight
from tmemd.reattach import NamedPools
from tmemd.store import Store

if TYPE_CHECKING:
    from tmemd.persist import Adoption

log = structlog.get_logger("tmemd.host")
audit = structlog.get_logger("tmemd.audit")


class Member(Protocol):
    """What the host needs of a guest connection (a Session)."""

    guest: Guest
    uid: int

    def detach_pool(self, pool: Pool) -> None:
        """Forget a pool handle at once (its grant was revoked)."""


@dataclass
class SharedPool:
    """One shared pool, by uuid: its pool, its billing account, its member connections."""

    uuid: bytes
    pool: Pool
    members: set[Member] = field(default_factory=set)


@dataclass
class Override:
    """Admin changes to a guest's policy; they outlive the guest's connections."""

    weight: int | None = None
    cap: int | None = None
    cap_set: bool = False
    frozen: bool | None = None  # None: follow the freeze-all state


UID_PREFIX = "uid:"  # tmemctl set uid:N --cap SIZE: a tenant's cap, across all its names


class Host:
    """Policy and bookkeeping around one Store."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.sessions: dict[str, set[Member]] = {}
        self.grants: set[tuple[bytes, str]] = set()
        self.shared: dict[bytes, SharedPool] = {}
        self.overrides: dict[str, Override] = {}
        self.uid_caps: dict[int, int | None] = {}  # caps an administrator set per uid (tmemctl)
        self.frozen_all = False
        self.started = time.time()
        self.named = NamedPools()  # named pools, held by a connection or kept for their guest
        self.clock = time.monotonic  # when kept named pools expire (reattach_seconds)
        self.adoption: Adoption | None = None  # what the start did with --state-dir (persist.py)

    # ------------------------------------------------------------------ guests

    def guest_name(self, uid: int, asked: str) -> tuple[str, GuestPolicy]:
        """The guest name and policy for ``uid`` asking to be ``asked``; PermissionDenied if
        the config does not allow it."""
        policy = self.settings.guests.get(asked)
        if policy is not None:
            if policy.uids is not None and uid not in policy.uids:
                audit.warning("guest_name_refused", uid=uid, name=asked, reason="uid not allowed")
                raise PermissionDenied(
                    f"uid {uid} may not connect as guest {asked!r} (see [guests.{asked}] uids "
                    "in the tmemd config)"
                )
            return asked, policy
        if self.settings.unlisted_guests == "deny":
            audit.warning("guest_name_refused", uid=uid, name=asked, reason="not in config")
            raise PermissionDenied(
                f"guest {asked!r} is not in the tmemd config and unlisted guests are denied"
            )
        return f"{uid}/{asked}", GuestPolicy()

    def attach(
        self, name: str, policy: GuestPolicy, member: Member | None = None, *, uid: int = 0
    ) -> Guest:
        """Account for a new connection of guest ``name`` (by ``uid``); GuestConflict past its
        sessions. A new account counts in ``uid``'s tenant: the uid's cap holds across every
        name it uses. (A listed name that several uids may use is billed to the uid of the
        connection that opened its account.)"""
        live = self.sessions.get(name, set())
        if len(live) >= policy.sessions:
            raise GuestConflict(
                f"guest {name!r} is already connected ({len(live)} of {policy.sessions} sessions "
                "allowed); close the other connection or raise sessions in the config"
            )
        guest = self.store.guests.get(name)
        if guest is None:
            guest = self._add_account(name, policy, self._tenant(uid))
            frozen = self.overrides.get(name, Override()).frozen
            guest.frozen = self.frozen_all if frozen is None else frozen
        if member is not None:
            self.sessions.setdefault(name, set()).add(member)
        return guest

    def _tenant(self, uid: int) -> Tenant:
        """Uid ``uid``'s account in the store, with its cap (an administrator's, else the
        config's)."""
        tenant = self.store.tenant(uid)
        cap = self.uid_cap(uid)
        tenant.cap_slots = None if cap is None else cap >> FRAME_SHIFT
        return tenant

    def uid_cap(self, uid: int) -> int | None:
        """The cap on all of uid ``uid``'s guests together: an administrator's, else the
        config's (None: no cap)."""
        return self.uid_caps[uid] if uid in self.uid_caps else self.settings.uid_policy(uid).cap

    def max_connections(self, uid: int, default: int) -> int:
        """Connections uid ``uid`` may hold at once: its [uids.N] max_connections, else
        ``default`` ([limits] max_connections_per_uid)."""
        limit = self.settings.uid_policy(uid).max_connections
        return default if limit is None else limit

    def _add_account(self, name: str, policy: GuestPolicy, tenant: Tenant | None = None) -> Guest:
        """A new store account: the policy's weight and cap, unless an admin set them."""
        over = self.overrides.get(name, Override())
        weight = over.weight if over.weight is not None else policy.weight
        cap = over.cap if over.cap_set else policy.cap
        return self.store.add_guest(name, weight=weight, cap=cap, tenant=tenant)

    def join(self, member: Member) -> None:
        """Record a connection that ``attach`` accounted for before it existed."""
        self.sessions.setdefault(member.guest.name, set()).add(member)

    def detach(self, member: Member) -> None:
        """A connection ended (its private pools already destroyed): leave its shared pools;
        drop the guest's account with its last connection. The account goes even if leaving a
        shared pool failed: a connection always leaves whole."""
        try:
            for entry in list(self.shared.values()):
                if member in entry.members:
                    self._leave(entry, member)
        finally:
            name = member.guest.name
            live = self.sessions.get(name)
            if live is not None:
                live.discard(member)
                if not live:
                    del self.sessions[name]
            if (
                not live
                and self.store.guests.get(name) is member.guest
                and not self.named.kept(name)  # its account stays while it has kept pools
            ):
                self.store.remove_guest(member.guest)

    # ------------------------------------------------------------------ named pools

    def open_named(
        self, member: Member, name: str, *, persistent: bool, order: int
    ) -> tuple[Pool, bool]:
        """Guest ``member``'s private pool ``name``: the one kept for it (True: reopened, with
        its pages) or a new one (False). Only the uid that made a named pool gets it back
        (reattach.NamedPools.find)."""
        guest = member.guest
        pool = self.named.find(
            member, guest.name, member.uid, name, persistent=persistent, order=order
        )
        if pool is not None:
            log.info("named_pool_reopened", guest=guest.name, pool=name, pages=pool.pages)
            return pool, True
        # A kept pool outlives its connection, so max_pools (per connection) does not bound
        # what a tenant connecting again and again could leave behind: this does, per uid.
        most = self.settings.limits.max_named_pools
        if self.named.of_uid(member.uid) >= most:
            raise LimitExceeded(
                f"uid {member.uid} already has max_named_pools={most} named pools (held, or "
                "kept for reattach_seconds after their connection ended): destroy some, or "
                "wait for kept ones to expire"
            )
        pool = self.store.new_pool(guest, persistent=persistent, order=order)
        journal = self.store.journal
        if journal is not None and guest.mirror is None:  # a mirror's pages are not kept
            # Recorded before NEW_POOL is answered (tmemd/persist.py).
            pool.key = journal.pool_created(
                guest.name, name, member.uid, persistent=persistent, order=order
            )
        self.named.add(member, guest.name, member.uid, name, pool)
        return pool, False

    def keep_named(self, member: Member, pool: Pool) -> bool:
        """``member``'s connection ends: keep ``pool`` for its guest for ``reattach_seconds``
        if it is a named pool it holds (True), else the caller destroys it (False)."""
        grace = self.settings.limits.reattach_seconds
        if grace <= 0 or not self.named.keep(member, pool, self.clock() + grace):
            return False
        named = self.named.of(pool)
        log.info(
            "named_pool_kept",
            guest=member.guest.name,
            pool=named.name if named else None,
            pages=pool.pages,
            seconds=grace,
        )
        return True

    def destroyed(self, pool: Pool) -> None:
        """A guest destroys ``pool`` (called before its pages are freed): a name it had is
        free again, and a kept pool is gone from the state directory."""
        self.named.forget(pool)
        journal = self.store.journal
        if pool.key and journal is not None:
            journal.pool_destroyed(pool.key)

    def account_for(self, name: str, policy: GuestPolicy | None, uid: int) -> Guest:
        """A store account for guest ``name`` of ``uid`` with no connection (a start adopting
        its kept pools), under the policy and overrides it would connect with."""
        guest = self._add_account(name, policy or GuestPolicy(), self._tenant(uid))
        frozen = self.overrides.get(name, Override()).frozen
        guest.frozen = self.frozen_all if frozen is None else frozen
        return guest

    def expire_named(self) -> int:
        """Free the kept named pools whose ``reattach_seconds`` ran out (and the account of a
        guest left with no connection and nothing kept); return pages freed."""
        freed = 0
        for named in self.named.expired(self.clock()):
            pool = named.pool
            guest = pool.guest
            journal = self.store.journal
            if pool.key and journal is not None:
                journal.pool_destroyed(pool.key)
            pages = self.store.destroy_pool(pool)
            freed += pages
            log.info("named_pool_expired", guest=named.guest, pool=named.name, pages_freed=pages)
            if (
                not self.sessions.get(guest.name)
                and self.store.guests.get(guest.name) is guest
                and not self.named.kept(guest.name)
            ):
                self.store.remove_guest(guest)
        return freed

    def reload(self, settings: Settings) -> list[str]:
        """Adopt a reloaded config: guest policies, weights and caps. The new config is the
        administrator's new baseline, so it replaces weights and caps set live with tmemctl
        (freezes stay). Connected guests keep their connections. Returns what changed."""
        changed = []
        old = self.settings
        self.settings = settings
        for name, policy in settings.guests.items():
            if old.guests.get(name) == policy:
                continue
            changed.append(name)
            over = self.overrides.get(name)
            if over is not None:
                over.weight, over.cap, over.cap_set = None, None, False
            guest = self.store.guests.get(name)
            if guest is not None:
                guest.weight = policy.weight
                evicted = self.store.set_cap(guest, policy.cap)
                log.info(
                    "guest_policy_reloaded",
                    guest=name,
                    weight=policy.weight,
                    cap=policy.cap,
                    evicted=evicted,
                )
        for uid, tenant in self.store.tenants.items():
            if old.uid_policy(uid) == settings.uid_policy(uid):
                continue
            changed.append(f"{UID_PREFIX}{uid}")
            self.uid_caps.pop(uid, None)
            cap = settings.uid_policy(uid).cap
            evicted = self.store.set_tenant_cap(tenant, cap)
            log.info("uid_policy_reloaded", uid=uid, cap=cap, evicted=evicted)
        for name in set(old.guests) - set(settings.guests):
            changed.append(name)
            if name in self.sessions:
                log.warning(
                    "guest_unlisted_while_connected",
                    guest=name,
                    hint="it keeps its connection; it cannot reconnect under this name",
                )
        return sorted(changed)

    # ------------------------------------------------------------------ shared pools

    def open_shared(self, member: Member, uuid: bytes, order: int) -> Pool:
        """Join (or create) shared ephemeral pool ``uuid``; only with a grant."""
        name = member.guest.name
        if (uuid, name) not in self.grants:
            audit.warning("shared_pool_refused", guest=name, uuid=str(uuid_module.UUID(bytes=uuid)))
            raise PermissionDenied(
                f"guest {name!r} has no grant for shared pool {uuid_module.UUID(bytes=uuid)}; an "
                "administrator must run: tmemctl share grant UUID GUEST"
            )
        entry = self.shared.get(uuid)
        if entry is None:
            # Default weight, no cap, unless an admin set them (tmemctl set shared:UUID).
            account = self._add_account(f"shared:{uuid_module.UUID(bytes=uuid)}", GuestPolicy())
            pool = self.store.new_pool(account, persistent=False, order=order, shared=True)
            entry = self.shared[uuid] = SharedPool(uuid, pool)
        elif entry.pool.order != order:
            raise InvalidArgument(
                f"shared pool {uuid_module.UUID(bytes=uuid)} has {entry.pool.page_size}-byte pages"
            )
        entry.members.add(member)
        return entry.pool

    def leave_shared(self, member: Member, pool: Pool) -> None:
        """A member destroyed its handle of a shared pool."""
        for entry in list(self.shared.values()):
            if entry.pool is pool and member in entry.members:
                self._leave(entry, member)

    def _leave(self, entry: SharedPool, member: Member) -> None:
        entry.members.discard(member)
        if not entry.members:
            del self.shared[entry.uuid]
            self.store.remove_guest(entry.pool.guest)

    # ------------------------------------------------------------------ admin operations
    # (what an administrator reads, the rows of tmemctl status/guests/pools, is tmemd/views.py)

    def known_guest(self, name: str) -> Guest | None:
        """Guest ``name``'s account (None while it is not connected); NotFound unless it is
        connected, in the config, or was set by an administrator."""
        if name in self.store.guests or name in self.settings.guests or name in self.overrides:
            return self.store.guests.get(name)
        raise NotFound(
            f"unknown guest {name!r}: not connected and not in the config (tmemctl guests lists them)"
        )

    def _known_shared(self, name: str) -> Guest | None:
        """The account of shared pool ``shared:UUID`` (None while no member has opened it);
        NotFound unless some grant names the pool."""
        try:
            uuid = uuid_module.UUID(name.removeprefix("shared:")).bytes
        except ValueError:
            raise InvalidArgument(f"{name!r} is not shared:UUID") from None
        if name in self.store.guests or any(u == uuid for u, _ in self.grants):
            return self.store.guests.get(name)
        raise NotFound(f"unknown shared pool {name!r}: no grant names it (tmemctl share list)")

    def set_guest(self, name: str, *, weight: Any = None, cap: Any = ...) -> dict[str, Any]:
        """Change weight and/or cap (``cap=None`` removes it). Applies now and on reconnect.
        A shared pool's account (``shared:UUID``, billed its members' pages) takes them too: a
        grant lets guests put there, and the cap is what bounds that. ``uid:N`` is a tenant:
        its cap holds across all the guests of that uid."""
        if name.startswith(UID_PREFIX):
            return self._set_uid(name, weight, cap)
        known = self._known_shared if name.startswith("shared:") else self.known_guest
        guest = known(name)
        if weight is not None:
            try:
                weight = validate_weight(weight)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from exc
        if cap is not ...:
            self._check_cap(cap)
        over = self.overrides.setdefault(name, Override())
        evicted = 0
        if weight is not None:
            over.weight = weight
            if guest is not None:
                guest.weight = weight
        if cap is not ...:
            over.cap, over.cap_set = cap, True
            if guest is not None:
                evicted = self.store.set_cap(guest, cap)
        log.info(
            "guest_policy_set",
            guest=name,
            weight=weight,
            cap=None if cap is ... else cap,
            evicted=evicted,
        )
        if guest is None:
            return {"name": name, "connected": False, "weight": over.weight, "cap": over.cap}
        return {**views.guest_row(self, guest), "evicted": evicted}

    def _set_uid(self, name: str, weight: Any, cap: Any) -> dict[str, Any]:
        text = name.removeprefix(UID_PREFIX)
        if not text.isdigit() or int(text) >= 1 << 32:
            raise InvalidArgument(f"{name!r} is not uid:N (a numeric uid)")
        if weight is not None:
            raise InvalidArgument("a uid has a cap, not a weight: set weights per guest")
        if cap is ...:
            raise InvalidArgument("set uid:N needs a cap (a size, or none)")
        self._check_cap(cap)
        uid = int(text)
        self.uid_caps[uid] = cap
        tenant = self.store.tenants.get(uid)
        evicted = 0 if tenant is None else self.store.set_tenant_cap(tenant, cap)
        log.info("uid_policy_set", uid=uid, cap=cap, evicted=evicted)
        return {**views.uid_row(self, uid), "evicted": evicted}

    def _check_cap(self, cap: Any) -> None:
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= self.store.capacity
        ):
            raise InvalidArgument(f"cap must be 0..{self.store.capacity} bytes, or none")

    def freeze(self, name: str | None, frozen: bool) -> list[str]:
        """Freeze (puts refused) or thaw one guest or, with None, every guest."""
        if name is None:
            # Freeze-all or thaw-all overrides every per-guest choice made before it; a guest
            # thawed (or frozen) by name afterwards keeps that choice across reconnects.
            self.frozen_all = frozen
            for over in self.overrides.values():
                over.frozen = None
            names = [g.name for g in self.store.guests.values() if not g.name.startswith("shared:")]
        else:
            self.known_guest(name)
            self.overrides.setdefault(name, Override()).frozen = frozen
            names = [name]
        for n in names:
            g = self.store.guests.get(n)
            if g is not None:
                g.frozen = frozen
        log.info("guests_frozen" if frozen else "guests_thawed", guests=names if name else "all")
        return names

    def flush(self, name: str) -> int:
        """Drop every ephemeral page of a guest (persistent pages are never touched)."""
        guest = self.known_guest(name)
        evicted = 0 if guest is None else self.store.drop_ephemeral(guest)
        log.info("guest_flushed", guest=name, pages=evicted)
        return evicted

    def set_budget(self, budget: Any) -> dict[str, Any]:
        """Change the budget now; see Store.set_budget."""
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise InvalidArgument("budget must be an integer number of bytes")
        if budget < FRAME_SIZE:
            raise InvalidArgument(f"budget must be at least {FRAME_SIZE} bytes (one page)")
        if budget > self.store.capacity:
            raise InvalidArgument(
                f"budget {format_size(budget)} exceeds the {format_size(self.store.capacity)} of "
                "address space reserved at start (physical memory); restart tmemd to go beyond it"
            )
        evicted = self.store.set_budget(budget)
        persistent = sum(g.pers_slots for g in self.store.guests.values()) << FRAME_SHIFT
        result: dict[str, Any] = {
            "budget": self.store.budget,
            "used": self.store.used,
            "evicted": evicted,
        }
        if persistent > self.store.budget:
            result["warning"] = (
                f"persistent pages alone hold {format_size(persistent)}, more than the new budget; "
                "they are kept, and new puts are refused until they fit"
            )
        log.info(
            "budget_set", budget=self.store.budget, evicted=evicted, warning=result.get("warning")
        )
        return result

    def grant(self, uuid: bytes, name: str) -> None:
        """Allow guest ``name`` (connected or not) to open shared pool ``uuid``."""
        if not name or name.startswith("shared:"):
            raise InvalidArgument(f"{name!r} is not a guest name")
        self.grants.add((uuid, name))
        audit.info("share_granted", uuid=str(uuid_module.UUID(bytes=uuid)), guest=name)

    def revoke(self, uuid: bytes, name: str) -> int:
        """Withdraw a grant and detach the guest's connections from the pool at once."""
        if (uuid, name) not in self.grants:
            raise NotFound(f"no grant of shared pool {uuid_module.UUID(bytes=uuid)} to {name!r}")
        self.grants.discard((uuid, name))
        detached = 0
        entry = self.shared.get(uuid)
        if entry is not None:
            for member in [m for m in entry.members if m.guest.name == name]:
                member.detach_pool(entry.pool)
                self._leave(entry, member)
                detached += 1
        audit.info(
            "share_revoked", uuid=str(uuid_module.UUID(bytes=uuid)), guest=name, detached=detached
        )
        return detached
