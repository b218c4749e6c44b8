"""One folder per write-up experiment (and the demo): `run.py` holds its config and `run(cfg)`, `report.py` turns its
summary into figures and HTML, and any analysis only that experiment uses lives beside them. Experiments call the
library; nothing in the library imports them."""
