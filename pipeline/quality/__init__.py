"""Look at your data: an audit of the photos on their cached features.

Every photo is already a vector in the feature cache, so finding the dirty
ones costs seconds: out-of-fold probabilities of the project's logistic
regression, scored by cleanlab, find labels that disagree with the photo
(``label_issue``); a kNN graph of cosine similarities finds near-copies
(``near_duplicate``, and ``train_test_leak`` where they span the splits) and
photos far from every other (``outlier``). ``stage.py`` writes
``reports/quality.json``, ``reports/quality/suspects.csv`` and a contact sheet
per kind; ``python -m pipeline quality exclude`` turns suspects into lines of
the exclude file (``data.exclude``) that the prepare stage honours.
"""
