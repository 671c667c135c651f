"""The studio's web UI and API: `python app.py` (see `python app.py --help`).

The UI is the package `studio.ui`; build it in-process with `studio.ui.build_app(studio, settings)`.
"""

import sys

from studio.ui import main

if __name__ == "__main__":
    sys.exit(main())
