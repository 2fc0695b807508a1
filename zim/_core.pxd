# The declarations of zim/_core.pyx, one file per concept (see there). The cpdef enums
# of core/wire.pxd (the router <-> worker link) are exposed to Python by zim._core.
include "core/wire.pxd"
include "core/counters.pxd"
include "core/buffers.pxd"
include "core/addresses.pxd"
include "core/conns.pxd"
include "core/timers.pxd"
include "core/users.pxd"
include "core/groups.pxd"
include "core/link.pxd"
include "core/loop.pxd"
