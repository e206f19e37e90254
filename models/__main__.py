import sys

from flashjax.models.cli import main

sys.exit(main())
