"""Corpora, packing, the ActivationStore and harvesting."""
