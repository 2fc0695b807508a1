"""zim: an instant-messaging server with a Cython epoll core.

Use it as a server (``zim-server``) or as a framework::

    import zim
    app = zim.App()                 # the IM actions 1..9

    @app.route(100)
    def echo(ctx, body):
        return {"echo": body, "user": ctx.user_id}

    app.run(tcp=":8081", ws=":8082")
"""
from zim.app import App, Ctx, Error
from zim.storage import MemoryStore, Retention, Tier

__all__ = ["App", "Ctx", "Error", "MemoryStore", "Retention", "Tier"]
__version__ = "0.1.0"
