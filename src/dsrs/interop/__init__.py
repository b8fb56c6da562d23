"""Bridges from other LM frameworks onto dsrs LMs and lanes (`dsrs.interop.dspy`: `pip install 'dsrs[dspy]'`)."""
