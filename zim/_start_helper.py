"""Run a zim module as a helper process: ``python .../zim/_start_helper.py MODULE ARGS...``.

Started by file path (``zim.process.helper_command``), not with ``-m``: Python then puts
this file's directory first on ``sys.path``, which is replaced here by the directory
holding this very ``zim`` package, so the helper imports the zim its parent imported,
whatever the current directory holds.
"""
import os
import runpy
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
module = sys.argv.pop(1)
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except ImportError as exc:
    print(f"zim: {module} cannot start: {type(exc).__name__}: {exc} (from {sys.path[0]})",
          file=sys.stderr, flush=True)
    sys.exit(3)     # zim.process.EXIT_IMPORT_FAILED
