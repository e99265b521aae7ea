"""Tools around s3r (the miniature, its backbone, corpus synthesis); run them as modules: python -m tools.NAME."""
