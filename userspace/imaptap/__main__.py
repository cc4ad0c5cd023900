from imaptap.cli import main

raise SystemExit(main())
