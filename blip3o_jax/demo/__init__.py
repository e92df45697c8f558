"""The embedded demo (``configs/demo.py``): its stages and report (``stages``) and the pixel-statistics
scoring of generated pictures (``scoring``)."""
