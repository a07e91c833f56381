from fedmerge.cli import main

raise SystemExit(main())
