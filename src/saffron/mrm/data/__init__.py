"""The token-level reward corpus an MRM trains on (``saffron build-rewards``): ``rows.py`` the row, ``corpus.py``
which conversations, ``annotate.py`` the reward model's scores, ``store.py`` the folder on disk, ``build.py`` the
build."""
