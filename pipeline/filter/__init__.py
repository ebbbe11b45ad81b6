"""Filter: keep/drop every annotated sample by rules from conf/filter/, with a funnel report."""
