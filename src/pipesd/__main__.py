from pipesd.cli import main

raise SystemExit(main())
