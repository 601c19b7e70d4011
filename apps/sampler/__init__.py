"""Sampling at scale: ``mvar-engine sample`` (:mod:`.cli`), its folder (:mod:`.folder`) and the
settings that decide its images (:mod:`.identity`)."""
