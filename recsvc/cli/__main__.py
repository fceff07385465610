"""``python -m recsvc.cli`` runs the ``recsvc`` command; ``spark-submit`` takes this file's path as the
application (it only runs ``.py`` files): ``spark-submit ... <path>/recsvc/cli/__main__.py train ...``."""

from recsvc.cli import main

if __name__ == "__main__":
    main()
