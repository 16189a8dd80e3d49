"""The demo models (assets/demo), installed as package data under specdec.assets."""
