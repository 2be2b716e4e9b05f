"""Entry point for ``python -m audience_sync``."""

from audience_sync.cli import main

if __name__ == "__main__":
    main()
