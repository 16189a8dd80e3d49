"""Draft heads (Medusa, EAGLE) and their checkpoint loaders; installed as `specdec.heads`."""
