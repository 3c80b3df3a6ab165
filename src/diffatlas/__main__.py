from diffatlas.cli import main

raise SystemExit(main())
