"""Who may join a private channel (docs/protocol.md, "Private channels"): the
rule that the IM actions 3 and 12 (zim.im) apply, apart from the stores that
keep the grants and the JWT logins that carry claims (zim.access)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from zim.handler import Error

if TYPE_CHECKING:
    from zim.handler import Ctx


def may_join(ctx: "Ctx", channel: str, user_id: int) -> bool:
    """Whether the user may join the private channel: a stored grant (an
    invitation, the server API) or its latest JWT's ``channels`` claim."""
    server = ctx.server
    if server.store.grant_of(channel, user_id) is not None:
        return True
    return server.jwt is not None and server.jwt.grants(user_id, channel)


def check_may_join(ctx: "Ctx", channel: str, user_id: int, private: bool) -> None:
    """``forbidden`` for a join of an existing channel the user may not join."""
    if ctx.server.store.channel_private(channel):
        if not may_join(ctx, channel, user_id):
            raise Error("forbidden", f"{channel} is a private channel: join it with an invitation "
                                     "or a grant from the application")
    elif private:
        raise Error("forbidden", f"{channel} exists and is public: choose another name for a private channel")
