"""Evaluation protocols: WIDER FACE detection AP, face verification (LFW / CFP / AgeDB), IJB-C."""
