from zim.cli import main

raise SystemExit(main())
