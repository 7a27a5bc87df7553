from cada.cli import main

raise SystemExit(main())
