"""``facepipe audit``: what is wrong with a face recognition training set, from its embeddings.

Four checks (``facepipe.audit.checks`` states each rule and how its threshold is derived from the data):
images filed under the wrong person (label noise), one person filed under two names (duplicate identities),
(near-)duplicate images, and identities that also appear in evaluation sets (overlap). ``facepipe.audit.run``
runs the checks on the sets ``facepipe.audit.data`` loads (a folder's vectors stay in its shard files, read on
demand: ``facepipe.audit.rows``) and writes the tables, ``summary.json`` and ``report.html``
(``facepipe.audit.report``).
The per-identity work is a batch job over chunks of identities (``facepipe.audit.identities``) that either engine
runs; neighbours come from ``facepipe.audit.neighbours``.
"""
