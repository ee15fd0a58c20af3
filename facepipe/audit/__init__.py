"""``facepipe audit``: what is wrong with a face recognition training set, from its embeddings.

Four checks (``facepipe.audit.checks`` states each rule and how its threshold is derived from the data):
images filed under the wrong person (label noise), one person filed under two names (duplicate identities),
(near-)duplicate images, and identities that also appear in evaluation sets (overlap). ``run_audit`` loads the
sets (``facepipe.audit.data``), runs the checks and writes the tables, ``summary.json`` and ``report.html``
(``facepipe.audit.report``).
"""
