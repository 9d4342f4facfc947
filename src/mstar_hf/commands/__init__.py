"""Sub-commands of the `mstar-hf` CLI (discovered by `mstar_hf.cli`)."""
