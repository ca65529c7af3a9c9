from specfast.cli import main

raise SystemExit(main())
