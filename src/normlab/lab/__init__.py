"""The lab: the seeds' experiments, rerun from one command (``normlab run``), with a report.

``data`` (seeded generators, sklearn's bundled datasets, leak-free train/test scaling) →
``models`` (MLP and CNN builders with every norm) → ``train`` (the training loop) →
``experiments`` (the registry; each returns plain records, see ``records``) → ``report`` (the
self-contained HTML page). The lab imports the library; the library never imports the lab.
"""
