"""Prompt sets shipped with specdec (HumanEval, MIT: HumanEval.LICENSE), installed as specdec.data."""
