import sys

from vipd.daemon import main

sys.exit(main())
