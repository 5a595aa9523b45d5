from torchat.cli import main

raise SystemExit(main())
