"""
The digits quickstart (scripts/quickstart.py): pipeline.py trains, samples with
classifier guidance and measures; report.py writes its tables and pictures.
"""
