"""The protocol's action numbers (docs/protocol.md), defined once: the server's
handlers, merged pushes, the client and connflood name them from here."""

# Requests: a client's packet carries one of these in its action field.
LOGIN = 1
SEND_USER = 2
SUBSCRIBE = 3
SEND_CHANNEL = 4
HISTORY = 5
UNSUBSCRIBE = 6
PULL = 7
ACK = 8
HEARTBEAT = 9
REFRESH_TOKEN = 10
LOG_OUT_EVERYWHERE = 11
INVITE = 12                     # to a private channel

# Pushes: the server's packets of seq 0.
PUSH_USER_MESSAGE = 101         # a direct message
PUSH_CHANNEL_MESSAGE = 102      # a channel message
PUSH_CHANNEL_BATCH = 103        # channel messages merged (--push-window-ms)
PUSH_INVITED = 104              # an invitation to a private channel (action 12)
