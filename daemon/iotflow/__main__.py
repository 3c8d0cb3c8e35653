from iotflow.cli import main

raise SystemExit(main())
