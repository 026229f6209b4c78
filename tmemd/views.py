"""What an administrator sees: the rows of ``tmemctl status``, ``guests``, ``uids``, ``pools``
and ``share list``, read from a Host and its Store. Read-only and free of I/O; every decision
(who may connect, grants, weights, caps, freezes) is the Host's (tmemd/host.py).

Each row is a dict of plain values (the admin socket sends it as msgpack, ``tmemctl --json``
prints it as JSON): its keys are the names docs/operations.md "tmemctl" documents.
Sizes are bytes; a cap of None is no cap.
"""

from __future__ import annotations

import time
import uuid as uuid_module
from typing import TYPE_CHECKING, Any

from tmemclient.wire.layout import FRAME_SHIFT

if TYPE_CHECKING:
    from tmemd.accounts import Guest
    from tmemd.host import Host


def status(host: Host) -> dict[str, Any]:
    """Global figures."""
    store = host.store
    kept = host.named.kept_total()
    return {
        "budget": store.budget,
        "used": store.used,
        "free": max(0, store.budget - store.used),
        "capacity": store.capacity,
        "guests": len(host.sessions),
        "sessions": sum(len(s) for s in host.sessions.values()),
        "shared_pools": len(host.shared),
        "evictions": store.evictions,
        "moved": store.moved_slots << FRAME_SHIFT,
        "lent": sum(g.lent_slots for g in store.lenders.values()) << FRAME_SHIFT,
        "recalled": store.recalled_slots << FRAME_SHIFT,
        # What the store's files really hold (fstat), against "used", what is accounted:
        # free slots keep their memory for reuse, and guests may bring some in on their
        # own (punched again by the audit: "overdrawn").
        "resident": store.resident(),
        "overdrawn": store.overdrawn_slots << FRAME_SHIFT,
        "frozen_all": host.frozen_all,
        "uptime": round(time.time() - host.started, 3),
        # Named pools whose connection ended, kept for their guest to reopen (design.md §2.6).
        "reattach_seconds": host.settings.limits.reattach_seconds,
        "kept_pools": kept[0],
        "kept_pages": kept[1],
        # --state-dir: what this start adopted (or why it started empty); None without one.
        "state": None if host.adoption is None else host.adoption.as_dict(),
        **packing(store.packing_stats()),
    }


def packing(stats: dict[str, int]) -> dict[str, Any]:
    """What packed pages (docs/design.md §6.11) hold: ``packed`` pages, ``deduped`` of them
    sharing another page's bytes (``--dedup``), ``packed_bytes`` of the slots they use, and
    ``packed_waste``, the part of those bytes no object uses (the fragmentation of the size
    classes, 0..1)."""
    held = stats["packed_slots"] << FRAME_SHIFT
    return {
        "packed": stats["packed"],
        "deduped": stats["deduped"],
        "packed_bytes": held,
        "packed_waste": round(1 - stats["packed_stored"] / held, 3) if held else 0.0,
    }


def guests(host: Host) -> list[dict[str, Any]]:
    """One row per account: connected guests and shared pools."""
    return [guest_row(host, g) for g in sorted(host.store.guests.values(), key=lambda g: g.name)]


def guest_row(host: Host, g: Guest) -> dict[str, Any]:
    """One account's row."""
    pages = sum(p.pages for p in g.pools)
    page_bytes = sum(p.pages * p.page_size for p in g.pools)
    used = (g.eph_slots + g.pers_slots) << FRAME_SHIFT
    return {
        "name": g.name,
        "kind": "shared" if g.name.startswith("shared:") else "guest",
        "sessions": len(host.sessions.get(g.name, ())),
        "weight": g.weight,
        "cap": None if g.cap_slots is None else g.cap_slots << FRAME_SHIFT,
        "frozen": g.frozen,
        "mapped": g.mirror is not None,  # reads its pages through a mapping (§4.7)
        "ephemeral_bytes": g.eph_slots << FRAME_SHIFT,
        "persistent_bytes": g.pers_slots << FRAME_SHIFT,
        "lent_bytes": g.lent_slots << FRAME_SHIFT,  # memory it borrowed (§4.8)
        # What its mirror and loan file hold now (fstat), and what audits found beyond its
        # grant, ever.
        "resident_bytes": host.store.files_resident(g),
        "overdrawn_bytes": g.overdrawn << FRAME_SHIFT,
        "pages": pages,
        # What its pages would take raw, against what they take (packed pages share slots):
        # the ratio is page_bytes / (ephemeral_bytes + persistent_bytes).
        "page_bytes": page_bytes,
        "ratio": round(page_bytes / used, 3) if used else None,
        **packing(host.store.packing_stats(list(g.pools))),
        "pools": len(g.pools),
        **g.stats.as_dict(),
    }


def uids(host: Host) -> list[dict[str, Any]]:
    """One row per tenant (uid): what all of its guests hold together, and its limits."""
    store, settings = host.store, host.settings
    rows = []
    for uid in sorted(set(store.tenants) | set(settings.uids) | set(host.uid_caps)):
        tenant = store.tenants.get(uid)
        members = sorted(tenant.guests, key=lambda g: g.name) if tenant is not None else []
        rows.append(
            {
                "uid": uid,
                "guests": [g.name for g in members],
                "sessions": sum(len(host.sessions.get(g.name, ())) for g in members),
                "cap": host.uid_cap(uid),
                "max_connections": host.max_connections(
                    uid, settings.limits.max_connections_per_uid
                ),
                "ephemeral_bytes": sum(g.eph_slots for g in members) << FRAME_SHIFT,
                "persistent_bytes": sum(g.pers_slots for g in members) << FRAME_SHIFT,
                "lent_bytes": sum(g.lent_slots for g in members) << FRAME_SHIFT,
                "held_bytes": sum(g.held_slots for g in members) << FRAME_SHIFT,
            }
        )
    return rows


def uid_row(host: Host, uid: int) -> dict[str, Any]:
    """Uid ``uid``'s row of ``uids``."""
    return next(r for r in uids(host) if r["uid"] == uid)


def pools(host: Host, guest: str | None = None) -> list[dict[str, Any]]:
    """One row per pool, of one guest (NotFound if the host knows no such guest) or of all."""
    if guest is not None:
        host.known_guest(guest)
    rows = []
    uuids = {id(e.pool): e for e in host.shared.values()}
    for g in sorted(host.store.guests.values(), key=lambda g: g.name):
        for p in sorted(g.pools, key=lambda p: p.pool_id):
            entry = uuids.get(id(p))
            named = host.named.of(p)
            members = sorted(m.guest.name for m in entry.members) if entry else [g.name]
            if guest is not None and guest not in members:
                continue
            rows.append(
                {
                    "pool": p.pool_id,
                    "guest": g.name,
                    "kind": "persistent" if p.persistent else "ephemeral",
                    "shared": p.shared,
                    "uuid": str(uuid_module.UUID(bytes=entry.uuid)) if entry else None,
                    "name": named.name if named else None,  # a named pool (PROTOCOL.md §6.1)
                    "kept": named is not None and named.holder is None,  # waiting for its guest
                    "members": members,
                    "page_size": p.page_size,
                    "pages": p.pages,
                    "bytes": p.pages * p.page_size,
                    **p.stats.as_dict(),
                }
            )
    return rows


def shares(host: Host) -> dict[str, Any]:
    """Grants and live shared pools."""
    return {
        "grants": [
            {"uuid": str(uuid_module.UUID(bytes=u)), "guest": g} for u, g in sorted(host.grants)
        ],
        "pools": [
            {
                "uuid": str(uuid_module.UUID(bytes=e.uuid)),
                "members": sorted(m.guest.name for m in e.members),
                "pages": e.pool.pages,
            }
            for e in host.shared.values()
        ],
    }
