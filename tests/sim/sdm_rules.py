"""SDM rules written as test oracles, independent of the model's implementation."""

from __future__ import annotations

from migrate.sim import Access


def sdm_denied(*, user_mode: bool, implicit: bool, access: Access, rw_all: bool, us_all: bool,
               xd_any: bool, wp: bool, nxe: bool, smep: bool, smap: bool, ac: bool) -> bool:
    """SDM 4.6.1, "Determination of Access Rights", as a list of denials."""
    write, fetch = access == Access.WRITE, access == Access.FETCH
    user_address = us_all  # U/S=1 in every entry: a user-mode address
    if user_mode:
        # "User-mode accesses": only user-mode addresses; writes need R/W=1 in every entry
        # (whatever CR0.WP); with NXE=1 fetches need XD=0 in every entry.
        return (not user_address or (write and not rw_all) or (fetch and nxe and xd_any))
    if fetch:
        # Supervisor fetches: never from user-mode addresses with SMEP; XD with NXE=1.
        return (user_address and smep) or (nxe and xd_any)
    if user_address and smap and (implicit or not ac):
        # Supervisor data accesses to user-mode addresses with SMAP need AC=1 and explicit.
        return True
    # Supervisor writes: with CR0.WP=1 R/W=1 in every entry is needed; with WP=0 any page.
    return write and wp and not rw_all
