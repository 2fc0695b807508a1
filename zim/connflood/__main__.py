"""``python -m zim.connflood``: the same as ``zim-connflood`` and tools/connflood."""
import sys

from zim.connflood.parent import main

sys.exit(main())
