"""Model folders: the sources a run merges (`sources`: checked, loaded, memory-mapped) and the
folders `evomerge merge` reads and writes (`folders`)."""
