"""Badge readers: EM4100 (RDM6300-class) and line-oriented ASCII readers on serial URLs."""
