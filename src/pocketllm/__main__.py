from pocketllm.cli import main

raise SystemExit(main())
