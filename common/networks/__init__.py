"""Networks of the four methods (one network family per file) and the baselines they are compared with."""
